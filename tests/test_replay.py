"""Replay buffer (rlm_jax.training.replay): FIFO contents against a deque model, padding, clear errors,
sampling support and prioritised frequencies."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rlm_jax.training import replay

L = 8
# jitted once per shape: eager dispatch of every field's pad/scatter op costs more than the compile
add = jax.jit(replay.add)
sample = jax.jit(replay.sample,
                 static_argnames=("batch_size", "priority", "alpha", "eps", "half_life", "beta"))


def make_samples(ids, width=6, fields=replay.STEP_FIELDS, advantage=None):
    """Rows whose every field is derived from an integer id (`group` holds the id itself)."""
    ids = np.asarray(ids, np.int32)
    n = len(ids)
    out = {}
    for name, dt in fields.items():
        kind = replay.field_kind(name)
        if kind == "token":
            if name.endswith("tokens"):
                x = (ids[:, None] * 10 + np.arange(width)) % 97 + 1
            else:
                x = np.ones((n, width))
        elif kind == "target":
            x = -ids[:, None] - np.arange(width - 1) / 10.0
        else:
            x = ids.astype(np.float64)
        out[name] = np.asarray(x).astype(np.dtype(dt))
    if advantage is not None:
        out["advantage"] = np.asarray(advantage, np.float32)
    return out


def test_fifo_overwrites_the_oldest_rows():
    buf = replay.init(5, L)
    buf = add(buf, make_samples([0, 1, 2]))
    assert (int(buf.size), int(buf.ptr), int(buf.count)) == (3, 3, 3)
    buf = add(buf, make_samples([3, 4, 5, 6]))
    assert (int(buf.size), int(buf.ptr), int(buf.count)) == (5, 2, 7)
    got = replay.contents(buf)
    np.testing.assert_array_equal(got["group"], [2, 3, 4, 5, 6])
    np.testing.assert_array_equal(got["_stamp"], [2, 3, 4, 5, 6])
    # one call with more rows than the capacity keeps the newest
    buf = add(buf, make_samples(np.arange(100, 112)))
    np.testing.assert_array_equal(replay.contents(buf)["group"], np.arange(107, 112))
    assert int(buf.count) == 19


def test_rows_are_left_padded_to_the_buffer_width():
    buf = add(replay.init(4, L), make_samples([7, 8], width=5))
    got = replay.contents(buf)
    src = make_samples([7, 8], width=5)
    np.testing.assert_array_equal(got["tokens"][:, 3:], src["tokens"])
    np.testing.assert_array_equal(got["tokens"][:, :3], 0)
    np.testing.assert_array_equal(got["mask"], np.arange(L)[None].repeat(2, 0) >= 3)
    # log-probs stay aligned with their tokens: entry t scores token t + 1
    np.testing.assert_array_equal(got["old_logprobs"][:, 3:], src["old_logprobs"])
    np.testing.assert_array_equal(got["old_logprobs"][:, :3], 0)


def test_clear_errors():
    buf = replay.init(4, L)
    with pytest.raises(ValueError, match=r"'tokens'.* 11 tokens .*width is 8"):
        replay.add(buf, make_samples([1], width=11))
    bad = make_samples([1])
    bad["old_logprobs"] = bad["old_logprobs"][:, 1:]
    with pytest.raises(ValueError, match="tokens - 1"):
        replay.add(buf, bad)
    with pytest.raises(KeyError, match="advantage"):
        replay.add(buf, {k: v for k, v in make_samples([1]).items() if k != "advantage"})
    with pytest.raises(KeyError, match="extra_field"):
        replay.add(buf, {**make_samples([1]), "extra_field": np.zeros(1)})
    with pytest.raises(ValueError, match="empty"):
        replay.sample(buf, jax.random.key(0), 2)


def test_pair_buffer_round_trip():
    buf = replay.init(3, L, fields=replay.PAIR_FIELDS)
    buf = add(buf, make_samples([4, 5], fields=replay.PAIR_FIELDS))
    batch, idx = sample(buf, jax.random.key(0), 6)
    assert set(batch) == set(replay.PAIR_FIELDS)
    assert batch["chosen_tokens"].shape == (6, L) and batch["rejected_ref_logprobs"].shape == (6, L - 1)
    assert set(np.asarray(batch["group"]).tolist()) <= {4, 5}


def test_sampling_returns_only_stored_rows():
    buf = add(replay.init(16, L), make_samples(np.arange(5)))
    for priority in (None, "advantage", "recency"):
        batch, idx = sample(buf, jax.random.key(1), 200, priority=priority, eps=1.0, beta=0.5)
        idx = np.asarray(idx)
        assert idx.min() >= 0 and idx.max() < 5, priority
        np.testing.assert_array_equal(np.asarray(batch["group"]), idx)  # row i holds id i here
        np.testing.assert_array_equal(np.asarray(batch["tokens"]), replay.contents(buf)["tokens"][idx])
        assert len(set(idx.tolist())) == 5, priority  # every stored row is reachable


def _check_frequencies(idx, p, n):
    counts = np.bincount(np.asarray(idx), minlength=len(p))
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 5 * sigma + 1), (counts, n * p)


def test_prioritised_frequencies_follow_priorities():
    adv = np.array([0.0, 0.5, -1.0, 2.0, -4.0, 0.25], np.float32)
    buf = add(replay.init(8, L), make_samples(np.arange(6), advantage=adv))
    n = 40000
    _, idx = sample(buf, jax.random.key(2), n, priority="advantage", alpha=0.7, eps=0.1)
    p = (np.abs(adv) + 0.1) ** 0.7
    p = np.concatenate([p / p.sum(), [0.0, 0.0]])
    _check_frequencies(idx, p, n)
    # recency: the newest row has age 0; half_life 2 halves the weight every two rows back
    _, idx = sample(buf, jax.random.key(3), n, priority="recency", half_life=2.0)
    p = 0.5 ** (np.arange(5, -1, -1) / 2.0)
    _check_frequencies(idx, np.concatenate([p / p.sum(), [0.0, 0.0]]), n)


def test_importance_weights():
    adv = np.array([1.0, 3.0, 0.0], np.float32)
    buf = add(replay.init(4, L), make_samples(np.arange(3), advantage=adv))
    batch, idx = sample(buf, jax.random.key(4), 64, priority="advantage", eps=1.0, beta=0.5)
    p = (np.abs(adv) + 1.0) / (np.abs(adv) + 1.0).sum()
    w = (3 * p) ** -0.5
    np.testing.assert_allclose(batch["sample_weight"], (w / w.max())[np.asarray(idx)], rtol=1e-5)
    batch, _ = sample(buf, jax.random.key(4), 8, beta=0.5)
    np.testing.assert_array_equal(batch["sample_weight"], 1.0)


def test_jitted_add_does_not_retrace_per_write_position():
    traces = []

    def counted_add(b, rows):
        traces.append(1)
        return replay.add(b, rows)

    add_once = jax.jit(counted_add)
    buf = replay.init(6, L)
    for start in range(0, 20, 4):
        buf = add_once(buf, make_samples(np.arange(start, start + 4)))
    np.testing.assert_array_equal(replay.contents(buf)["group"], np.arange(14, 20))
    assert len(traces) == 1


# few distinct capacities and batch sizes, so the jitted add/sample compile a bounded number of shapes
@settings(max_examples=20, deadline=None)
@given(capacity=st.sampled_from([1, 3, 5]), adds=st.lists(st.integers(0, 7), min_size=1, max_size=5),
       batch_size=st.sampled_from([1, 4]), seed=st.integers(0, 2**16))
def test_fuzz_against_a_deque(capacity, adds, batch_size, seed):
    buf = replay.init(capacity, L, fields={"tokens": jnp.int32, "mask": jnp.bool_, "group": jnp.int32})
    model = collections.deque(maxlen=capacity)
    next_id = 0
    for n in adds:
        ids = np.arange(next_id, next_id + n)
        next_id += n
        rows = {"tokens": np.tile(ids[:, None] % 50 + 1, (1, 3)), "mask": np.ones((n, 3), bool), "group": ids}
        buf = add(buf, rows)
        model.extend(ids.tolist())
    assert int(buf.size) == len(model) and int(buf.count) == next_id
    np.testing.assert_array_equal(replay.contents(buf)["group"], np.array(model, np.int32).reshape(-1))
    if model:
        for priority in (None, "recency"):
            batch, idx = sample(buf, jax.random.key(seed), batch_size, priority=priority)
            assert set(np.asarray(batch["group"]).tolist()) <= set(model)
            assert np.all(np.asarray(idx) < len(model))
