"""Prompts for a pretrained (Hugging Face) model: its chat template or plain text, and the ids it stops at.

    fmt = PromptFormat(system="Please reason step by step, ...", fewshot=(("2+2?", "2+2=4\\n#### 4"),))
    ids = prompt_ids(hf_tok, fmt, "What is 3+5?")     # the chat template's text, generation prompt included
    stops = stop_ids(hf_tok, folder, fmt)               # EOS, end-of-turn (<|im_end|>, <|eot_id|>), generation_config's
    step = step_token(hf_tok, "\\n\\n")                   # the single token of the step delimiter, or an error

Chat (`chat_template="auto"`, the default): messages [system] + (user question, assistant solution) per
few-shot example + the user question, rendered by the tokenizer's own template with the generation prompt and
encoded without adding special tokens (the template writes BOS itself where the family has one). A template
file (`chat_template=PATH.jinja`) replaces the tokenizer's. `chat_template="none"` (base models): plain text,
`system` + "Question: q\\nAnswer: a" per example + "Question: q\\nAnswer:", encoded with the tokenizer's own
special tokens (BOS where it adds one).

Stops: a chat model ends its turn with an end-of-turn token that is often not the tokenizer's EOS
(Llama 3: <|eot_id|>, ChatML/Qwen: <|im_end|>). `primary_stop` is the one decoding stops at (the first
end-of-turn token the rendered template writes, else the tokenizer's EOS); `stop_ids` lists every id that
ends a solution (EOS, those end-of-turn tokens, generation_config.json's eos_token_id).

`TokenizerView` is a `Tokenizer` with other step/EOS ids (the same encode/decode), for the search and the
decoding of its outputs.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from rlm_jax.tokenizer import _StepMixin  # encode_steps / split_steps / decode_steps on this view's step id

DEFAULT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>")
CHAT_MODES = ("auto", "none")  # or a path to a .jinja template file


class PromptError(ValueError):
    """A prompt that cannot be built as asked; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a question becomes a prompt. chat_template: "auto" (the tokenizer's), "none" (plain text) or a
    .jinja file. system: the system prompt ("" or None: none). fewshot: (question, solution) pairs shown
    before the question, as earlier turns (chat) or earlier Question/Answer blocks (plain)."""

    chat_template: str = "auto"
    system: str | None = DEFAULT_SYSTEM
    fewshot: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.chat_template not in CHAT_MODES and not Path(self.chat_template).is_file():
            raise PromptError(f"chat_template={self.chat_template!r}: use 'auto' (the tokenizer's template), 'none' "
                              "(plain text, for base models) or the path of a .jinja template file")

    @property
    def chat(self) -> bool:
        return self.chat_template != "none"


def _template(hf_tok, fmt: PromptFormat, where: str = "") -> str | None:
    if fmt.chat_template == "none":
        return None
    if fmt.chat_template != "auto":
        return Path(fmt.chat_template).read_text()
    if not getattr(hf_tok, "chat_template", None):
        raise PromptError(f"the tokenizer{' in ' + where if where else ''} has no chat template (no 'chat_template' in "
                          "tokenizer_config.json, no chat_template.jinja); pass chat_template=none "
                          "(--chat_template=none) to prompt a base model with plain text, or a .jinja file")
    return None  # the tokenizer's own


def prompt_text(hf_tok, fmt: PromptFormat, question: str, where: str = "") -> str:
    """The prompt as text (chat: rendered by the template, generation prompt included)."""
    if not fmt.chat:
        parts = [fmt.system] if fmt.system else []
        parts += [f"Question: {q}\nAnswer: {a}" for q, a in fmt.fewshot]
        return "\n\n".join(parts + [f"Question: {question}\nAnswer:"])
    template = _template(hf_tok, fmt, where)
    messages = [{"role": "system", "content": fmt.system}] if fmt.system else []
    for q, a in fmt.fewshot:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    kw = {"chat_template": template} if template is not None else {}
    return hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)


def prompt_ids(hf_tok, fmt: PromptFormat, question: str, where: str = "") -> list[int]:
    """The prompt's ids (see the module docstring for what special tokens are added)."""
    text = prompt_text(hf_tok, fmt, question, where)
    return list(hf_tok.encode(text, add_special_tokens=not fmt.chat))


def _single_id(hf_tok, text: str) -> int | None:
    ids = hf_tok.encode(text, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


def step_token(hf_tok, delimiter: str = "\n\n") -> int:
    """The id of the vocabulary's single token for `delimiter`; PromptError when it takes several tokens.
    Tokens where the delimiter is merged with other characters (".\\n\\n") end a step too
    (`HFTokenizer.step_end_ids`)."""
    i = _single_id(hf_tok, delimiter)
    if i is None:
        raise PromptError(f"the step delimiter {delimiter!r} is not one token of this tokenizer (it encodes to "
                          f"{hf_tok.encode(delimiter, add_special_tokens=False)}); pick one that is (e.g. '\\n')")
    return i


def primary_stop(hf_tok, fmt: PromptFormat) -> int:
    """The id decoding stops at: with a chat template, the first end-of-turn token its rendered turns
    write (ChatML's <|im_end|>, Llama 3's <|eot_id|>); else, or when it writes none, the tokenizer's EOS."""
    if fmt.chat:
        rendered = prompt_text(hf_tok, dataclasses.replace(fmt, fewshot=(("q", "a"),)), "q")
        found = [(rendered.find(t), t) for t in END_OF_TURN if t in rendered]
        for _, t in sorted(found):
            i = _single_id(hf_tok, t)
            if i is not None:
                return i
    if hf_tok.eos_token_id is None:
        raise PromptError("this tokenizer has no EOS token; set eos_token in tokenizer_config.json")
    return int(hf_tok.eos_token_id)


def stop_ids(hf_tok, folder, fmt: PromptFormat) -> list[int]:
    """Every id that ends a solution: `primary_stop` first, then the tokenizer's EOS, the end-of-turn
    tokens of its vocabulary and generation_config.json's eos_token_id (an int or a list)."""
    ids = [primary_stop(hf_tok, fmt)]
    if hf_tok.eos_token_id is not None:
        ids.append(int(hf_tok.eos_token_id))
    ids += [i for i in (_single_id(hf_tok, t) for t in END_OF_TURN) if i is not None
            and hf_tok.convert_ids_to_tokens(i) in END_OF_TURN]
    gen = Path(folder) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    return list(dict.fromkeys(ids))


class TokenizerView(_StepMixin):
    """A tokenizer with other step / EOS ids (`step_id`, `step_delimiter`, `eos_id`, `bos_id`): encode and
    decode are the wrapped tokenizer's. Used where the search and the decoding of its outputs must read the
    ids a prompt format decides (an end-of-turn token as EOS; EOS as the step id for whole solutions)."""

    def __init__(self, tok, *, step_id: int | None = None, step_delimiter: str | None = None,
                 eos_id: int | None = None, bos_id: int | None = -1):
        self.base = tok
        self.step_id = tok.step_id if step_id is None else int(step_id)
        self.step_delimiter = tok.step_delimiter if step_delimiter is None else step_delimiter
        self.eos_id = tok.eos_id if eos_id is None else int(eos_id)
        self.bos_id = tok.bos_id if bos_id == -1 else bos_id
        self.pad_id, self.vocab_size = tok.pad_id, tok.vocab_size
        same_steps = self.step_id == tok.step_id and self.step_delimiter == tok.step_delimiter
        self.step_end_ids = tuple(i for i in tok.step_end_ids if i != self.eos_id) if same_steps else ()

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.base.decode(ids)

    def save(self, folder):
        return self.base.save(folder)
