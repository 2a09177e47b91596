"""The main job's default: 3-number countdown, a ~0.86M-parameter model trained from scratch on 2 CPU cores.

    python experiments/train.py --config=configs/countdown.py --workdir=runs/countdown
Few solved examples and many problems with only a verifier: the setting RL from search is for. Measured
figures of this config are in the README ("The default run, as measured"). Scale up by overriding fields
(`--config.model.d_model=512 --config.sft.steps=20000 ...`) or with configs/countdown_pod.py.
"""
from rlm_jax.config_utils import sibling


def get_config():
    c = sibling(__file__, "base")
    # SFT on up to 4 distinct solutions of each of the 1,000 problems: the policy learns the alternatives.
    c.task.traces_per_problem = 4
    # Phase 0: documents of 5 random legal steps (`12*17=204`): the arithmetic a pretrained LM would bring.
    c.pretrain.steps = 2000
    # After RL: the value model refit on exact step labels (BCE), which makes MCTS pay at test time.
    c.value_refit.steps = 1500
    # K distinct proposals per MCTS / beam node at test time (they pay with the refit value model).
    c.eval.proposals = "distinct"
    # The blueprint's other tree searches beside best-of-N and MCTS, each paired with both at no fewer tokens.
    c.eval.strategies += ",dvts:2,tot_dfs:8,got:2,sr_mcts:4"
    # Does search pay in training? RL's iterations again with sampled GRPO at no more generated tokens.
    c.rl.search_free_baseline = True
    return c
