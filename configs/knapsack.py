"""Knapsack (x1's decision version, our generator): pick items, then answer True/False.

Levels 1-3 (3-5 items); prompts take up to ~290 tokens and examples (prompt and solution) up to ~580, so
this is sized for an accelerator (on 2 CPU cores expect an hour).
    python experiments/train.py --config=configs/knapsack.py --workdir=runs/knapsack
"""
from rlm_jax.config_utils import sibling


def get_config():
    c = sibling(__file__, "base")
    c.task.update(dict(name="knapsack", levels="1-3", num_train=2000, num_rl=192, num_eval=128, eval_fraction=0.1))
    c.tokenizer.update(dict(vocab_size=600, corpus_problems=1000))
    c.model.update(dict(d_model=192, num_layers=4, num_heads=6, num_kv_heads=2, mlp_dim=512, max_seq_len=768))
    c.search.update(dict(num_slots=3, step_len=28, max_depth=9, prompt_len=320))
    c.seq_len = 704  # the longest examples measured ~580 tokens (tests/test_configs.py checks the fit)
    c.sft.update(dict(steps=800, batch_size=32))
    c.value.update(dict(problems=128))
    c.rl.update(dict(iterations=3, problems_per_iteration=64, batch_size=16))
    c.eval.update(dict(batch_size=32))
    return c
