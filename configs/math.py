"""Math benchmarks (GSM8K / MATH-format JSONL) with a pretrained Hugging Face model, no training run:

    python experiments/evaluate.py --model=hf:DIR --data=problems.jsonl \
        --strategies=greedy:1,best_of_n:8,self_consistency:4,beam:4,mcts:16 --out=DIR2

evaluate.py reads this file when --model is given without --config; override a field with
`--config=configs/math.py --config.search.step_len=128`. What it uses: `search` (K = num_slots proposals per
node, steps of at most step_len tokens, at most max_depth steps: beam and MCTS; whole-solution strategies get
max_depth * step_len tokens, stopping at EOS), `search.prompt_len` (the longest prompt allowed), `eval`
(strategies, temperature, MCTS preset, batch size) and `seed`. The model section is ignored with --model:
the folder's config.json is the model (its max_position_embeddings bounds prompt_len + max_depth * step_len).
Training on a JSONL file (SFT on its worked solutions, RL from search on its answer-only rows, evaluation on
its eval split):

    python experiments/train.py --config=configs/math.py --config.model.init=hf:DIR \
        --config.task.data=train.jsonl --config.task.num_train=2000 --config.task.num_rl=4000 --workdir=runs/math
"""
from rlm_jax.config_utils import sibling


def get_config():
    c = sibling(__file__, "base")
    c.task.update(dict(name="jsonl_math"))
    c.model.update(dict(max_seq_len=4096))  # validation only: --model=hf:DIR takes the folder's own context
    c.search.update(dict(num_slots=4, step_len=96, max_depth=8, prompt_len=1024))
    c.eval.update(dict(batch_size=8, temperature=0.7,
                       strategies="greedy:1,best_of_n:8,self_consistency:4,beam:4,mcts:16"))
    return c
