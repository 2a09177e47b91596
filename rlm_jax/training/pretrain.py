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

from rlm_jax import formatting
from rlm_jax.tokenizer import Tokenizer


def documents(task, tok: Tokenizer, num_documents: int, steps_per_document: int, seed: int,
              seq_len: int) -> dict[str, np.ndarray]:
    """`num_documents` padded documents of `steps_per_document` random legal steps each, deterministic in
    `seed`: {"tokens", "mask", "loss_mask"} [num_documents, seq_len]."""
    if not hasattr(task, "random_steps"):
        raise ValueError(f"task {task.name} has no random_steps to pretrain on; set pretrain.steps=0")
    steps = task.random_steps(random.Random(seed), num_documents * steps_per_document)
    docs = []
    for i in range(0, len(steps), steps_per_document):
        ids = [tok.bos_id] + formatting.solution_ids(tok, steps[i:i + steps_per_document])
        docs.append((ids, [False] + [True] * (len(ids) - 1)))
    return formatting.pad_examples(docs, tok.pad_id, seq_len)
