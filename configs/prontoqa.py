"""PrOntoQA (x1's logic domain, our generator): True/False by modus-ponens proof chains.

Levels 1-3 keep prompts under ~100 tokens; about 15 minutes on 2 CPU cores, minutes on an accelerator.
    python experiments/train.py --config=configs/prontoqa.py --workdir=runs/prontoqa
"""
from rlm_jax.config_utils import sibling


def get_config():
    c = sibling(__file__, "base")
    c.task.update(dict(name="prontoqa", levels="1-3", num_train=2000, num_rl=192, num_eval=128, eval_fraction=0.1))
    c.tokenizer.update(dict(vocab_size=1000, corpus_problems=1000))
    c.model.update(dict(max_seq_len=256))
    c.search.update(dict(step_len=16, max_depth=5, prompt_len=128))
    c.seq_len = 160
    c.sft.update(dict(steps=600, batch_size=32))
    c.value.update(dict(problems=128))
    c.rl.update(dict(iterations=3, problems_per_iteration=64, batch_size=16))
    c.eval.update(dict(batch_size=32))
    return c
