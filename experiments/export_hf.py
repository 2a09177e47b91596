r"""Export a run's trained policy as a Hugging Face folder that transformers loads.

    python experiments/export_hf.py --workdir=runs/countdown --out=runs/countdown/hf_policy
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('runs/countdown/hf_policy')"

The policy is the run's most advanced one (the last RL iteration, else SFT; as evaluate.py and solve.py pick
it). The folder holds config.json (LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM: the family the
model has, e.g. the one `model.init=hf:DIR` started from), model.safetensors, generation_config.json and the
run's tokenizer (an HF tokenizer's files as transformers reads them; a sentencepiece model trained here is
saved as its .model file, which rlm_jax's `load_tokenizer` reads). --max_shard_mb splits the weights into
shards with an index, as large checkpoints are published. A LoRA run (`model.lora_rank`) exports its adapters
folded into the weights (W + alpha / rank * A B): a plain model of the folder's family.
"""
from pathlib import Path

from absl import app, flags, logging

from rlm_jax import cli

_CONFIG = cli.define_config(None, "The run's config file (default: workdir/config.json).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's output directory.")
_OUT = flags.DEFINE_string("out", None, "The folder to write (created; its old weights are replaced).")
_MAX_SHARD_MB = flags.DEFINE_integer("max_shard_mb", 0, "Split the weights into shards of at most this many MB "
                                     "(0: one model.safetensors).")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    workdir = Path(_WORKDIR.value)
    if not (workdir / "tokenizer").is_dir():
        raise app.UsageError(f"--workdir={workdir} has no trained run (no tokenizer/); train one with "
                             "experiments/train.py first")
    if _MAX_SHARD_MB.value < 0:
        raise app.UsageError(f"--max_shard_mb must be >= 0, got {_MAX_SHARD_MB.value}")
    out = Path(_OUT.value)
    if out.resolve() == workdir.resolve():
        raise app.UsageError("--out must be a folder of its own, not the run's workdir")
    c = cli.workdir_config(_CONFIG.value, workdir)

    from rlm_jax import parallel
    from rlm_jax.models import hf, hf_config, lora

    tok, cfg, policy, _, label = cli.load_run_models(c, workdir)
    cfg, policy = lora.merged(cfg, parallel.to_host(policy))  # model.lora_rank: adapters folded into the weights
    shard = _MAX_SHARD_MB.value * 2 ** 20 or None
    hf.export_hf(cfg, policy, out, tokenizer=tok, max_shard_bytes=shard)
    print(f"wrote {out}: the {label} policy ({hf_config.config_to_hf(cfg)['architectures'][0]}, {cfg.num_layers} layers, d_model {cfg.d_model})")


if __name__ == "__main__":
    cli.run(main)
