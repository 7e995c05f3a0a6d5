# Sourced by every run_*.sh: make the virtual environment when it is missing, then set the
# environment DeepSpeed needs on this machine. Re-running is cheap once .venv exists.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# require_count NAME VALUE WHAT UNSET: stop unless VALUE (of variable NAME) is a whole number of WHAT, at least 1
# (bash's -gt on another value said "integer expression expected" and went on)
require_count() {
  if ! [[ "$2" =~ ^[1-9][0-9]*$ ]]; then
    echo "$1=$2: expected a whole number of $3, at least 1 (unset: $4)" >&2
    exit 2
  fi
}
# core_share N: the threads each of N processes sharing this machine's cores gets (at least 1)
core_share() { echo $(( $(nproc) > $1 ? $(nproc) / $1 : 1 )); }
if [ -n "${NUM_GPUS:-}" ]; then
  require_count NUM_GPUS "$NUM_GPUS" "ranks per node" "every GPU, or one CPU rank"
fi
PY="$ROOT/.venv/bin/python"
if [ ! -x "$PY" ] || [ ! -f "$ROOT/.venv/.installed" ] || [ "$ROOT/requirements.txt" -nt "$ROOT/.venv/.installed" ]; then
  echo "setting up $ROOT/.venv (first run: a few minutes)" >&2
  python3 -m venv "$(readlink -f "$ROOT/.venv")"  # .venv may be a link to elsewhere (.ci/run on a full disk)
  "$PY" -m pip install -q --no-cache-dir --upgrade pip
  "$PY" -m pip install -q --no-cache-dir -r "$ROOT/requirements.txt"
  touch "$ROOT/.venv/.installed"
fi
# by its real path when .venv is a link: the console scripts (deepspeed) start the real path's python, and
# DeepSpeed's ops compiled by a process of the other path were compiled again (their sources' paths differ)
export PATH="$(readlink -f "$ROOT/.venv")/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu
  # each of the NUM_GPUS ranks (processes) a share of the cores: ranks running a thread per core each spin against
  # one another (two SFT ranks on two cores: 7.2 s a step instead of 0.3)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(core_share "${NUM_GPUS:-1}")}"
fi
export TOKENIZERS_PARALLELISM=false
# The deepspeed launcher starts other nodes' ranks over pdsh / ssh with only PYTHON* (and on a GPU head NCCL*)
# variables: the ones this project's ranks read, and NCCL_*, go to them through DS_ENV_FILE, followed by any
# .deepspeed_env of the user's (which DS_ENV_FILE would otherwise hide; read last, its values win). Secrets (HF_TOKEN)
# are not put on their command lines: log in on each node (the Hub token file under a shared home) instead. The
# file goes when the launching script exits.
node_env_file() {
  local file v
  file="$(mktemp "${TMPDIR:-/tmp}/vlm_align_env.XXXXXX")"
  trap 'rm -f "'"$file"'"' EXIT
  for v in VLM_ALIGN_CACHE XDG_CACHE_HOME HF_HOME HF_HUB_CACHE HF_DATASETS_CACHE HF_HUB_OFFLINE TRANSFORMERS_OFFLINE \
           HF_DATASETS_OFFLINE GLOO_SOCKET_IFNAME TOKENIZERS_PARALLELISM $(compgen -e | grep '^NCCL_' || true); do
    if [ -n "${!v:-}" ]; then echo "$v=${!v}" >> "$file"; fi
  done
  for v in "$HOME/.deepspeed_env" "$ROOT/.deepspeed_env"; do
    # its lines, each ended (a file without a last newline), blank ones left out: DeepSpeed's reader splits every line
    # at "=" and stopped at an empty one (a ValueError before any node started)
    if [ -f "$v" ]; then grep -v '^[[:space:]]*$' "$v" >> "$file" || true; fi
  done
  # DeepSpeed's runners put each value in double quotes on the other nodes' command lines: a $, backquote, quote or
  # backslash in one would be expanded or cut there (its name is said, not its value: it may be a secret)
  local bad
  bad="$(grep -m1 '^[^=]*=.*[$`"\\]' "$file" | cut -d= -f1 || true)"
  if [ -n "$bad" ]; then
    echo "HOSTFILE: the value of $bad (in the environment or a .deepspeed_env) holds a \$, \`, \" or \\, which" \
         "each node's shell would change: set it without them" >&2
    return 2
  fi
  export DS_ENV_FILE="$file"
}
# Launch a stage module with the deepspeed launcher; NUM_GPUS (default: all; the first NUM_GPUS of
# CUDA_VISIBLE_DEVICES when it is set) / HOSTFILE select ranks.
launch() {
  local module="$1"; shift
  local args=()
  if [ -n "${HOSTFILE:-}" ]; then
    # (the launcher warns and trains on this machine alone when the file is missing)
    if [ ! -f "$HOSTFILE" ]; then echo "HOSTFILE=$HOSTFILE: no such file (relative to $ROOT)" >&2; return 2; fi
    # its slots say how many GPUs each node runs, whatever this (head) machine has: no CPU branch here
    args+=(--hostfile "$HOSTFILE")
    if [ -n "${NUM_GPUS:-}" ]; then args+=(--num_gpus "$NUM_GPUS"); fi
    # pdsh's runner has each node run `cd FOLDER; PYTHON -m ...` with the launcher's working folder (the physical
    # one) and interpreter unquoted: a space there made the cd fail and the ranks run from the home folder
    local where
    for where in "$(pwd -P)" "$(readlink -f "$ROOT/.venv")"; do
      if ! [[ "$where" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
        echo "HOSTFILE: $where: the deepspeed launcher runs it unquoted on each node; it must hold no space or" \
             "shell character (move it to a folder whose path has none)" >&2
        return 2
      fi
    done
    node_env_file || return 2
    # pdsh's runner has each node's shell split the command line again: arguments a shell would change (a space, a
    # quote, $, *, an empty one) go as one base64 word that training/engine/node_argv.py decodes on every rank
    local word
    word="$("$PY" -m training.engine.node_argv --encode "$@")" || return 2
    if [ -n "$word" ]; then set -- "$module" "$word"; module=training.engine.node_argv; fi
  elif [ "${DS_ACCELERATOR:-}" = "cpu" ]; then
    args+=(--num_accelerators "${NUM_GPUS:-1}")
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    # given --num_gpus the launcher drops CUDA_VISIBLE_DEVICES (and runs on GPUs 0..N-1): name the devices instead
    local devices="$CUDA_VISIBLE_DEVICES" n
    n="$(echo "$devices" | tr ',' '\n' | grep -c .)"
    if [ -n "${NUM_GPUS:-}" ]; then
      if [ "$NUM_GPUS" -gt "$n" ]; then
        echo "NUM_GPUS=$NUM_GPUS but CUDA_VISIBLE_DEVICES=$devices names $n device(s)" >&2; return 2
      fi
      devices="$(echo "$devices" | cut -d, -f1-"$NUM_GPUS")"
    fi
    args+=(--include "localhost:$devices")
  elif [ -n "${NUM_GPUS:-}" ]; then
    args+=(--num_gpus "$NUM_GPUS")
  fi
  deepspeed "${args[@]}" --master_port "${MASTER_PORT:-$((29500 + RANDOM % 1000))}" --module "$module" "$@"
}
