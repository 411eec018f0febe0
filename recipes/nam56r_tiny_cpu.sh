#!/usr/bin/env bash
# NAM56R-tiny (12 layers AEMEAEMEAEMR, hidden 128) on CPU: `megacpp-mcore train` through
# megatron-core with the local (torch) backend and gloo; no GPU, no Megatron-LM checkout, no
# download (the default data is prepared from the system's C/C++ headers on first use).
#
#   recipes/nam56r_tiny_cpu.sh [--dry-run] [extra `megacpp-mcore train` flags, e.g. --tp 2]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi

DATA=${DATA:-}                     # prefix X of `megacpp-mcore prepare-data --output X` (bytes or its
                                   # BPE, which train takes from X.json); empty: the default data
OUT=${OUT:-$REPO/runs/nam56r_tiny_cpu}
NPROC=${NPROC:-1}                  # ranks (gloo); with 2, pass e.g. --tp 2 or --pp 2
PRESET=${PRESET:-nam56r-tiny}      # ships MoD; nam56r-tiny-dense: the same without MoD (baseline)
STEPS=${STEPS:-200}
MBS=${MBS:-4}
SEED=${SEED:-1234}

require_count 1 NPROC              # the rest is checked by train's own parser (below)
MODEL=(--preset "$PRESET")
TRAINING=(--steps "$STEPS" --micro-batch-size "$MBS" --seed "$SEED" --save "$OUT/checkpoints")
DATA_ARGS=()
if [[ -n $DATA ]]; then
  require_file "$DATA.json" "prepared data prefix (DATA, from megacpp-mcore prepare-data --output)"
  DATA_ARGS=(--data "$DATA")
fi

FLAGS=("${MODEL[@]}" "${TRAINING[@]}" "${DATA_ARGS[@]}" "$@")
check_train_flags "${FLAGS[@]}"
launch "$DRY_RUN" "$OUT" env PYTHONPATH="$PYTHONPATH_WITH_REPO" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
  torchrun --nproc-per-node "$NPROC" -m megacpp_mcore.cli train "${FLAGS[@]}"
