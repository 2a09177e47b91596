"""Phase 0, pretraining: next-token loss on documents of a task's random legal steps.

A reasoning model is built on a base model that already knows the domain's operations (x1 starts from
Llama); ours train from scratch, so this phase gives them that base. For countdown a document is
`[BOS] 12*17=204 [STEP] 204-3=201 [STEP] ... [EOS]`: steps of random playouts from random number sets
(`Task.random_steps`), with no problem, target or reference solution in it, so it teaches the
arithmetic and the step format, not the held-out answers. The loss covers every token after BOS.
"""
from __future__ import annotations

import random

import numpy as np

from rlm_jax import formatting, parallel
from rlm_jax.tokenizer import Tokenizer
from rlm_jax.training import steps, trainer
from rlm_jax.training.phases import Phase


def documents(task, tok: Tokenizer, num_documents: int, steps_per_document: int, seed: int,
              seq_len: int) -> dict[str, np.ndarray]:
    """`num_documents` padded documents of `steps_per_document` random legal steps each, deterministic in
    `seed`: {"tokens", "mask", "loss_mask"} [num_documents, seq_len]."""
    if not task.capabilities.random_steps:
        raise ValueError(f"task {task.name} has no random_steps to pretrain on; set pretrain.steps=0")
    steps = task.random_steps(random.Random(seed), num_documents * steps_per_document)
    docs = []
    for i in range(0, len(steps), steps_per_document):
        ids = [tok.bos_id] + formatting.solution_ids(tok, steps[i:i + steps_per_document])
        docs.append((ids, [False] + [True] * (len(ids) - 1)))
    return formatting.pad_examples(docs, tok.pad_id, seq_len)


def _pretrain(run, results):
    """The policy's pretrained params, from random ones."""
    c, tok, cfg = run.c.pretrain, results["tokenizer"], run.model_config(results)
    params = parallel.init_sharded_params(cfg, run.phase_key("pretrain"), run.mesh)
    arrays = documents(run.task, tok, c.documents, c.steps_per_document, run.c.seed, run.c.seq_len)
    run.log(f"pretrain: {len(arrays['tokens'])} documents of {c.steps_per_document} random {run.c.task.name} steps")
    return trainer.train("pretrain", c, trainer.Objective(steps.next_token_loss, (cfg,)), cfg, params,
                         trainer.example_batches(arrays, c.batch_size, run.c.seed), run.workdir / "pretrain" / "ckpt",
                         run.writer, run.mesh)


PHASE = Phase("pretrain", _pretrain, like=lambda run, results: run.like(run.model_config(results)),
              enabled=lambda c: c.pretrain.steps > 0 and c.init_folder() is None)  # model.init: pretrained already
