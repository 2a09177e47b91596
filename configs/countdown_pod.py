"""The main job at pod scale: a ~0.38B-parameter policy (and value model) on a Cloud TPU pod slice.

    experiments/launch_tpu_pod.sh --tpu=NAME --zone=ZONE --bucket=BUCKET     (see docs/pod.md)

The phases of configs/countdown.py on the full Countdown of Stream of Search (4 numbers in 1..99,
target 10..100; countdown3 has too few distinct problems for this much data), a Llama-style 24-layer
model (d_model 1024, GQA 16/8 heads, SwiGLU 4096, bf16 compute, f32 params), larger batches and
search budgets. Generating the 20k SFT, 8k RL-only and 1k held-out problems takes ~15-30 minutes of
one host's CPU (once: resumed runs reuse them).
`mesh` is FSDP over every device of every host (data=1, fsdp=-1, tensor=1): params and optimizer
state are split over all chips, the batch too. Every batch size here is a multiple of 256, so it
divides over any slice up to 256 chips (v4-32: 16 chips, v5e-64: 64, v5p-128: 64, ...).
"""
from rlm_jax.config_utils import sibling


def get_config():
    c = sibling(__file__, "countdown")
    c.task.update(dict(name="countdown", num_train=20000, num_rl=8192, num_eval=1024, eval_fraction=0.1))
    c.tokenizer.corpus_problems = 5000
    c.model.update(dict(d_model=1024, num_layers=24, num_heads=16, num_kv_heads=8, mlp_dim=4096,
                        max_seq_len=256, dtype="bfloat16", param_dtype="float32"))
    c.value_head.hidden = (1024,)
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))  # -1 = all remaining devices
    c.pretrain.update(dict(steps=2000, documents=400000, batch_size=512, lr=3e-4, warmup_steps=500,
                           weight_decay=0.1, save_every=500, log_every=50))
    c.sft.update(dict(steps=2000, batch_size=512, lr=3e-4, warmup_steps=500, weight_decay=0.1,
                      save_every=500, log_every=50))
    c.value.update(dict(problems=8192, samples_per_problem=4, rollouts=8, steps=2000, batch_size=512,
                        lr=1e-4, warmup_steps=200, weight_decay=0.1, save_every=500, log_every=50))
    c.value_refit.update(dict(problems=8192, batch_size=512, lr=1e-4, warmup_steps=200, save_every=500, log_every=50))
    c.rl.update(dict(iterations=4, problems_per_iteration=4096, simulations=64, batch_size=256,
                     replay_capacity=65536))
    # c.rl.search_free_baseline stays on (countdown's): RL's iterations again, sampled, at the search's tokens
    c.rl.policy_update.update(dict(steps=400, batch_size=512, lr=2e-5, save_every=200, log_every=50))
    c.rl.value_update.update(dict(steps=400, batch_size=512, lr=2e-5, save_every=200, log_every=50))
    c.eval.update(dict(batch_size=256, strategy_problems=0,
                       strategies="greedy:1,sample:1,best_of_n:4,best_of_n:16,best_of_n:64,"
                                  "self_consistency:16,self_consistency:64,beam:4,beam:16,mcts:16,mcts:64,"
                                  "mcts:256"))
    return c
