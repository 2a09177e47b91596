"""experiments/solve.py end to end on a generated tiny workdir (random models, no training): it prints the
answer, its verification and the MCTS tree with every node's step, visits, value and prior."""
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from rlm_jax import checkpoint as ckpt_lib, config
from rlm_jax import progress as progress_lib
from rlm_jax import workdir as wd_lib
from rlm_jax.config_utils import sibling
from rlm_jax.models import heads, transformer
from rlm_jax.tasks import get_task
from rlm_jax.tokenizer import SentencePieceTokenizer
from limits import hang_limit

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.py"
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
NODE = re.compile(r"^[│ ]*[├└]─ (.+?)  N=(\d+) V=([-+]\d\.\d\d) P=(\d\.\d\d)( \[END\]| H=\d+\.\d\d)?( \*)?$")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """What experiments/train.py leaves after SFT and the value phase, with random weights: the
    tokenizer, sft/final, value/final and progress.json. The policy's STEP / EOS logits are scaled so
    that its steps end within L tokens (random weights would truncate nearly every step)."""
    wd = tmp_path_factory.mktemp("run")
    c = sibling(str(CONFIG), "tiny")
    task = get_task(c.task.name)
    train = [task.generate(seed=i, difficulty=(i % 10) / 10) for i in range(c.tokenizer.corpus_problems)]
    tok = SentencePieceTokenizer.train([task.prompt(p) + "\n" + "\n".join(task.solve(p)) for p in train],
                                       vocab_size=c.tokenizer.vocab_size, out=wd / "tokenizer")
    rc = config.from_configdict(c)
    wd_lib.write_config(wd, rc)  # what train.py records: solve.py needs no --config
    cfg = rc.model_config(tok.vocab_size)
    policy = jax.jit(transformer.init_params, static_argnums=0)(cfg, jax.random.key(0))
    step_col = 30.0 * policy["lm_head"][:, tok.step_id]  # ~60% of steps end with STEP, ~25% with EOS
    policy["lm_head"] = policy["lm_head"].at[:, tok.step_id].set(step_col).at[:, tok.eos_id].set(0.8 * step_col)
    head = heads.HeadConfig(kind=c.value_head.kind, hidden=tuple(c.value_head.hidden))
    ckpt_lib.save_result(wd / "sft" / "final", policy)
    ckpt_lib.save_result(wd / "value" / "final", heads.init_value_params(cfg, head, jax.random.key(1), trunk=policy))
    for phase in ("data", "tokenizer", "sft", "value"):
        progress_lib.mark_done(wd, phase, {}, is_primary=True)
    return wd, task.generate(seed=12345, difficulty=0.5)["problem"]


def test_solve_prints_the_answer_and_the_search_tree(workdir):
    wd, problem = workdir
    cmd = [sys.executable, str(ROOT / "experiments" / "solve.py"), f"--workdir={wd}",
           f"--problem={problem}", "--strategy=mcts", "--budget=6", "--preset=puct", "--tree_depth=2"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=hang_limit(900))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "models: SFT policy + value model" in out and f"problem: {problem}" in out
    assert re.search(r"^verification: (SOLVED|WRONG|INVALID|\w+)", out, re.M), out
    assert re.search(r"^generated tokens: [1-9]\d*$", out, re.M), out
    tree = out.split("search tree (", 1)[1].split("\n\nthe root's proposals", 1)[0].splitlines()
    nodes = int(re.match(r"(\d+) nodes", tree[0]).group(1))
    assert 3 <= nodes <= 7, tree  # the root + at most one node per simulation (PUCT)
    root = re.fullmatch(r"root  N=(\d+) V=([-+]\d\.\d\d) H=(\d+\.\d\d)( \*)?", tree[1])
    assert root and int(root.group(1)) == 7, tree[1]  # created + 6 simulations through the root
    assert 0 < float(root.group(3)) < 20, tree[1]  # the policy's entropy at the prompt, in nats
    lines = [line for line in tree[2:] if "─ ... " not in line]  # "... below depth 2" summaries
    children = [NODE.match(line) for line in lines]
    assert len(children) >= 2 and all(children), tree
    # The root's children (no indentation) hold the 6 simulations' visits.
    assert sum(int(m.group(2)) for m in children if m.group(0)[0] in "├└") == 6, tree
