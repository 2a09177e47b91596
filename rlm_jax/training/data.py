"""The first two phases: the problems (split by problem hash) and the tokenizer (trained on their traces, or
model.init's folder's own)."""
from __future__ import annotations

from rlm_jax import metrics as metrics_lib
from rlm_jax import multihost
from rlm_jax.tasks import io as task_io
from rlm_jax.tasks.base import split_of
from rlm_jax.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from rlm_jax.training.phases import Phase


def split_problems(run):
    """(train, eval, rl): task.num_train SFT problems, task.num_eval held out, task.num_rl more training-split
    problems that only RL sees (verifier only), from one seeded draw split by problem hash."""
    t = run.c.task
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
    run.log(f"data: {len(train)} train / {len(ev)} eval / {len(rl_pool)} RL-only problems ({run.c.task.name})")
    return None, {"train": len(train), "eval": len(ev), "rl": len(rl_pool)}


def _load_data(run, results) -> dict:
    """{"train", "eval", "rl"}: rl is [] where task.num_rl = 0."""
    d = run.workdir / "data"
    rl_path = d / "rl.json"
    return {"train": task_io.load_records(d / "train.json"), "eval": task_io.load_records(d / "eval.json"),
            "rl": task_io.load_records(rl_path) if rl_path.exists() else []}


def _make_tokenizer(run, results):
    """model.init's folder's own tokenizer (its vocabulary, EOS and specials), else sentencepiece trained on the
    reference traces."""
    folder = run.c.init_folder()
    if folder is not None:
        tok = HFTokenizer.from_folder(folder)
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


DATA = Phase("data", _write_data, load=_load_data, primary_only=True)
TOKENIZER = Phase("tokenizer", _make_tokenizer, load=lambda run, results: load_tokenizer(run.workdir / "tokenizer"),
                  primary_only=True)


def rl_problems(data: dict) -> list:
    """RL's problem pool: its own problems, else the SFT problems."""
    return data["rl"] or data["train"]


def training_pool(data: dict) -> list:
    """Every training problem: SFT's and RL's own."""
    return data["train"] + data["rl"]
