"""The first two phases: the problems (split by problem hash) and the tokenizer (trained on their traces, or
model.init's folder's own)."""
from __future__ import annotations

from pathlib import Path

from rlm_jax import formatting
from rlm_jax import metrics as metrics_lib
from rlm_jax import multihost
from rlm_jax.tasks import io as task_io
from rlm_jax.tasks.base import split_of
from rlm_jax.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from rlm_jax.training.phases import Phase


def file_problems(run):
    """(train, eval, rl) of task.data's file at task.levels, split by problem hash: train = the train-split
    problems with a worked solution (SFT's traces), rl = the rest of the train split (an answer is enough),
    eval = the eval split; each cut to its task.num_* in file order."""
    t = run.c.task
    levels = set(task_io.parse_levels(t.levels))
    problems = [p for p in run.task.read_problems(t.data) if p["level"] in levels]
    train_split = [p for p in problems if split_of(p, t.eval_fraction) == "train"]
    solved = [p for p in train_split if run.task.has_trace(p)]
    train = solved[:t.num_train]
    chosen = {id(p) for p in train}
    rl_pool = [p for p in train_split if id(p) not in chosen][:t.num_rl]
    ev = [p for p in problems if split_of(p, t.eval_fraction) == "eval"][:t.num_eval]
    if len(train) < t.num_train or len(ev) < t.num_eval:
        raise ValueError(f"task.data={t.data}: at levels {t.levels} it holds {len(solved)} train-split problems with "
                         f"a solution and {len(ev)} eval-split problems (eval_fraction={t.eval_fraction}), fewer than "
                         f"task.num_train={t.num_train} / task.num_eval={t.num_eval}; lower them")
    return train, ev, rl_pool


def split_problems(run):
    """(train, eval, rl): task.num_train SFT problems, task.num_eval held out, task.num_rl more training-split
    problems that only RL sees (verifier only), from one seeded draw split by problem hash (or from task.data's
    file: `file_problems`)."""
    t = run.c.task
    if t.data:
        return file_problems(run)
    # enough draws for every split (the hash split puts ~eval_fraction of them in eval), with a margin
    n = int(max((t.num_train + t.num_rl) / (1 - t.eval_fraction), t.num_eval / t.eval_fraction) * 1.1) + 64
    problems = task_io.generate_dataset(run.task, task_io.parse_levels(t.levels), n, seed=run.c.seed,
                                        progress=metrics_lib.progress_enabled(multihost.is_primary()))
    train_split = [p for p in problems if split_of(p, t.eval_fraction) == "train"]
    train, rl_pool = train_split[:t.num_train], train_split[t.num_train:t.num_train + t.num_rl]
    ev = [p for p in problems if split_of(p, t.eval_fraction) == "eval"][:t.num_eval]
    if len(ev) < t.num_eval or len(train) < t.num_train or len(rl_pool) < t.num_rl:
        raise RuntimeError(f"generated {len(train)} train / {len(rl_pool)} RL / {len(ev)} eval problems, fewer "
                           "than asked; lower task.num_train/num_rl/num_eval or raise eval_fraction")
    return train, ev, rl_pool


def _write_data(run, results):
    train, ev, rl_pool = split_problems(run)
    d = run.workdir / "data"
    d.mkdir(parents=True, exist_ok=True)
    task_io.save_records(d / "train.json", train)
    task_io.save_records(d / "eval.json", ev)
    if rl_pool:
        task_io.save_records(d / "rl.json", rl_pool)
    source = f"from {run.c.task.data}" if run.c.task.data else "generated"
    run.log(f"data: {len(train)} train / {len(ev)} eval / {len(rl_pool)} RL-only problems ({run.c.task.name}, {source})")
    return None, {"train": len(train), "eval": len(ev), "rl": len(rl_pool)}


def _load_data(run, results) -> dict:
    """{"train", "eval", "rl"}: rl is [] where task.num_rl = 0."""
    d = run.workdir / "data"
    rl_path = d / "rl.json"
    return {"train": task_io.load_records(d / "train.json"), "eval": task_io.load_records(d / "eval.json"),
            "rl": task_io.load_records(rl_path) if rl_path.exists() else []}


def chat_tokenizer(run, tok: HFTokenizer, train) -> HFTokenizer:
    """`tok` rendering prompts through a chat template as task.chat_template says (unchanged for "none"); a
    .jinja file becomes the tokenizer's template, saved with it; the first task.fewshot SFT problems with their
    reference solutions become the few-shot turns."""
    t = run.c.task
    if t.chat_template == "none":
        return tok
    if t.chat_template != "auto":
        tok.hf.chat_template = Path(t.chat_template).read_text()
    fewshot = [(run.task.prompt(p), "\n".join(run.task.solve(p))) for p in train[:t.fewshot]]
    try:
        return HFTokenizer(tok.hf, tok.step_delimiter, system_prompt=t.system_prompt, fewshot=fewshot)
    except ValueError as e:  # prompting.PromptError: no template
        raise ValueError(f"config task.chat_template={t.chat_template!r}: {e}") from None


def _make_tokenizer(run, results):
    """model.init's folder's own tokenizer (its vocabulary, EOS and specials), else sentencepiece trained on the
    reference traces."""
    folder = run.c.init_folder()
    if folder is not None:
        tok = chat_tokenizer(run, HFTokenizer.from_folder(folder), results["data"]["train"])
        vocab = run.c.model_config(tok.vocab_size).vocab_size
        if tok.vocab_size > vocab:
            raise ValueError(f"{folder}: the tokenizer has {tok.vocab_size} tokens but config.json's vocab_size is "
                             f"{vocab}; the folder's tokenizer and model do not belong together")
        tok.save(run.workdir / "tokenizer")
        run.log(f"tokenizer: {folder}'s ({tok.vocab_size} tokens, EOS {tok.decode([tok.eos_id])!r})")
        return None, {"from": str(folder)}
    corpus = [run.task.prompt(p) + "\n" + "\n".join(run.task.solve(p))
              for p in results["data"]["train"][:run.c.tokenizer.corpus_problems]]
    SentencePieceTokenizer.train(corpus, vocab_size=run.c.tokenizer.vocab_size, out=run.workdir / "tokenizer")
    return None, {}


def check_prompt_room(run, tok, problems) -> None:
    """Every prompt fits `search.prompt_len` (the search pads prompts to it): refused before any training,
    naming the field and the length it needs (check_sizes can only bound generated problems' token counts)."""
    if not problems:
        return
    n, longest = max((len(formatting.prompt_ids(tok, run.task, p)), i) for i, p in enumerate(problems))
    longest = problems[longest]
    if n > run.c.search.prompt_len:
        raise ValueError(f"config search.prompt_len={run.c.search.prompt_len}: the run's longest prompt takes {n} "
                         f"tokens ({longest['problem'][:60]!r}); raise search.prompt_len to >= {n} (and "
                         "model.max_seq_len with it), or leave the longest problems out")


def _load_tokenizer(run, results):
    tok = load_tokenizer(run.workdir / "tokenizer")
    check_prompt_room(run, tok, training_pool(results["data"]) + results["data"]["eval"])
    return tok


DATA = Phase("data", _write_data, load=_load_data, primary_only=True)
TOKENIZER = Phase("tokenizer", _make_tokenizer, load=_load_tokenizer, primary_only=True)


def rl_problems(data: dict) -> list:
    """RL's problem pool: its own problems, else the SFT problems."""
    return data["rl"] or data["train"]


def training_pool(data: dict) -> list:
    """Every training problem: SFT's and RL's own."""
    return data["train"] + data["rl"]
