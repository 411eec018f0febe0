#!/usr/bin/env bash
# One device call of an H200 session: runs parts of scripts/h200_regression.sh under a deadline, on a
# machine staged by ../shared/device/stage.sh (install.sh already run), and leaves compact logs and
# JSON under $OUT (what the device tool brings back).
#
#   bash .gpu/p4/install.sh >/tmp/install.log 2>&1; BUDGET=540 bash scripts/h200_session.sh PART...
#
# PART: any part of h200_regression.sh (`bash scripts/h200_regression.sh --list`), or `info` (GPU
# and versions); an unknown one stops the call before anything runs. Parts that a call cannot finish
# are cut at the deadline (their log so far comes back) and the rest are skipped, so put the part
# that must not be lost first.
#
# Work files live in /root/w and persist while the machine stays warm (about 30 s after a call), so
# `lite-mtp2` in one call and `generate` in the next decode the same checkpoint. Also set up here:
# * MEGATRON_LM: a Megatron-LM checkout for the pretrain_gpt.py parts, unpacked once from
#   .gpu/p6/mlm.tgz (`git archive --prefix=mlm/ core_v0.16.1 | gzip > .gpu/p6/mlm.tgz` here; carry
#   .gpu/p6 with .gpu/p4), unless MEGATRON_LM is set already;
# * a stand-in `selective_scan_cuda` module when the staged mamba_ssm lacks its Mamba-1 extension
#   (its __init__ imports it; Megatron's Mamba-2 mixer needs only the Triton kernels), so that
#   subprocesses (pretrain_gpt.py, megacpp-mcore train) import mamba_ssm too;
# * TRITON_CACHE_DIR=/root/w/triton and TRITON_CACHE_AUTOTUNING=1: later calls on a warm machine
#   skip the Triton compilation and autotuning a fresh one spends (up to 2-3 minutes where the
#   mamba-ssd-tuned-configs patch is not applied).
set -uo pipefail
export PYTHONUNBUFFERED=1
known=" info $(bash "$(dirname "$0")/h200_regression.sh" --list) "
for part in "$@"; do
  if [[ $known != *" $part "* ]]; then
    echo "h200_session: unknown part '$part'; parts:$known" >&2
    exit 2
  fi
done
BUDGET=${BUDGET:-540}
OUT=${OUT:-./h200}
W=/root/w
mkdir -p "$W" "$OUT"
T0=$SECONDS
left() { echo $((BUDGET - (SECONDS - T0))); }

if [[ -z ${MEGATRON_LM:-} && -f .gpu/p6/mlm.tgz ]]; then
  [[ -d $W/mlm ]] || tar -C "$W" -xzf .gpu/p6/mlm.tgz
  export MEGATRON_LM=$W/mlm
fi
if ! python -c 'import mamba_ssm' >/dev/null 2>&1 && python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("mamba_ssm") is None)'; then
  site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  printf 'def __getattr__(name):\n    raise AttributeError(f"selective_scan_cuda.{name}: the Mamba-1 extension is not built here")\n' \
    >"$site/selective_scan_cuda.py"
  echo "[h200_session] stand-in selective_scan_cuda installed (mamba_ssm built without its Mamba-1 extension)"
fi
export TRITON_CACHE_DIR=$W/triton TRITON_CACHE_AUTOTUNING=1

for part in "$@"; do
  budget=$(left)
  if ((budget < 30)); then
    echo "== $part: skipped (deadline)"
    continue
  fi
  echo "== $part: start, ${budget} s left"
  case $part in
    info)
      nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
      python -c 'import torch, megatron.core as m; print("torch", torch.__version__, "mcore", m.__version__)'
      python -c 'import transformer_engine as te; print("TE", te.__version__)' 2>&1 | tail -1
      echo "MEGATRON_LM=${MEGATRON_LM:-unset}"
      ;;
    *)
      OUT=$W timeout "$((budget - 10))" bash scripts/h200_regression.sh "$part"
      echo "rc $?"
      ;;
  esac
  echo "== $part: end at $((SECONDS - T0)) s"
done

# what comes back: logs (gzipped), JSON, receipts; never checkpoints or caches
cp "$W"/*.json "$OUT"/ 2>/dev/null
for log in "$W"/*.log; do  # '=' (bench_stage's run names) is not a name the device tool brings back
  name=$(basename "$log"); [[ -f $log ]] && gzip -c "$log" >"$OUT/${name//=/-}.gz"
done
for receipt in "$W"/*/receipt.json; do
  [[ -f $receipt ]] && cp "$receipt" "$OUT/$(basename "$(dirname "$receipt")")-receipt.json"
done
true
