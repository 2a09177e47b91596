"""The pod job: experiments/launch_tpu_pod.sh (checked through --dry-run, with a trap `gcloud` on PATH that
records any call) and configs/countdown_pod.py (validated, ~0.4B parameters, batches divisible on any
slice up to 256 chips). The launch itself cannot run here; every part that can run on a CPU is run.
"""
import functools
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from limits import hang_limit

from rlm_jax import config
from rlm_jax.config_utils import load_config
from rlm_jax.models import transformer
from rlm_jax.training import phases

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "launch_tpu_pod.sh"
POD_CONFIG = ROOT / "configs" / "countdown_pod.py"


def _pinned_jax() -> str:
    m = re.search(r'"jax==([0-9.]+)"', (ROOT / "setup.py").read_text())
    assert m, "setup.py pins no jax version"
    return m.group(1)


def _launch(tmp_path, *args):
    """Run the script; returns (returncode, [argv of each printed command], stderr). A fake gcloud first on
    PATH writes a marker if anything calls it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    marker = tmp_path / "gcloud_called"
    fake = bin_dir / "gcloud"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 1\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))
    out = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=hang_limit())
    assert not marker.exists(), f"gcloud was called: {marker.read_text()}"
    cmds = [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]
    return out.returncode, cmds, out.stderr


def _remote(argv) -> str:
    (cmd,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    syntax = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
    assert syntax.returncode == 0, f"remote command is not valid bash: {syntax.stderr}\n{cmd}"
    return cmd


def _train_argv(remote: str) -> list[str]:
    words = shlex.split(remote)
    i = words.index("experiments/train.py")
    assert words[i - 1] == "~/rlm_jax_venv/bin/python"
    return words[i + 1:]


EXTRA = ["--config.sft.steps=100", "--config.eval.strategies=greedy:1,mcts:16"]


def test_dry_run_prints_create_ship_install_and_run_on_every_worker(tmp_path):
    rc, cmds, err = _launch(tmp_path, "--tpu=my-pod", "--zone=us-central2-b", "--project=proj", "--bucket=gs://bkt/",
                            "--create", "--accelerator=v4-32", "--spot", "--dry-run", "--", *EXTRA)
    assert rc == 0, err
    assert [c[:5] for c in cmds] == [["gcloud", "compute", "tpus", "tpu-vm", "create"],
                                    ["git", "-C", str(ROOT), "archive", "--format=tar.gz"],
                                    ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
                                    ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
                                    ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    create, archive, scp, install, run = cmds
    for c in (create, scp, install, run):
        assert "--zone=us-central2-b" in c and "--project=proj" in c
    assert create[5] == "my-pod" and {"--accelerator-type=v4-32", "--spot"} <= set(create)
    assert any(a.startswith("--version=") for a in create)
    tarball = archive[archive.index("-o") + 1]
    assert archive[-1] == "HEAD" and not Path(tarball).exists()  # printed, not run
    assert scp[5:7] == [tarball, "my-pod:rlm_jax.tar.gz"] and "--worker=all" in scp
    # Install on every worker: Python 3.11 venv, jax[tpu] at setup.py's pin, this package, gcsfuse.
    assert install[5] == "my-pod" and "--worker=all" in install
    inst = _remote(install)
    assert f"jax[tpu]=={_pinned_jax()}" in shlex.split(inst)
    assert "uv venv --seed --python 3.11 ~/rlm_jax_venv" in inst and "pip install -q -e ~/rlm_jax" in inst
    assert "tar -xzf ~/rlm_jax.tar.gz -C ~/rlm_jax" in inst and "apt-get install -y -q gcsfuse" in inst
    # The same run command on every worker: mount the bucket, then train.py with the config and workdir.
    assert run[5] == "my-pod" and "--worker=all" in run
    remote = _remote(run)
    assert "gcsfuse --implicit-dirs --rename-dir-limit=200000 bkt /mnt/bkt" in remote
    assert _train_argv(remote) == ["--config=configs/countdown_pod.py", "--workdir=/mnt/bkt/rlm_jax/my-pod", *EXTRA]
    assert "gs://bkt/rlm_jax/my-pod" in err


def test_launched_train_flags_parse_and_validate(tmp_path):
    """The flags the workers get are accepted by experiments/train.py and give a valid config."""
    rc, cmds, err = _launch(tmp_path, "--tpu=p", "--zone=z", "--bucket=b", "--dry-run", "--", *EXTRA)
    assert rc == 0, err
    argv = _train_argv(_remote(cmds[-1]))
    code = f"""
import json, runpy, sys
from absl import flags
mod = runpy.run_path({str(ROOT / 'experiments' / 'train.py')!r}, run_name="not_main")
sys.argv = ["train.py"] + {argv!r}  # ml_collections reads --config.* overrides from sys.argv
flags.FLAGS(sys.argv)
c = mod["_CONFIG"].value
import jax
from rlm_jax import config
from rlm_jax.training import phases
rc = config.from_configdict(c)
config.check_devices(rc, jax.device_count())
phases.check_workdir({str(tmp_path / 'wd')!r})
print(json.dumps({{"workdir": mod["_WORKDIR"].value, "steps": rc.sft.steps, "strategies": rc.eval.strategies,
                  "d_model": rc.model["d_model"]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=hang_limit(),
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"workdir": "/mnt/b/rlm_jax/p", "steps": 100, "strategies": "greedy:1,mcts:16", "d_model": 1024}


def test_resume_with_skip_install_and_detach_on_a_shared_mount(tmp_path):
    rc, cmds, err = _launch(tmp_path, "--tpu=p", "--zone=z", "--workdir=/nfs/runs/a", "--skip-install", "--detach",
                            "--run=ignored", "--dry-run")
    assert rc == 0, err
    assert len(cmds) == 1 and cmds[0][4] == "ssh" and "--worker=all" in cmds[0]
    assert not any(a.startswith("--project") for a in cmds[0])  # gcloud's default project
    remote = _remote(cmds[0])
    assert "gcsfuse" not in remote and "nohup" in remote and remote.rstrip().endswith("&")
    assert "> ~/rlm_jax_train.log 2>&1" in remote
    assert _train_argv(remote)[:2] == ["--config=configs/countdown_pod.py", "--workdir=/nfs/runs/a"]


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "--bucket=b"], "--tpu=NAME is required"),
    (["--tpu=p", "--bucket=b"], "--zone=ZONE is required"),
    (["--tpu=p", "--zone=z"], "give --bucket=BUCKET"),
    (["--tpu=p", "--zone=z", "--workdir=gs://b/run"], "POSIX file I/O"),
    (["--tpu=p", "--zone=z", "--workdir=runs/x"], "must be an absolute path"),
    (["--tpu=p", "--zone=z", "--bucket=b", "--workdir=/nfs/x"], "not under the bucket mount /mnt/b"),
    (["--tpu=p", "--zone=z", "--bucket=b/sub"], "bucket name, not a path"),
    (["--tpu=p", "--zone=z", "--bucket=b", "--config=configs/nope.py"], "no such file"),
    (["--tpu=p", "--zone=z", "--bucket=b", "--create"], "needs --accelerator"),
    (["--tpu=p", "--zone=z", "--bucket=b", "--workers=all"], "unknown argument '--workers=all'"),
])
def test_bad_arguments_are_refused_with_the_fix(tmp_path, args, message):
    rc, cmds, err = _launch(tmp_path, *args, "--dry-run")
    assert rc == 2 and cmds == [] and message in err, err


def test_help_and_syntax(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    rc, cmds, _ = _launch(tmp_path, "--help")
    assert rc == 0 and cmds == []


# ------------------------------------------------------------------------------------------- config

def test_pod_config_validates_and_is_pod_sized(tmp_path):
    c = config.from_configdict(load_config(POD_CONFIG))
    config.check_devices(c, jax.device_count())
    phases.check_workdir(tmp_path / "wd")
    cfg = c.model_config(c.tokenizer.vocab_size)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(transformer.abstract_params(cfg)))
    assert 3e8 <= n <= 5e8, f"{n / 1e6:.0f}M parameters"
    assert cfg.dtype == "bfloat16" and cfg.param_dtype == "float32"
    # Problems enough for the value and RL phases.
    assert c.task.num_train >= c.value.problems and c.task.num_rl >= c.rl.problems_per_iteration
    # FSDP over every device of the slice; every batch divides over any slice up to 256 chips.
    for devices in (4, 8, 16, 32, 64, 128, 256):
        assert c.mesh.resolve(devices) == (1, devices, 1)
        config.check_devices(c, devices)
    for name in ("pretrain.batch_size", "sft.batch_size", "value.batch_size", "rl.batch_size",
                 "rl.policy_update.batch_size", "rl.value_update.batch_size", "value_refit.batch_size",
                 "eval.batch_size"):
        assert functools.reduce(getattr, name.split("."), c) % 256 == 0, name
    # Weights shard evenly over fsdp on a 64-chip slice (embed and mlp dims divisible).
    assert cfg.d_model % 64 == 0 and cfg.mlp_dim % 64 == 0
