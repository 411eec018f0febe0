#!/usr/bin/env bash
# NAM56R-lite (12 layers AEMEAEMEAEMR, hidden 2048, 8-expert MoE, MLA, shared-block MTP K=1) on ONE
# H200 through Megatron-LM's pretrain_gpt.py and megacpp_mcore's launcher: bf16, TE. A core_v0.16.1
# checkout (megatron-core 0.16.1, Python 3.11) or a core_v0.19.0 one (0.19.x, Python 3.12);
# --dry-run says which it found (stderr).
#
#   MEGATRON_LM=~/Megatron-LM recipes/nam56r_lite_1xh200.sh [--dry-run] [extra pretrain_gpt.py flags]
#
# Empty DATA trains on Megatron's mock data; otherwise DATA is a .bin/.idx prefix. The preset ships
# MoD (gateskip, budget 1.0 -> 0.8 over --train-iters; its statistics print as mod_* on every log
# line); SPEC=NAM56R_LITE_DENSE is the same model without MoD, the ablation baseline.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi

MEGATRON_LM=${MEGATRON_LM:-$HOME/Megatron-LM}
DATA=${DATA:-}                     # .bin/.idx prefix, e.g. X.train of `prepare-data --output X` (its BPE
                                   # X.tokenizer/, if any, becomes the tokenizer); empty: mock data
OUT=${OUT:-$REPO/runs/nam56r_lite_1xh200}
SPEC=${SPEC:-NAM56R_LITE}          # an object of layer_specs/nam56r_lite.py (NAM56R_LITE_DENSE: without MoD)
ITERS=${ITERS:-50}
MBS=${MBS:-2}                      # ~15 GiB estimated per micro-batch of 2 x 4096 (megacpp-mcore plan)
GBS=${GBS:-16}
LR=${LR:-3e-4}
VOCAB=${VOCAB:-32768}              # with NullTokenizer (mock or byte data); a BPE of the data sets its own
SEED=${SEED:-1234}
USE_MLA=${USE_MLA:-1}               # 0: standard attention (e.g. with SPEC=NAM56R_LITE_AE)
MTP_DEPTH=${MTP_DEPTH:-1}           # 0: no MTP

APEX=${APEX:-0}                     # 1: apex installed (gradient-accumulation fusion; below)
require_switch USE_MLA APEX
require_count 1 ITERS MBS GBS VOCAB
require_count 0 SEED MTP_DEPTH
require_megatron_lm "$MEGATRON_LM"
set_data_args "$DATA"

# The preset's architecture: keep in sync with `launch_pretrain.preset_args("nam56r-lite")`
# (tests/test_recipes.py checks it).
MODEL=(
  --spec layer_specs.nam56r_lite "$SPEC"
  --num-layers 12 --hidden-size 2048 --num-attention-heads 16 --ffn-hidden-size 5632
  --seq-length 4096 --max-position-embeddings 4096
  --normalization RMSNorm --swiglu --disable-bias-linear --position-embedding-type rope
  --untie-embeddings-and-output-weights --attention-dropout 0 --hidden-dropout 0
  --init-method-std 0.02
)
MOE=(
  --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 1024
  --moe-shared-expert-intermediate-size 1024 --moe-aux-loss-coeff 0.01
  --moe-router-load-balancing-type aux_loss --moe-router-dtype fp32
  --moe-token-dispatcher-type alltoall --moe-grouped-gemm
  --moe-permute-fusion           # TE's fused permutation: x1.051 (H200) and x1.038 (H100) on the
                                 # full-width 12-layer stage (bench_stage --fast, docs/benchmarks.md)
)
MLA=()
if (( USE_MLA )); then
  MLA=(
    --multi-latent-attention --q-lora-rank 768 --kv-lora-rank 256
    --qk-head-dim 128 --qk-pos-emb-head-dim 64 --v-head-dim 128
    --qk-layernorm                 # RMSNorm on the q/kv latents, as the package's MLA has
  )
fi
MTP=()                             # shared-block MTP, built on the last pipeline stage only
if (( MTP_DEPTH > 0 )); then MTP=(--megacpp-mtp-depth "$MTP_DEPTH"); fi
PARALLEL=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --expert-model-parallel-size 1)
# Megatron's gradient-accumulation fusion in its non-TE linears (the output layer) needs apex's
# fused_weight_gradient_mlp_cuda; without apex it must be off. APEX=1 keeps it on.
GRAD_ACC_FUSION_FLAG=()
if (( ! APEX )); then GRAD_ACC_FUSION_FLAG=(--no-gradient-accumulation-fusion); fi
TRAINING=(
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$ITERS" --seed "$SEED"
  --lr "$LR" --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 5
  --weight-decay 0.1 --clip-grad 1.0 --adam-beta2 0.95
  --bf16 --transformer-impl transformer_engine --use-distributed-optimizer
  ${GRAD_ACC_FUSION_FLAG[@]+"${GRAD_ACC_FUSION_FLAG[@]}"}
)
set_tokenizer_args "$DATA" "$VOCAB"  # the data's BPE (prepare-data --tokenizer bpe:N), else NullTokenizer
OUTPUT=(
  --save "$OUT/checkpoints" --save-interval "$ITERS" --tensorboard-dir "$OUT/tensorboard"
  --log-interval 1 --eval-interval "$ITERS" --eval-iters 5
)

FLAGS=("${MODEL[@]}" "${MOE[@]}" "${MLA[@]}" "${MTP[@]}" "${PARALLEL[@]}" "${TRAINING[@]}"
       "${DATA_ARGS[@]}" "${TOKENIZER[@]}" "${OUTPUT[@]}" "$@")
check_megatron_flags "$DRY_RUN" "$MEGATRON_LM" "${FLAGS[@]}"
launch "$DRY_RUN" "$OUT" env PYTHONPATH="$PYTHONPATH_WITH_REPO" \
  torchrun --nproc-per-node 1 -m megacpp_mcore.launch_pretrain --megatron-lm "$MEGATRON_LM" \
  "${FLAGS[@]}"
