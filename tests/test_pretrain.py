"""Pretraining documents: random legal steps in the trace format, the loss on every token after BOS."""
import random

import numpy as np
import pytest

from rlm_jax import formatting
from rlm_jax.tasks import get_task
from rlm_jax.tokenizer import SentencePieceTokenizer
from rlm_jax.training import pretrain


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    task = get_task("countdown3")
    problems = [task.generate(s, 0.5) for s in range(200)]
    corpus = [task.prompt(p) + "\n" + "\n".join(task.solve(p)) for p in problems]
    return task, SentencePieceTokenizer.train(corpus, vocab_size=300, out=tmp_path_factory.mktemp("tok"))


def test_documents_hold_the_tasks_random_steps_with_loss_after_bos(setup):
    task, tok = setup
    seed = random.randrange(1 << 30)
    arrays = pretrain.documents(task, tok, num_documents=12, steps_per_document=4, seed=seed, seq_len=64)
    assert arrays["tokens"].shape == arrays["mask"].shape == arrays["loss_mask"].shape == (12, 64)
    expected = task.random_steps(random.Random(seed), 12 * 4)
    for r in range(12):
        ids = arrays["tokens"][r][arrays["mask"][r]]
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id  # [BOS] s1 [STEP] ... s4 [EOS], as in a trace
        steps = [formatting.step_text(tok, s) for s in formatting.split_generated(tok, ids[1:])]
        assert steps == expected[4 * r:4 * r + 4]
        loss = arrays["loss_mask"][r][arrays["mask"][r]]
        assert not loss[0] and loss[1:].all()
        assert not arrays["loss_mask"][r][~arrays["mask"][r]].any()
    again = pretrain.documents(task, tok, num_documents=12, steps_per_document=4, seed=seed, seq_len=64)
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)


def test_documents_need_a_task_with_random_steps(setup):
    _, tok = setup
    with pytest.raises(ValueError, match="pretrain.steps=0"):
        pretrain.documents(get_task("prontoqa"), tok, 4, 2, 0, 64)


def test_documents_that_do_not_fit_name_the_fix(setup):
    task, tok = setup
    with pytest.raises(ValueError, match="raise the sequence length"):
        pretrain.documents(task, tok, 4, 20, 0, 32)
