"""Training from a pretrained Hugging Face folder: `model.init="hf:DIR"` in every phase, and the export back.

The folder is a random-weight Qwen2 (q/k/v biases) over a byte-level BPE trained here on countdown text: real
file formats of both, small enough to train in seconds. References: transformers' own model and tokenizer.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from rlm_jax import config, formatting
from rlm_jax.config_utils import load_config
from rlm_jax.models import hf, lora, transformer
from rlm_jax.tasks import get_task
from rlm_jax.tokenizer import HFTokenizer
from rlm_jax.training import data, phases, pretrain, sft, value

from helpers_hf import CHATML_TEMPLATE, make_tiny_hf_checkpoint, save_small_bpe_tokenizer, torch_logits

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
ENV = {**os.environ, "RLM_NO_PROGRESS": "1", "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A Qwen2-family folder (config.json, model.safetensors, tokenizer) of the size of configs/tiny.py."""
    task = get_task("countdown")
    corpus = [task.prompt(p) + "\n" + "\n".join(task.solve(p))  # seeds apart from the runs' own problems
              for p in (task.generate(10_000 + s, d) for d in (0.0, 0.5, 1.0) for s in range(100))]
    path = tmp_path_factory.mktemp("qwen2_tiny")
    save_small_bpe_tokenizer(path, corpus, vocab_size=400)
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(str(path)))
    tok_files = {f.name: f.read_bytes() for f in path.iterdir()}
    make_tiny_hf_checkpoint(path, "qwen2", tie=False, num_kv_heads=1, seed=3, init_std=0.05, vocab_size=n,
                            hidden_size=32, intermediate_size=64, num_attention_heads=2, max_position_embeddings=256,
                            eos_token_id=n - 1)
    for name, content in tok_files.items():  # save_pretrained of the model leaves them; keep them exact
        (path / name).write_bytes(content)
    return path


@pytest.fixture(scope="module")
def value_folder(folder, tmp_path_factory):
    """Another width and depth (d_model 48, 3 layers, tied embeddings) over the same tokenizer: a value model's own
    folder. Same family: transformers picks a tokenizer's pre-tokenizer by the folder's model_type, so a Llama
    config over these files would split text differently (initial_trunk refuses that)."""
    path = tmp_path_factory.mktemp("qwen2_value")
    n = hf.config_from_hf(folder).vocab_size
    make_tiny_hf_checkpoint(path, "qwen2", tie=True, num_kv_heads=2, seed=5, init_std=0.05, vocab_size=n,
                            hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3,
                            max_position_embeddings=256)
    for f in folder.iterdir():
        if "token" in f.name or f.suffix in (".txt", ".model", ".jinja"):
            (path / f.name).write_bytes(f.read_bytes())
    return path


def tiny_config(folder, **overrides) -> config.RunConfig:
    cd = load_config(TINY)
    cd.model.init = f"hf:{folder}"
    for k, v in overrides.items():
        section, field = k.split(".")
        cd[section][field] = v
    return config.from_configdict(cd)


def test_the_model_section_is_the_folders_config(folder):
    c = tiny_config(folder)
    want = hf.config_from_hf(folder)
    assert c.model_config(10**6) == want  # the vocabulary is the folder's, whatever the tokenizer section says
    assert want.qkv_bias and want.d_model == 32  # Qwen2, the folder's own shape (tiny.py's d_model is 32 too)
    assert c.init_folder() == Path(folder)
    assert not pretrain.PHASE.enabled(c)  # the model is pretrained: phase 0 is skipped
    assert not config.from_configdict(load_config(TINY)).init_folder()


@pytest.mark.parametrize("init, words", [
    ("hf:/no/such/folder", ["model.init", "/no/such/folder", "config.json"]),
    ("/a/folder/without/prefix", ["model.init", "hf:"]),
    ("hf:{bad}", ["model.init", "model_type", "gpt2", "llama"]),
])
def test_a_bad_init_names_the_field_and_the_fix(folder, tmp_path, init, words):
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    cd = load_config(TINY)
    cd.model.init = init.replace("{bad}", str(bad))
    with pytest.raises(ValueError) as e:
        config.from_configdict(cd)
    for w in words:
        assert w in str(e.value)


def test_the_first_phases_read_the_folder_and_sft_starts_from_its_weights(folder, tmp_path):
    c = tiny_config(folder)
    run, results = phases.run_phases(c, tmp_path / "run", (data.DATA, data.TOKENIZER))
    tok = results["tokenizer"]
    assert isinstance(tok, HFTokenizer)
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(folder))
    problem = results["data"]["train"][0]
    ids, _ = formatting.sft_example(tok, run.task, problem, run.task.solve(problem))
    text = run.task.prompt(problem)
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert tok.eos_id == ref.eos_token_id and ids[-1] == tok.eos_id

    params = sft.initial_policy(run, results)  # on the run's mesh (8 simulated devices)
    cfg = run.model_config(results)
    tokens = np.asarray([ids], np.int32)
    mask = np.ones_like(tokens, bool)
    ours, _ = transformer.forward(cfg, params, tokens, mask=mask)[:2]
    np.testing.assert_allclose(np.asarray(ours), torch_logits(folder, tokens, mask), atol=1e-4, rtol=1e-4)


def _run(args, **kw):
    proc = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, cwd=ROOT, **kw)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_every_phase_trains_from_the_folder_and_the_policy_exports_back(folder, tmp_path, lora_rank):
    workdir, out = tmp_path / "run", tmp_path / "exported"
    _run(["experiments/train.py", f"--config={TINY}", f"--workdir={workdir}", f"--config.model.init=hf:{folder}",
          "--config.rl.algorithm=ppo", "--config.sft.steps=60", "--config.value.steps=40",
          f"--config.model.lora_rank={lora_rank}"])
    progress = json.loads((workdir / "progress.json").read_text())["phases"]
    assert "pretrain" not in progress or not progress["pretrain"].get("done")
    for phase in ("tokenizer", "sft", "value", "rl_0", "eval"):
        assert progress[phase]["done"], phase
    assert "mcts" in (workdir / "report.md").read_text()
    # the run evaluates and solves from its own files: no --config, no folder argument
    _run(["experiments/solve.py", f"--workdir={workdir}", "--problem=Numbers: 3 7 12 Target: 26",
          "--strategy=beam", "--budget=2"])

    printed = _run(["experiments/export_hf.py", f"--workdir={workdir}", f"--out={out}"])
    assert "RL iteration 0" in printed and "Qwen2ForCausalLM" in printed
    c = config.from_configdict(json.loads((workdir / "config.json").read_text()))
    from rlm_jax import workdir as wd_lib
    from rlm_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(workdir / "tokenizer")
    cfg = c.model_config(tok.vocab_size)
    policy, value, _ = wd_lib.load_trained_models(c, workdir, cfg)
    assert cfg.lora_rank == lora_rank
    if lora_rank:  # SFT, the value fit and RL trained the adapters (and the head) only: the folder's weights stand
        _, pretrained = hf.load_hf(folder)
        for trained in (policy, value["trunk"]):
            jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, lora.base_params(trained)),
                         jax.tree.map(np.asarray, pretrained))
        # one frozen base in memory under both adapter sets (x1's design)
        assert all(a is b for a, b in zip(jax.tree.leaves(lora.base_params(value["trunk"])),
                                          jax.tree.leaves(lora.base_params(policy))))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, tok.vocab_size, size=(2, 24)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    ours, _ = transformer.forward(cfg, policy, tokens, mask=mask)[:2]
    theirs = torch_logits(out, tokens, mask)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=1e-4)
    start = torch_logits(folder, tokens, mask)
    assert np.abs(theirs - start).max() > 1e-2  # training moved the weights
    from transformers import AutoTokenizer

    text = "Numbers: 3 7 12 Target: 26"
    assert AutoTokenizer.from_pretrained(str(out)).encode(text, add_special_tokens=False) == tok.encode(text)


def _gsm8k_file(path, n=160, seed=0):
    """A GSM8K-format file of two-step sums: questions, worked solutions ending in `#### answer`; every fourth
    row carries only its final answer (MATH-500 style rows are not mixed in: one layout per file)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b, c = (int(x) for x in rng.integers(2, 30, size=3))
        solution = f"{a} + {b} = {a + b}\n{a + b} + {c} = {a + b + c}\n#### {a + b + c}"
        rows.append({"question": f"Tom has {a} apples, buys {b} and finds {c}. How many now?",
                     "answer": solution if i % 4 else f"#### {a + b + c}"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_a_jsonl_file_is_split_into_sft_rl_and_eval_problems(folder, tmp_path):
    data_file = _gsm8k_file(tmp_path / "train.jsonl")
    c = tiny_config(folder, **{"task.name": "jsonl_math", "task.data": str(data_file), "task.num_train": 40,
                               "task.num_rl": 30, "task.num_eval": 16, "task.eval_fraction": 0.2,
                               "task.traces_per_problem": 1})
    run = phases.Run(c, tmp_path / "run")
    train, ev, rl_pool = data.split_problems(run)
    assert len(train) == 40 and len(ev) == 16 and len(rl_pool) == 30
    assert all(len(run.task.solve(p)) == 3 for p in train)  # worked solutions, split into their lines
    assert not {p["problem"] for p in ev} & {p["problem"] for p in train + rl_pool}
    assert any(p["solution"] == f"#### {run.task.reference_answer(p)}" for p in rl_pool)  # answer-only rows: RL
    with pytest.raises(ValueError, match="task.data.*fewer than task.num_train=500"):
        data.split_problems(phases.Run(tiny_config(folder, **{"task.name": "jsonl_math", "task.data": str(data_file),
                                                              "task.num_train": 500, "task.traces_per_problem": 1}),
                                       tmp_path / "run2"))


def test_a_prompt_longer_than_the_search_allows_is_refused_before_training(folder, tmp_path):
    c = tiny_config(folder, **{"task.name": "jsonl_math", "task.data": str(_gsm8k_file(tmp_path / "p.jsonl")),
                               "task.num_train": 40, "task.num_rl": 0, "task.num_eval": 16,
                               "task.traces_per_problem": 1, "search.prompt_len": 20})
    with pytest.raises(ValueError, match=r"search.prompt_len=20: the run's longest prompt takes \d+ tokens"):
        phases.run_phases(c, tmp_path / "run", (data.DATA, data.TOKENIZER))


@pytest.mark.parametrize("data_path, words", [("", ["task.data", "jsonl_math reads its problems from a file"]),
                                              ("/no/such.jsonl", ["task.data", "no such file"])])
def test_a_file_task_needs_its_file(folder, data_path, words):
    with pytest.raises(ValueError) as e:
        tiny_config(folder, **{"task.name": "jsonl_math", "task.data": data_path})
    for w in words:
        assert w in str(e.value)


@pytest.mark.slow
def test_sft_and_rl_from_search_train_a_pretrained_model_on_a_jsonl_math_file(folder, tmp_path):
    """With chat prompts (a ChatML template file), as an instruct model is trained."""
    workdir = tmp_path / "run"
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML_TEMPLATE)
    data_file = _gsm8k_file(tmp_path / "train.jsonl")
    _run(["experiments/train.py", f"--config={TINY}", f"--workdir={workdir}", f"--config.model.init=hf:{folder}",
          "--config.task.name=jsonl_math", f"--config.task.data={data_file}", "--config.task.num_train=40",
          "--config.task.num_rl=16", "--config.task.num_eval=16", "--config.task.traces_per_problem=1",
          "--config.value_refit.steps=0",
          "--config.rl.algorithm=ppo", "--config.seq_len=224", "--config.search.prompt_len=160",
          "--config.search.step_len=16", f"--config.task.chat_template={template}",
          "--config.task.system_prompt=Answer after ####."])
    progress = json.loads((workdir / "progress.json").read_text())["phases"]
    for phase in ("data", "sft", "value", "rl_0", "eval"):
        assert progress[phase]["done"], phase
    assert progress["data"]["info"] == {"train": 40, "eval": 16, "rl": 16}
    report = (workdir / "report.md").read_text()
    assert report.startswith("# rlm_jax report: jsonl_math") and "mcts" in report


def test_a_value_model_from_its_own_folder_is_that_folders_model(folder, value_folder, tmp_path):
    c = tiny_config(folder, **{"value.init": f"hf:{value_folder}"})
    tok = HFTokenizer.from_folder(folder)
    vcfg = c.value_model_config(tok.vocab_size)
    assert vcfg == hf.config_from_hf(value_folder) and vcfg.d_model == 48 and vcfg != c.model_config(tok.vocab_size)
    spec = c.lm_spec(c.model_config(tok.vocab_size), tok)
    assert spec.value == vcfg and spec.policy.d_model == 32
    cd = load_config(TINY)
    cd.value.init = f"hf:{value_folder}"
    with pytest.raises(ValueError, match="value.init=.*set model.init=hf:<folder> too"):
        config.from_configdict(cd)


@pytest.mark.slow
def test_every_phase_runs_with_a_value_model_from_its_own_folder(folder, value_folder, tmp_path):
    workdir = tmp_path / "run"
    _run(["experiments/train.py", f"--config={TINY}", f"--workdir={workdir}", f"--config.model.init=hf:{folder}",
          f"--config.value.init=hf:{value_folder}", "--config.sft.steps=20", "--config.value.steps=20"])
    progress = json.loads((workdir / "progress.json").read_text())["phases"]
    for phase in ("sft", "value", "rl_0", "value_refit", "eval"):
        assert progress[phase]["done"], phase
    c = config.from_configdict(json.loads((workdir / "config.json").read_text()))
    from rlm_jax import workdir as wd_lib
    from rlm_jax.tokenizer import load_tokenizer

    cfg = c.model_config(load_tokenizer(workdir / "tokenizer").vocab_size)
    _, value, _ = wd_lib.load_trained_models(c, workdir, cfg)
    assert value["trunk"]["embed"].shape[1] == 48 and value["trunk"]["blocks"]["attn"]["q_proj"].shape[0] == 3
    _, start = hf.load_hf(value_folder)
    assert np.abs(np.asarray(value["trunk"]["embed"]) - np.asarray(start["embed"])).max() > 0  # it trained
    _run(["experiments/solve.py", f"--workdir={workdir}", "--problem=Numbers: 3 7 12 Target: 26",
          "--strategy=mcts", "--budget=2"])


def test_a_value_folder_whose_tokenizer_reads_the_text_differently_is_refused(folder, tmp_path):
    """The same tokenizer files under a Llama config: transformers pre-tokenizes them as Llama's, so the value
    model would read other tokens than the policy writes."""
    other = tmp_path / "llama_value"
    make_tiny_hf_checkpoint(other, "llama", num_kv_heads=2, seed=5, vocab_size=hf.config_from_hf(folder).vocab_size,
                            hidden_size=32, intermediate_size=64, num_attention_heads=2, max_position_embeddings=256)
    for f in folder.iterdir():
        if f.name.startswith("tokenizer"):
            (other / f.name).write_bytes(f.read_bytes())
    run = phases.Run(tiny_config(folder, **{"value.init": f"hf:{other}"}), tmp_path / "run")
    task = get_task("countdown")
    results = {"tokenizer": HFTokenizer.from_folder(folder), "sft": None,
               "data": {"train": [task.generate(s, 0.5) for s in range(8)]}}
    with pytest.raises(ValueError, match="value.init=.*splits the task's text differently"):
        value.initial_trunk(run, results, jax.random.key(0))


def test_chat_prompts_go_through_the_template_in_every_phase(folder, tmp_path):
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML_TEMPLATE)
    c = tiny_config(folder, **{"task.chat_template": str(template), "task.system_prompt": "Reach the target.",
                               "task.fewshot": 1, "search.prompt_len": 200})
    run, results = phases.run_phases(c, tmp_path / "run", (data.DATA, data.TOKENIZER))
    tok, (example, problem) = results["tokenizer"], results["data"]["train"][:2]
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(folder))
    text = ("<|im_start|>system\nReach the target.<|im_end|>\n"
            f"<|im_start|>user\n{run.task.prompt(example)}<|im_end|>\n"  # the few-shot turn: an SFT problem, solved
            f"<|im_start|>assistant\n{chr(10).join(run.task.solve(example))}<|im_end|>\n"
            f"<|im_start|>user\n{run.task.prompt(problem)}<|im_end|>\n<|im_start|>assistant\n")
    assert formatting.prompt_ids(tok, run.task, problem) == ref.encode(text, add_special_tokens=False) + [tok.step_id]
    ids, _ = formatting.sft_example(tok, run.task, problem, run.task.solve(problem))
    assert ids[-1] == tok.eos_id == ref.convert_tokens_to_ids("<|im_end|>")  # the turn ends the solution
    # a rerun (and evaluate.py / solve.py) reads the same prompts back from the run's tokenizer folder
    again = phases.run_phases(c, tmp_path / "run", (data.DATA, data.TOKENIZER))[1]["tokenizer"]
    assert formatting.prompt_ids(again, run.task, problem) == formatting.prompt_ids(tok, run.task, problem)
    plain = phases.run_phases(tiny_config(folder), tmp_path / "plain", (data.DATA, data.TOKENIZER))[1]["tokenizer"]
    assert formatting.prompt_ids(plain, run.task, problem) == plain.encode(run.task.prompt(problem)) + [plain.step_id]

    no_template = tiny_config(folder, **{"task.chat_template": "auto"})  # this folder's tokenizer has none
    with pytest.raises(ValueError, match="task.chat_template='auto'.*no chat template"):
        phases.run_phases(no_template, tmp_path / "auto", (data.DATA, data.TOKENIZER))
