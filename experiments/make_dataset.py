"""Writes a generated dataset in x1's format.

  python experiments/make_dataset.py --domain=countdown3 --levels=1-10 --n=1000 --seed=0 \
      --out=data/countdown3.json.bz2

--levels takes a level (3), a range (1-10) or a list (1,4,7); problems are spread evenly over them.
"""
import os
import sys

# Runnable as a script from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from rlm_jax import cli  # noqa: E402
from rlm_jax.tasks import TASK_NAMES, get_task  # noqa: E402
from rlm_jax.tasks.base import split_of  # noqa: E402
from rlm_jax.tasks.io import generate_dataset, parse_levels, save_records  # noqa: E402

FILE_DOMAINS = ("jsonl_math",)  # Read from a file: nothing to generate.

FLAGS = flags.FLAGS
flags.DEFINE_enum("domain", None, TASK_NAMES, "Task to generate (not " + ", ".join(FILE_DOMAINS) + ").")
flags.DEFINE_string("levels", "1-10", "Levels: a level (3), a range (1-10) or a list (1,4,7).")
flags.DEFINE_integer("n", 1000, "Number of problems.")
flags.DEFINE_integer("seed", 0, "Seed: the same flags write the same file.")
flags.DEFINE_string("out", None, "Output path, .json or .json.bz2 (compressed).")
flags.DEFINE_boolean("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["domain", "out"])


def _check_levels(spec: str) -> bool:
    try:
        parse_levels(spec)
    except ValueError as e:
        raise flags.ValidationError(str(e))  # parse_levels says what is wrong and how to write it
    return True


flags.register_validator("levels", _check_levels)
flags.register_validator("domain", lambda d: d not in FILE_DOMAINS,
                         f"{'/'.join(FILE_DOMAINS)} reads a file; nothing to generate (load it with "
                         "rlm_jax.tasks.jsonl_math.JSONLMathTask(path) instead)")
flags.register_validator("n", lambda n: n >= 1, "must be >= 1: the number of problems to write")
flags.register_validator("out", lambda p: p is None or p.endswith((".json", ".json.bz2")),
                         "must end in .json or .json.bz2 (bz2-compressed), e.g. --out=data/sat.json.bz2")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass everything as --flag=value")
    try:
        task = get_task(FLAGS.domain)
    except ImportError as e:
        raise app.UsageError(f"--domain={FLAGS.domain}: {e}")
    records = generate_dataset(task, parse_levels(FLAGS.levels), FLAGS.n, FLAGS.seed, progress=FLAGS.progress)
    save_records(FLAGS.out, records)
    n_eval = sum(split_of(r) == "eval" for r in records)
    print(f"wrote {len(records)} {task.name} problems to {FLAGS.out} "
          f"(levels {FLAGS.levels}; split: {len(records) - n_eval} train / {n_eval} eval)")


if __name__ == "__main__":
    cli.run(main)
