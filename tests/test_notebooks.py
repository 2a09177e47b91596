"""The colab notebooks run top to bottom on CPU (nbclient, smallest settings: RLM_NOTEBOOK_SMALL=1).

Each notebook runs in a fresh kernel of this interpreter (a `python3` kernelspec registered in a
temporary JUPYTER_PATH, so a missing or foreign python3 kernelspec does not matter), with its working
directory in colab/ (configs are found at ../configs) and its run written to a temporary folder.
"""
import json
import os
import sys
import time
from pathlib import Path

import pytest
from limits import hang_limit

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

COLAB = Path(__file__).resolve().parents[1] / "colab"
# Seconds per cell: only a hung kernel should trip it, so generous, and more on a loaded machine (other jobs
# sharing the cores slow every cell down).
CELL_TIMEOUT = hang_limit()


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
    """A folder holding kernels/python3/kernel.json that starts ipykernel with sys.executable."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (rlm_jax tests)", "language": "python"}))
    return str(root)


def run_notebook(name, workdir, jupyter_path):
    """Executes colab/<name>; returns (notebook with outputs, seconds). Fails on the first error cell."""
    nb = nbformat.read(COLAB / name, as_version=4)
    env = {**os.environ, "RLM_NOTEBOOK_SMALL": "1", "RLM_NOTEBOOK_WORKDIR": str(workdir), "RLM_NO_PROGRESS": "1",
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "JUPYTER_PATH": os.pathsep.join(p for p in (jupyter_path, os.environ.get("JUPYTER_PATH")) if p)}
    for var in ("RLM_NOTEBOOK_SIZE", "RLM_HF_CHECKPOINT", "MPLBACKEND"):
        env.pop(var, None)
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = env["JUPYTER_PATH"]  # the kernelspec lookup reads it in this process
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(COLAB)}})
    t0 = time.perf_counter()
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as e:
        nbformat.write(nb, Path(workdir) / name)
        pytest.fail(f"{name}: a cell failed:\n{str(e)[-4000:]}")
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old
    seconds = time.perf_counter() - t0
    print(f"{name}: {seconds:.0f}s")
    nbformat.write(nb, Path(workdir) / name)  # the executed notebook, to look at after a failure
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{name}: error output {errors[0].get('ename')}: {errors[0].get('evalue')}"
    return nb, seconds


def text_of(nb) -> str:
    """Everything the notebook printed or displayed as text."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                parts += [out.data.get("text/plain", ""), out.data.get("text/markdown", "")]
    return "\n".join(parts)


def images_of(nb) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", []))


def test_notebooks_are_committed_without_outputs():
    for name in ("quickstart.ipynb", "tpu_scale.ipynb"):
        nb = nbformat.read(COLAB / name, as_version=4)
        nbformat.validate(nb)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not dirty, f"{name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.slow
def test_quickstart_trains_searches_and_plots(tmp_path, jupyter_path):
    nb, seconds = run_notebook("quickstart.ipynb", tmp_path, jupyter_path)
    run = tmp_path / "quickstart_test"
    assert (run / "report.md").is_file() and (run / "scaling.png").is_file()
    results = json.loads((run / "eval.json").read_text())["results"]
    assert {r["strategy"] for r in results} >= {"greedy", "mcts"}
    text = text_of(nb)
    assert "SIZE='test'" in text
    assert "| greedy |" in text  # the report, displayed
    assert "MCTS tree:" in text and "N=" in text and "V=" in text  # the tree, printed
    assert "solution (" in text
    assert images_of(nb) >= 1  # the test-time-compute plot


@pytest.mark.slow
def test_tpu_scale_shards_trains_and_matches_transformers(tmp_path, jupyter_path):
    nb, seconds = run_notebook("tpu_scale.ipynb", tmp_path, jupyter_path)
    text = text_of(nb)
    assert "8 devices (cpu)" in text
    assert "mesh: {'data': 2, 'fsdp': 2, 'tensor': 2}" in text
    assert "'fsdp'" in text and "'tensor'" in text and "shard (" in text  # param shardings shown
    assert "max |logits - transformers|" in text
    assert (tmp_path / "tiny_qwen2" / "config.json").is_file()
    assert images_of(nb) >= 1  # the loss curve


def _cell(name: str, marker: str) -> str:
    nb = nbformat.read(COLAB / name, as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code" and marker in c.source)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "tpu_scale.ipynb"])
def test_install_cell_finds_an_uploaded_checkout(name, tmp_path, monkeypatch):
    """The install cell's fallback: an uploaded rlm_jax.zip of the repository is unpacked and found (pip install
    -e runs on it only where rlm_jax is not importable, so not here); REPO_URL is a setting at the top."""
    import zipfile
    source = _cell(name, "REPO_URL")
    assert source.index("REPO_URL =") < source.index("def find_checkout")
    with zipfile.ZipFile(tmp_path / "rlm_jax.zip", "w") as z:
        z.writestr("rlm_jax-main/setup.py", "")
        z.writestr("rlm_jax-main/rlm_jax/__init__.py", "")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(source, name, "exec"), scope)
    assert scope["CHECKOUT"] == (tmp_path / "rlm_jax_upload" / "rlm_jax-main").resolve()


def test_quickstart_cpu_setting_is_minutes_not_the_full_run(monkeypatch):
    """SIZE='cpu' shrinks configs/countdown.py: no 2,000 pretraining steps on 40,000 documents."""
    monkeypatch.chdir(COLAB)
    monkeypatch.setenv("RLM_NOTEBOOK_SIZE", "cpu")
    monkeypatch.setenv("RLM_NOTEBOOK_WORKDIR", "/nonexistent")
    scope: dict = {}
    for marker in ("REPO_URL", "SIZE =", "def find_config"):
        exec(compile(_cell("quickstart.ipynb", marker), "quickstart.ipynb", "exec"), scope)
    rc, full = scope["rc"], scope["config"].from_configdict(scope["load_config"]("countdown.py"))
    assert scope["SIZE"] == "cpu"
    assert rc.pretrain.steps * rc.pretrain.batch_size <= full.pretrain.steps * full.pretrain.batch_size / 5
    assert rc.pretrain.documents <= full.pretrain.documents / 5
    assert rc.sft.steps < full.sft.steps and rc.value_refit.steps < full.value_refit.steps
