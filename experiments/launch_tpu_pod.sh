#!/usr/bin/env bash
# Launch the main job on a Cloud TPU pod slice: the same `python experiments/train.py` on every worker.
# See docs/pod.md. `--dry-run` prints the commands instead of running them.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: experiments/launch_tpu_pod.sh --tpu=NAME --zone=ZONE (--bucket=BUCKET | --workdir=/shared/path)
                                     [options] [-- extra train.py flags]

Runs, from this checkout:
  1. (--create) gcloud compute tpus tpu-vm create NAME (--accelerator, --version)
  2. (unless --skip-install) ships `git archive HEAD` of this checkout to ~/rlm_jax on every worker and
     installs it into a Python 3.11 venv, ~/rlm_jax_venv (made with uv: TPU images ship Python 3.10):
     jax[tpu] at the version setup.py pins, then `pip install -e .`; gcsfuse too with --bucket
  3. on every worker at once (--worker=all): mounts the bucket (with --bucket), then
     ~/rlm_jax_venv/bin/python experiments/train.py --config=CONFIG --workdir=WORKDIR [extra flags]
     The processes find each other through jax.distributed's Cloud TPU auto-detection.

Options:
  --tpu=NAME            TPU VM (pod slice) name                                   (required)
  --zone=ZONE           its zone, e.g. us-central2-b                              (required)
  --project=PROJECT     GCP project (default: gcloud's configured project)
  --bucket=BUCKET       GCS bucket mounted with gcsfuse at /mnt/BUCKET on every worker; the workdir is
                        /mnt/BUCKET/rlm_jax/RUN unless --workdir is given
  --workdir=PATH        absolute path seen by every worker (under the bucket mount, or an NFS / Filestore
                        mount); rerunning with the same workdir resumes the run
  --run=RUN             run name under the bucket (default: the TPU name)
  --config=PATH         config file, relative to the repo (default: configs/countdown_pod.py)
  --create              create the TPU VM first (needs --accelerator)
  --accelerator=TYPE    e.g. v4-32, v5litepod-64 (with --create)
  --version=IMAGE       TPU VM software version (with --create; default: tpu-ubuntu2204-base)
  --spot                with --create: a spot (preemptible) slice
  --ref=REF             git ref to ship (default: HEAD; uncommitted changes are not shipped)
  --skip-install        reuse the code already installed on the workers (resume after a stop)
  --detach              run under nohup, output in ~/rlm_jax_train.log on each worker, and return
  --dry-run             print the commands, run nothing
  -h, --help            this text
EOF
}

die() { echo "launch_tpu_pod.sh: $*" >&2; echo "run with --help for usage" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TPU="" ZONE="" PROJECT="" BUCKET="" WORKDIR="" RUN_NAME="" CONFIG="configs/countdown_pod.py"
ACCELERATOR="" VERSION="tpu-ubuntu2204-base" REF="HEAD"
CREATE=0 SPOT=0 INSTALL=1 DETACH=0 DRY_RUN=0
EXTRA=()

while (($#)); do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --bucket=*) BUCKET="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --run=*) RUN_NAME="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --ref=*) REF="${1#*=}" ;;
    --create) CREATE=1 ;;
    --spot) SPOT=1 ;;
    --skip-install) INSTALL=0 ;;
    --detach) DETACH=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (flags take the form --name=value; train.py flags go after --)" ;;
  esac
  shift
done

# ------------------------------------------------------------------------------------------- checks
[[ -n "$TPU" ]] || die "--tpu=NAME is required"
[[ -n "$ZONE" ]] || die "--zone=ZONE is required"
BUCKET="${BUCKET#gs://}"; BUCKET="${BUCKET%/}"
[[ "$BUCKET" != */* ]] || die "--bucket takes a bucket name, not a path: got '$BUCKET'"
if [[ "$WORKDIR" == gs://* ]]; then
  die "--workdir=$WORKDIR: the pipeline writes its data, tokenizer and report with POSIX file I/O, so the
workdir must be a mounted path: pass --bucket=BUCKET (mounted with gcsfuse at /mnt/BUCKET on every worker;
the workdir is then /mnt/BUCKET/rlm_jax/RUN), or --bucket=BUCKET --workdir=/mnt/BUCKET/some/path"
fi
if [[ -z "$WORKDIR" ]]; then
  [[ -n "$BUCKET" ]] || die "give --bucket=BUCKET (workdir on a gcsfuse mount) or --workdir=/shared/path"
  WORKDIR="/mnt/$BUCKET/rlm_jax/${RUN_NAME:-$TPU}"
fi
[[ "$WORKDIR" == /* ]] || die "--workdir=$WORKDIR must be an absolute path that every worker sees"
if [[ -n "$BUCKET" && "$WORKDIR" != "/mnt/$BUCKET"/* ]]; then
  die "--workdir=$WORKDIR is not under the bucket mount /mnt/$BUCKET; drop --workdir or put it under /mnt/$BUCKET"
fi
[[ -f "$ROOT/$CONFIG" ]] || die "--config=$CONFIG: no such file in $ROOT (give a path relative to the repo)"
if ((CREATE)); then
  [[ -n "$ACCELERATOR" ]] || die "--create needs --accelerator=TYPE (e.g. v4-32)"
fi
JAX_VERSION="$(sed -n 's/^ *"jax==\([0-9.]*\)",.*/\1/p' "$ROOT/setup.py")"
[[ -n "$JAX_VERSION" ]] || die "cannot read the pinned jax version from $ROOT/setup.py"

# ------------------------------------------------------------------------------------------ helpers
run() {  # run a command, or print it (shell-quoted, prefixed by '+') with --dry-run
  if ((DRY_RUN)); then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

q() { printf '%q' "$1"; }  # one word, quoted for the workers' bash

TPU_VM=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || WHERE+=(--project="$PROJECT")
TARBALL="${TMPDIR:-/tmp}/rlm_jax-$TPU.tar.gz"

# Remote commands (bash on every worker). The code lives in ~/rlm_jax, its Python in ~/rlm_jax_venv.
PY="~/rlm_jax_venv/bin/python"
INSTALL_CMD="set -e; export PATH=\"\$HOME/.local/bin:\$PATH\"; rm -rf ~/rlm_jax && mkdir -p ~/rlm_jax"
INSTALL_CMD+=" && tar -xzf ~/rlm_jax.tar.gz -C ~/rlm_jax"
INSTALL_CMD+=" && { command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
INSTALL_CMD+=" && rm -rf ~/rlm_jax_venv && uv venv --seed --python 3.11 ~/rlm_jax_venv"
INSTALL_CMD+=" && $PY -m pip install -q $(q "jax[tpu]==$JAX_VERSION")"
INSTALL_CMD+=" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
INSTALL_CMD+=" && $PY -m pip install -q -e ~/rlm_jax"
MOUNT_CMD=""
if [[ -n "$BUCKET" ]]; then
  # gcsfuse from Google's apt repository; --rename-dir-limit lets orbax commit a checkpoint by renaming
  # its temporary directory.
  INSTALL_CMD+=" && if ! command -v gcsfuse >/dev/null; then"
  INSTALL_CMD+=" curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
  INSTALL_CMD+=" | sudo gpg --batch --yes --dearmor -o /usr/share/keyrings/cloud.google.gpg"
  INSTALL_CMD+=" && echo \"deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt"
  INSTALL_CMD+=" gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
  INSTALL_CMD+=" && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi"
  MOUNT_CMD="{ mountpoint -q $(q "/mnt/$BUCKET") || { sudo mkdir -p $(q "/mnt/$BUCKET")"
  MOUNT_CMD+=" && sudo chown \$(id -u):\$(id -g) $(q "/mnt/$BUCKET")"
  MOUNT_CMD+=" && gcsfuse --implicit-dirs --rename-dir-limit=200000 $(q "$BUCKET") $(q "/mnt/$BUCKET"); }; } && "
fi

TRAIN="$PY experiments/train.py --config=$(q "$CONFIG") --workdir=$(q "$WORKDIR")"
for a in ${EXTRA[@]+"${EXTRA[@]}"}; do TRAIN+=" $(q "$a")"; done
if ((DETACH)); then
  TRAIN="nohup $TRAIN > ~/rlm_jax_train.log 2>&1 < /dev/null &"
fi
RUN_CMD="set -e; ${MOUNT_CMD}cd ~/rlm_jax && $TRAIN"

# ------------------------------------------------------------------------------------------- launch
if ((CREATE)); then
  CREATE_ARGS=(--accelerator-type="$ACCELERATOR" --version="$VERSION")
  ((SPOT)) && CREATE_ARGS+=(--spot)
  run "${TPU_VM[@]}" create "$TPU" "${WHERE[@]}" "${CREATE_ARGS[@]}"
fi
if ((INSTALL)); then
  run git -C "$ROOT" archive --format=tar.gz -o "$TARBALL" "$REF"
  run "${TPU_VM[@]}" scp "$TARBALL" "$TPU:rlm_jax.tar.gz" "${WHERE[@]}" --worker=all
  run "${TPU_VM[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all --command="$INSTALL_CMD"
fi
run "${TPU_VM[@]}" ssh "$TPU" "${WHERE[@]}" --worker=all --command="$RUN_CMD"
if ((DETACH)) && ((!DRY_RUN)); then
  echo "started on every worker of $TPU; follow process 0 with:"
  echo "  gcloud compute tpus tpu-vm ssh $TPU ${WHERE[*]} --worker=0 --command='tail -f ~/rlm_jax_train.log'"
fi
echo "workdir: $WORKDIR${BUCKET:+ (gs://$BUCKET/${WORKDIR#/mnt/$BUCKET/})}" >&2
