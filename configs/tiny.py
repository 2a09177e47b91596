"""A seconds-sized config for tests: every phase runs, nothing is expected to learn much."""
from rlm_jax.config_utils import sibling


def get_config():
    c = sibling(__file__, "countdown")
    c.task.update(dict(num_train=300, num_rl=16, num_eval=16, eval_fraction=0.1))
    c.tokenizer.corpus_problems = 200
    c.model.update(dict(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64))
    c.value_head.hidden = (16,)
    c.search.update(dict(num_slots=2, step_len=12, max_depth=3))
    c.pretrain.update(dict(steps=20, documents=640, batch_size=32, save_every=10, log_every=10))
    c.sft.update(dict(steps=100, batch_size=32, save_every=50, log_every=10))
    c.value.update(dict(problems=64, samples_per_problem=2, rollouts=2, steps=150, batch_size=32, lr=3e-3,
                        save_every=75, log_every=10))
    c.value_refit.update(dict(problems=64, samples_per_problem=2, steps=20, batch_size=32, save_every=10,
                              log_every=10))
    # the search-free baseline (on in countdown) only where a test asks for it: it doubles RL's time
    c.rl.update(dict(iterations=1, problems_per_iteration=8, simulations=3, batch_size=8, search_free_baseline=False))
    c.rl.policy_update.update(dict(steps=5, batch_size=16))
    c.rl.value_update.update(dict(steps=5, batch_size=16))
    c.eval.update(dict(batch_size=16, strategy_problems=8,
                       strategies="greedy:1,best_of_n:2,self_consistency:2,beam:2,mcts:3"))
    return c
