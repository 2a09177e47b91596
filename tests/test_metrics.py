"""MetricsWriter (JSONL + TensorBoard), read_metrics, and the progress bar."""
import io
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax import metrics as mx


def _tb_scalars(logdir):
    """{tag: [(step, value)]} parsed from the TFRecord event files under `logdir`."""
    from tensorboardX.proto import event_pb2
    out = {}
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file in {logdir}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):  # record: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_jsonl_roundtrip_and_tensorboard(tmp_path):
    rng = np.random.default_rng()
    loss = [float(x) for x in rng.uniform(0.1, 5.0, size=3)]
    with mx.MetricsWriter(tmp_path, is_primary=True) as w:
        for step, l in enumerate(loss):
            got = w.write(step * 10, {"loss": jnp.float32(l), "acc": np.float64(l / 10), "n": np.int32(step),
                                      "ok": jnp.bool_(step % 2 == 0), "lr": jnp.asarray(l, jnp.bfloat16)},
                          prefix="sft")
            assert type(got["loss"]) is float and type(got["n"]) is int and type(got["ok"]) is bool
        w.write(5, {"value_loss": float("nan")}, prefix="value")

    recs = mx.read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [0, 10, 20, 5]
    assert [r["prefix"] for r in recs] == ["sft"] * 3 + ["value"]
    assert all(isinstance(r["time"], float) and r["time"] > 1.6e9 for r in recs)
    for r, l in zip(recs, loss):
        assert r["loss"] == pytest.approx(l, rel=1e-6) and r["acc"] == l / 10
        assert r["lr"] == pytest.approx(l, rel=1e-2)
    assert [r["ok"] for r in recs[:3]] == [True, False, True] and [r["n"] for r in recs[:3]] == [0, 1, 2]
    assert math.isnan(recs[3]["value_loss"])
    assert len(mx.read_metrics(tmp_path, prefix="value")) == 1

    tb = _tb_scalars(tmp_path / mx.TENSORBOARD_DIR)
    assert [s for s, _ in tb["sft/loss"]] == [0, 10, 20]
    np.testing.assert_allclose([v for _, v in tb["sft/loss"]], loss, rtol=1e-6)
    assert "value/value_loss" in tb

    # A resumed run appends to the same file.
    with mx.MetricsWriter(tmp_path, tensorboard=False, is_primary=True) as w:
        w.write(30, {"loss": 0.5}, prefix="sft")
    assert [r["step"] for r in mx.read_metrics(tmp_path, prefix="sft")] == [0, 10, 20, 30]


def test_non_primary_writes_nothing(tmp_path):
    w = mx.MetricsWriter(tmp_path / "run", is_primary=False)
    assert w.write(1, {"loss": jnp.float32(2.0)}) == {"loss": 2.0}
    w.close()
    assert not (tmp_path / "run").exists()
    assert mx.read_metrics(tmp_path / "run") == []


def test_bad_metrics_and_files(tmp_path):
    w = mx.MetricsWriter(tmp_path, tensorboard=False, is_primary=True)
    with pytest.raises(ValueError, match=r"'logits' has shape \(2,\)"):
        w.write(0, {"logits": jnp.zeros(2)})
    with pytest.raises(ValueError, match="reserved"):
        w.write(0, {"step": 1})
    w.write(0, {"loss": 1.0})
    w.write(1, {"loss": 2.0})
    w.close()
    path = tmp_path / mx.METRICS_FILE
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # the process died mid-line
    assert [r["loss"] for r in mx.read_metrics(tmp_path)] == [1.0, 2.0]
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", lines[1]]) + "\n")
    with pytest.raises(ValueError, match=f"{path} line 2"):
        mx.read_metrics(tmp_path)


def test_progress_bar(monkeypatch):
    monkeypatch.delenv("RLM_NO_PROGRESS", raising=False)
    out = io.StringIO()
    bar = mx.progress(10, desc="sft", initial=4, is_primary=True, file=out, mininterval=0)
    assert not bar.disable
    bar.set_metrics({"loss": jnp.float32(0.523), "accuracy": np.float64(0.8125), "tiny": 1e-7})
    bar.update(2)
    bar.close()
    text = out.getvalue()
    assert "sft" in text and "6/10" in text
    assert "loss=0.523" in text and "accuracy=0.8125" in text and "tiny=1.000e-07" in text

    items = list(mx.progress(range(5), desc="eval", is_primary=True, file=io.StringIO()))
    assert items == list(range(5))

    assert mx.progress(3, is_primary=False).disable
    monkeypatch.setenv("RLM_NO_PROGRESS", "1")
    quiet = io.StringIO()
    bar = mx.progress(range(3), desc="x", is_primary=True, file=quiet)
    assert bar.disable and list(bar) == [0, 1, 2]
    bar.set_metrics({"loss": 1.0})  # a no-op, not an error
    assert quiet.getvalue() == ""


def test_a_resumed_run_keeps_one_row_per_step(tmp_path):
    """Steps repeated after a resume (from the checkpoint at 10, after writing 20 and 30) replace the old rows."""
    with mx.MetricsWriter(tmp_path, tensorboard=False, is_primary=True) as w:
        for step in (10, 20, 30):
            w.write(step, {"loss": float(step)}, prefix="sft")
        w.write(0, {"acc": 0.5}, prefix="value_eval")
    with mx.MetricsWriter(tmp_path, tensorboard=False, is_primary=True) as w:  # resumed from step 10
        w.write(20, {"loss": -20.0}, prefix="sft")
        w.write(30, {"loss": -30.0}, prefix="sft")
        w.write(40, {"loss": -40.0}, prefix="sft")
    sft = mx.read_metrics(tmp_path, prefix="sft")
    assert [(r["step"], r["loss"]) for r in sft] == [(10, 10.0), (20, -20.0), (30, -30.0), (40, -40.0)]
    assert [r["acc"] for r in mx.read_metrics(tmp_path, prefix="value_eval")] == [0.5]  # other prefixes kept


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_progress_in_a_log_file_is_a_line_every_n_steps(monkeypatch):
    """Not a terminal: whole lines, one per `every` steps and the finished state once, no carriage returns."""
    monkeypatch.delenv("RLM_NO_PROGRESS", raising=False)
    out = io.StringIO()
    bar = mx.progress(20, desc="sft", is_primary=True, file=out, every=5)
    for _ in range(20):
        bar.set_metrics({"loss": 0.5})
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == ["0/20", "5/20", "10/20", "15/20", "20/20"]
    assert "loss=0.5" in lines[-1]


def test_first_step_is_timed_apart_from_the_eta(monkeypatch):
    """The first step compiles (100 s here); the ETA after it counts only the 1-second steps that follow."""
    monkeypatch.delenv("RLM_NO_PROGRESS", raising=False)
    clock = _Clock()
    monkeypatch.setattr("tqdm.std.time", clock)
    out = io.StringIO()
    bar = mx.progress(11, desc="sft", is_primary=True, file=out, every=1)
    clock.t += 100
    bar.update(1)
    assert "[first step 100.0s]" in bar.desc
    assert "<?" in out.getvalue().splitlines()[-1]  # no warm step timed yet: no ETA, not 1000 s
    for _ in range(5):
        clock.t += 1
        bar.update(1)
    assert "<00:05," in out.getvalue().splitlines()[-1]  # 5 steps left at 1 s each
    bar.close()
