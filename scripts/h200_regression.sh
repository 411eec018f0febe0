#!/usr/bin/env bash
# The H200 regression pass kept in docs/benchmarks.md: GPU tests, then the side-by-side benchmarks
# whose ratios the package holds (A/E vs upstream at micro-batch 8, MoD gateskip and top-k, shared
# MTP vs upstream MTP, MoDA). Logs and JSON go to $OUT (default ./h200); each part ends with its table.
#   bash scripts/h200_regression.sh                 # everything (longer than one 10-minute call)
#   bash scripts/h200_regression.sh tests ae        # any of: tests ae mod mtp moda
set -uo pipefail
OUT=${OUT:-./h200}
PARTS=${*:-tests ae mod mtp moda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
for part in $PARTS; do
  case $part in
    tests) python -m pytest -q -rfEs -m gpu tests >"$OUT/gpu_tests.log" 2>&1 ;;
    ae) python scripts/bench_ae_vs_upstream.py --batch 8 --out "$OUT/ae.json" >"$OUT/ae.log" 2>&1 ;;
    mod) python scripts/bench_mod.py --batch 8 --blocks 16 --cross-entropy te \
           --variants dense,gateskip,topk --skip-graph --out "$OUT/mod.json" >"$OUT/mod.log" 2>&1 ;;
    mtp) python scripts/bench_mtp.py --out "$OUT/mtp.json" >"$OUT/mtp.log" 2>&1 ;;
    moda) python scripts/bench_moda.py --seq 4096 16384 --variants base moda-te \
            --out "$OUT/moda.json" >"$OUT/moda.log" 2>&1 ;;
    *) echo "unknown part '$part'; parts: tests ae mod mtp moda" >&2; exit 2 ;;
  esac
  echo "== $part (rc $?)"
  tail -n 14 "$OUT/$( [[ $part == tests ]] && echo gpu_tests || echo "$part").log"
done
