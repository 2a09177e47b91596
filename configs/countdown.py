"""The main job's default: 3-number countdown, a ~0.8M-parameter model, minutes on 2 CPU cores.

    python experiments/train.py --config=configs/countdown.py --workdir=runs/countdown
Scale up by overriding fields (`--config.model.d_model=512 --config.sft.steps=20000 ...`) or with
configs/countdown_pod.py.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    # num_train problems with reference traces for SFT; num_rl more training-split problems that only RL
    # sees, scored by the verifier (their traces are never used): RL's iterations cycle through them. The
    # setting RL from search is for: few solved examples, many problems with a verifier. (With 3,000 traces
    # RL's gain equals the control's, more training on the traces: the search's data is dwarfed.)
    # 768 held-out problems (eval_fraction 0.2: countdown3 has only ~8,700 distinct problems) resolve the
    # phases' greedy differences and, with the strategies on all of them (eval.strategy_problems=0), MCTS
    # against best-of-N.
    # traces_per_problem: SFT on up to that many distinct solutions of each problem (1 = the reference solver's
    # only; tasks that enumerate their solutions). 4 gives 2,062 traces of the 1,000 problems: the policy learns
    # the alternatives, so its samples differ (2.8 distinct finished answers in 8 samples, against 1.5 with one
    # trace per problem) and it sees twice the arithmetic (greedy after SFT 0.201 against 0.118).
    c.task = ml_collections.ConfigDict(dict(
        name="countdown3", levels="1-10", num_train=1000, num_rl=3072, num_eval=768, eval_fraction=0.2,
        traces_per_problem=4))
    c.tokenizer = ml_collections.ConfigDict(dict(vocab_size=300, corpus_problems=1000))
    c.model = ml_collections.ConfigDict(dict(
        d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=384, max_seq_len=160,
        rope_theta=10000.0, tie_embeddings=False, dtype="float32", param_dtype="float32"))
    # Device mesh (parallel.MeshConfig): data x fsdp x tensor, -1 = all remaining devices. Every phase's
    # batches split over data x fsdp, so batch sizes must be multiples of that product.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.value_head = ml_collections.ConfigDict(dict(kind="value", hidden=(128,)))
    # Search shape: K proposals per node, steps of at most L tokens, at most D steps. MCTS: W leaves per
    # iteration (num_parallel, with virtual loss: bigger model batches on accelerators), R rollouts per
    # new node blended into its value with weight alpha (x1's simulations; 0 = the value model alone).
    # proposals: a node's K proposals are independent samples ("sample"; repeats are merged) or drawn
    # without replacement ("distinct"). Measured without pretraining: distinct proposals let RL's search
    # verify more paths (1,449 against 1,200) for the same greedy accuracy after RL (0.293 against 0.289).
    # At test time (eval.proposals) they widen MCTS's tree; that pays only with a value model that can
    # rank the unlikely steps they add: with RL's value MCTS:8 fell from 0.315 to 0.21; with the refit
    # value (value_refit, AUC 0.94) MCTS:16 reaches 0.548 against best-of-8's 0.427 at equal tokens (README).
    c.search = ml_collections.ConfigDict(dict(num_slots=4, step_len=12, max_depth=3, temperature=1.0,
                                              prompt_len=32, num_parallel=1, num_rollouts=0, rollout_alpha=0.5,
                                              proposals="sample"))
    c.seq_len = 64  # training sequence length (prompt + solution)
    # Phase 0 (training/pretrain.py): the base model that x1 gets from Llama. Documents of 5 random legal
    # steps (`12*17=204`; no problems, targets or solutions): the policy learns the arithmetic before SFT.
    # Measured (256 held-out problems, one machine): greedy after SFT 0.301 with these 2,000 steps (15 min)
    # against 0.164 without (pretrain.steps=0): most errors without it are arithmetic slips.
    c.pretrain = ml_collections.ConfigDict(dict(
        steps=2000, documents=40000, steps_per_document=5, batch_size=64, lr=3e-3, warmup_steps=30,
        weight_decay=0.0, clip_norm=1.0, grad_accum=1, save_every=500, log_every=20))
    c.sft = ml_collections.ConfigDict(dict(
        steps=800, batch_size=64, lr=3e-3, warmup_steps=30, weight_decay=0.0, clip_norm=1.0, grad_accum=1,
        save_every=100, log_every=20))
    c.value = ml_collections.ConfigDict(dict(
        problems=256, samples_per_problem=2, rollouts=4, gamma=1.0, steps=200, batch_size=64, lr=1e-3,
        warmup_steps=20, weight_decay=0.0, clip_norm=1.0, loss="mse", save_every=100, log_every=20))
    # value_refit (steps > 0): after RL, refit the value model on the task's exact labels (Task.can_succeed:
    # can this partial solution still reach the target; the verifier for finished ones) of the final
    # policy's samples on the training problems (SFT's and RL's, up to `problems`; samples_per_problem at
    # `temperature`), as a PRM is fit to step labels. The loss sits on a plateau for a few hundred steps,
    # then falls. Measured on the default run's states and batches (held-out finished-state AUC, from 0.56):
    # MSE 1,500 steps 0.65; BCE at lr 1e-3 0.81; BCE at lr 2e-3 0.93 (README).
    c.value_refit = ml_collections.ConfigDict(dict(
        problems=4000, samples_per_problem=4, temperature=0.7, steps=1500, batch_size=64, lr=2e-3,
        warmup_steps=20, weight_decay=0.0, clip_norm=1.0, loss="bce", save_every=250, log_every=20))
    # RL policy update: policy_epochs passes over the replay buffer (at most policy_steps steps), warmup_steps
    # of linear warmup, sft_mix of every batch rehearsing SFT reference traces (their loss added).
    # Measured with 3,000 SFT traces, on 512 held-out problems from one SFT model (greedy 0.197): this update
    # 0.270; 2 epochs without rehearsal or warmup 0.207; DPO with rehearsal 0.191; the control 0.271.
    c.rl = ml_collections.ConfigDict(dict(
        iterations=6, problems_per_iteration=512, simulations=12, preset="puct", batch_size=32,
        algorithm="sft", policy_epochs=8, policy_steps=300, warmup_steps=10, sft_mix=0.5, value_steps=60,
        batch_size_update=64, lr=3e-4, value_lr=5e-4, replay_capacity=4096, clip_eps=0.2, kl_coef=0.01,
        entropy_coef=0.01, dpo_beta=0.1, save_every=1000, log_every=20,
        # Also train the control: the SFT policy with RL's update steps on SFT traces alone (a greedy row of
        # the report), to tell what the search's data added beyond more training.
        control=True))
    c.eval = ml_collections.ConfigDict(dict(
        batch_size=64, strategy_problems=0,
        # strategy:budget entries; budget = samples (best_of_n, self_consistency), beam width (beam,
        # expansions = 2), simulations (mcts). greedy and sample take budget 1.
        strategies="greedy:1,sample:1,best_of_n:4,best_of_n:8,self_consistency:4,self_consistency:8,"
                   "beam:2,beam:4,mcts:8,mcts:16",
        mcts_preset="puct",
        # Sampling temperature of the strategies at test time (RL's search samples at search.temperature).
        # Measured on the default run: T=0.5 beats T=1.0 for every sampled strategy (e.g. MCTS:16 0.19 vs
        # 0.13, best-of-8 0.16 vs 0.14): a small policy's T=1 proposals are mostly wrong.
        temperature=0.5,
        # How MCTS and beam nodes draw their K proposals at test time ("sample" | "distinct"), apart from
        # search.proposals (RL's search): changing one leaves the other as it is ("" = as search.proposals).
        # "distinct" pays with the refit value model only; without it (value_refit.steps=0) use "sample".
        proposals="distinct"))
    return c
