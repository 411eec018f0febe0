#!/usr/bin/env bash
# NAM56R (52 layers AEMEAEMEAEMR, hidden 4096, 16-expert MoE top-4 + shared expert, MLA,
# shared-block MTP K=2) on 8 H200s of one node through Megatron-LM's pretrain_gpt.py and
# megacpp_mcore's launcher: bf16, Transformer Engine. A core_v0.16.1 checkout (megatron-core 0.16.1,
# Python 3.11) or a core_v0.19.0 one (0.19.x, Python 3.12); --dry-run says which it found (stderr).
#
#   MEGATRON_LM=~/Megatron-LM DATA=/data/cpp_text_document recipes/nam56r_8xh200.sh [--dry-run] [flags]
#
# Layout: TP=1, PP=1, EP=8, DP=8 (why, from `megacpp-mcore plan --preset nam56r --ep 8`):
# * ~7.5B parameters, ~3.9B of them in experts. EP=8 puts 2 of the 16 experts on each GPU (the
#   all-to-all stays inside the node on NVLink); the dense ~3.6B are replicated over DP=8 and the
#   distributed optimizer shards their fp32 state 8 ways: ~8 GiB bf16 weights + ~16 GiB fp32 grads
#   + ~11 GiB optimizer state per GPU, leaving room for activations of 2 x 4096 tokens without
#   recomputation (~36 GiB estimated) on a 141 GiB card.
# * TP=1: hidden 4096 is too narrow for tensor parallelism to pay for its per-layer all-reduces on
#   H200s; PP=1: no pipeline bubble, and the MTP block and its loss sit on the last (only) stage.
#   For longer sequences raise TP (with SP, which MoE needs at TP>1) before PP.
# * MBS=2, GBS=128: 8 micro-batches per rank per step, 128 x 4096 = 524k tokens per step.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi

MEGATRON_LM=${MEGATRON_LM:-$HOME/Megatron-LM}
DATA=${DATA:-}                     # .bin/.idx prefix; empty: Megatron's mock data
OUT=${OUT:-$REPO/runs/nam56r_8xh200}
SPEC=${SPEC:-NAM56R}               # an object of layer_specs/nam56r.py
NPROC=${NPROC:-8}
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-8}
ITERS=${ITERS:-20}
MBS=${MBS:-2}
GBS=${GBS:-128}
LR=${LR:-3e-4}
VOCAB=${VOCAB:-131072}
SEED=${SEED:-1234}
USE_MLA=${USE_MLA:-1}               # 0: standard attention (e.g. with SPEC=NAM56R_DENSE_ATTENTION)
MTP_DEPTH=${MTP_DEPTH:-2}           # 0: no MTP

require_megatron_lm "$MEGATRON_LM"
set_data_args "$DATA"

# The preset's architecture: keep in sync with `launch_pretrain.preset_args("nam56r")`
# (tests/test_recipes.py checks it).
MODEL=(
  --spec layer_specs.nam56r "$SPEC"
  --num-layers 52 --hidden-size 4096 --num-attention-heads 32 --ffn-hidden-size 11008
  --seq-length 4096 --max-position-embeddings 4096
  --normalization RMSNorm --swiglu --disable-bias-linear --position-embedding-type rope
  --untie-embeddings-and-output-weights --attention-dropout 0 --hidden-dropout 0
  --init-method-std 0.02
)
MOE=(
  --num-experts 16 --moe-router-topk 4 --moe-ffn-hidden-size 896
  --moe-shared-expert-intermediate-size 896 --moe-aux-loss-coeff 0.01
  --moe-router-load-balancing-type aux_loss --moe-router-dtype fp32
  --moe-token-dispatcher-type alltoall --moe-grouped-gemm
)
MLA=()
if (( USE_MLA )); then
  MLA=(
    --multi-latent-attention --q-lora-rank 1536 --kv-lora-rank 512
    --qk-head-dim 128 --qk-pos-emb-head-dim 64 --v-head-dim 128
  )
fi
MTP=()                             # shared-block MTP, built on the last pipeline stage only
if (( MTP_DEPTH > 0 )); then MTP=(--megacpp-mtp-depth "$MTP_DEPTH"); fi
PARALLEL=(
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --expert-model-parallel-size "$EP"
)
if (( TP > 1 )); then PARALLEL+=(--sequence-parallel); fi
# Megatron's gradient-accumulation fusion in its non-TE linears (the output layer) needs apex's
# fused_weight_gradient_mlp_cuda; without apex it must be off. APEX=1 keeps it on.
GRAD_ACC_FUSION_FLAG=()
if [[ ${APEX:-0} != 1 ]]; then GRAD_ACC_FUSION_FLAG=(--no-gradient-accumulation-fusion); fi
TRAINING=(
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$ITERS" --seed "$SEED"
  --lr "$LR" --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2
  --weight-decay 0.1 --clip-grad 1.0 --adam-beta2 0.95
  --bf16 --transformer-impl transformer_engine
  ${GRAD_ACC_FUSION_FLAG[@]+"${GRAD_ACC_FUSION_FLAG[@]}"}
  --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
)
# NullTokenizer adds an end-of-document id: VOCAB - 1 ids + EOD = VOCAB (a multiple of 128).
TOKENIZER=(--tokenizer-type NullTokenizer --vocab-size "$((VOCAB - 1))")
OUTPUT=(
  --save "$OUT/checkpoints" --save-interval "$ITERS" --tensorboard-dir "$OUT/tensorboard"
  --log-interval 1 --eval-interval "$ITERS" --eval-iters 2
)

launch "$DRY_RUN" "$OUT" env PYTHONPATH="$PYTHONPATH_WITH_REPO" CUDA_DEVICE_MAX_CONNECTIONS=1 \
  torchrun --nproc-per-node "$NPROC" -m megacpp_mcore.launch_pretrain --megatron-lm "$MEGATRON_LM" \
  "${MODEL[@]}" "${MOE[@]}" "${MLA[@]}" "${MTP[@]}" "${PARALLEL[@]}" "${TRAINING[@]}" \
  "${DATA_ARGS[@]}" "${TOKENIZER[@]}" "${OUTPUT[@]}" "$@"
