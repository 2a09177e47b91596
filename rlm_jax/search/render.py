"""Readable text of one problem's search tree: each node's step, visits, value, prior, terminal marker.

    print(render_tree(out.tree, 0, lm_step_labels(tok, out.tree, 0), highlight=out.best_path[0]))

    root  N=17 V=+0.12 H=1.35
    ├─ 7*3=21  N=9 V=+0.40 P=0.41 H=0.62 *
    │  ├─ 21+5=26  N=4 V=+1.00 P=0.66 [END] *
    │  └─ ... 2 more (N=3)
    └─ 12-7=5  N=6 V=-0.20 P=0.30 H=2.10

Children are listed most-visited first (ties: higher prior first). N: visits, V: backed-up value
(value_sum / visits), P: the prior probability of the node's slot (softmax of its parent's K prior
logits), H: the entropy (nats) of the policy's first-token distribution after the node, how unsure it
is of the next step (the KV-cached search records it; `uncertainty.py`), [END]: terminal node, *: on
the highlighted path (e.g. the search's best path). `max_depth` and `max_children` cap the output; what
is cut is summarised on a "..." line.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from rlm_jax.search.tree import NONE, ROOT, Tree
from rlm_jax.tokenizer import step_stops


def _softmax(logits: np.ndarray) -> np.ndarray:
    finite = np.isfinite(logits)
    if not finite.any():
        return np.zeros_like(logits, dtype=np.float64)
    z = np.where(finite, logits - logits[finite].max(), -np.inf)
    e = np.exp(z)
    return e / e.sum()


def _one_line(s: str) -> str:
    """`s` on one line: newlines as spaces, every other unprintable character (\\r, \\x85, \\u2028, ...: an
    untrained policy's steps hold them) escaped, so that each node keeps exactly one line."""
    s = s.replace("\n", " ")
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in s)


def render_tree(tree: Tree, index: int, label: Callable[[int], str] | Sequence[str] | None = None, *,
                max_depth: int | None = None, max_children: int | None = None,
                highlight: Sequence[int] | None = None, root_label: str = "root") -> str:
    """The tree of problem `index` as indented text (see the module docstring).

    label: node -> its step text (a callable or a sequence indexed by node); None: "slot a".
    max_depth: deepest depth printed (None: all). max_children: children listed per node (None: all).
    highlight: node indices to mark with "*" (NONE entries ignored).
    """
    if max_depth is not None and max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}")
    if max_children is not None and max_children < 1:
        raise ValueError(f"max_children must be >= 1, got {max_children}")
    t = jax.device_get(tree)
    batch = t.parent.shape[0]
    if not 0 <= index < batch:
        raise IndexError(f"problem index {index} out of range for a batch of {batch}")
    children, visits = t.children[index], t.visits[index]
    value = t.value_sum[index] / np.maximum(visits, 1)
    logits, terminal = t.child_prior_logits[index], t.terminal[index]
    slot_of = t.action_from_parent[index]
    marked = {int(n) for n in np.asarray(highlight if highlight is not None else []).ravel() if n != NONE}
    emb = t.embedding if isinstance(t.embedding, dict) else {}
    entropy = np.asarray(emb["entropy"][index]) if "entropy" in emb else None

    def text(node: int) -> str:
        if label is None:
            return f"slot {slot_of[node]}"
        s = label(node) if callable(label) else label[node]
        return _one_line(s) or "(empty)"

    def stats(node: int, prior: float | None) -> str:
        s = f"N={int(visits[node])} V={value[node]:+.2f}"
        if prior is not None:
            s += f" P={prior:.2f}"
        if terminal[node]:
            s += " [END]"
        elif entropy is not None:
            s += f" H={entropy[node]:.2f}"
        if node in marked:
            s += " *"
        return s

    lines = [f"{root_label}  {stats(ROOT, None)}"]

    def walk(node: int, depth: int, prefix: str) -> None:
        kids = [int(c) for c in children[node] if c != NONE]
        if not kids:
            return
        probs = _softmax(logits[node].astype(np.float64))
        kids.sort(key=lambda c: (-int(visits[c]), -probs[slot_of[c]], c))
        if max_depth is not None and depth + 1 > max_depth:
            lines.append(f"{prefix}└─ ... {len(kids)} children (N={int(visits[kids].sum())}) below depth {depth}")
            return
        shown = kids if max_children is None else kids[:max_children]
        rest = kids[len(shown):]
        for i, c in enumerate(shown):
            last = i == len(shown) - 1 and not rest
            lines.append(f"{prefix}{'└─' if last else '├─'} {text(c)}  {stats(c, probs[slot_of[c]])}")
            walk(c, depth + 1, prefix + ("   " if last else "│  "))
        if rest:
            lines.append(f"{prefix}└─ ... {len(rest)} more (N={int(visits[rest].sum())})")

    walk(ROOT, 0, "")
    return "\n".join(lines)


def lm_step_labels(tok, tree: Tree, index: int) -> list[str]:
    """The step text of every node of problem `index` in an LM search tree (`rlm_jax.search.lm`);
    a step cut at L tokens (no STEP/EOS) is marked "(truncated)"."""
    from rlm_jax.formatting import step_text

    emb = jax.device_get(tree.embedding)
    steps, masks = emb["step"][index], emb["step_mask"][index]
    out = []
    for s, m in zip(steps, masks):
        ids = s[m]
        txt = step_text(tok, ids)
        if len(ids) and int(ids[-1]) not in step_stops(tok) | {tok.eos_id}:
            txt += " (truncated)"
        out.append(txt)
    return out


def lm_proposals(tok, tree: Tree, index: int, node: int = ROOT) -> str:
    """The K proposals sampled at `node` of an LM search tree, one per line: slot, prior probability
    (softmax of the slot logits), text, and why a slot is unusable (cut at L tokens, repeat, never
    expanded), so a tree that did not grow can be read."""
    from rlm_jax.formatting import step_text

    t = jax.device_get(tree)
    emb = t.embedding
    logits = t.child_prior_logits[index, node].astype(np.float64)
    probs = _softmax(logits)
    lines = []
    for a in range(logits.shape[0]):
        ids = emb["props"][index, node, a][emb["props_mask"][index, node, a]]
        txt = step_text(tok, ids) or "(empty)"
        last = int(ids[-1]) if len(ids) else None
        end = "EOS" if last == tok.eos_id else "STEP" if last in step_stops(tok) else ""
        if not np.isfinite(logits[a]):
            note = "invalid: " + ("cut at L tokens" if not end else "terminal parent" if t.terminal[index, node]
                                  else "repeat of an earlier slot")
        else:
            note = f"P={probs[a]:.2f}" + ("" if t.children[index, node, a] != NONE else ", not expanded")
        lines.append(f"slot {a}: {txt!r} [{end or 'no end'}] ({note})")
    return "\n".join(lines)
