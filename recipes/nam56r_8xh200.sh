#!/usr/bin/env bash
# NAM56R, the public configuration (52 layers AEMEAEMEAEMR, hidden 4096, 32 heads, MLA q/kv latents
# 64/64, MoE 16 x 896 top-4 + a 1024 shared expert, Mamba-2 d_state 128, M2RNN k 64 v 16, shared-block
# MTP K=2, vocab 131072, seq 4096) on 8 H200s of one node through Megatron-LM's pretrain_gpt.py and
# megacpp_mcore's launcher: bf16, Transformer Engine. A core_v0.16.1 checkout (megatron-core 0.16.1,
# Python 3.11) or a core_v0.19.0 one (0.19.x, Python 3.12); --dry-run says which it found (stderr).
#
#   MEGATRON_LM=~/Megatron-LM DATA=/data/cpp_text_document recipes/nam56r_8xh200.sh [--dry-run] [flags]
#
# Layout: TP=1, PP=1, EP=8, DP=8, MBS=4, GBS=64. The arithmetic (`megacpp-mcore plan --preset nam56r
# --ep 8 --dp 8 --micro-batch-size 4`, models/accounting.py):
# * 7.10B parameters: 4.05B in experts (22 E layers + the MTP block's E, 16 x 3 x 4096 x 896 each),
#   3.04B dense. EP=8 puts 2 of the 16 experts on each GPU; the dense part is replicated over DP=8
#   and the distributed optimizer shards its fp32 master + Adam state 8 ways (expert state: expert-DP
#   = dp*tp/ep = 1, unsharded). Per GPU: 6.6 GiB bf16 weights + 13.2 GiB fp32 grads + 9.9 GiB
#   optimizer + ~72.7 GiB activations at MBS 4 (rough, no recompute) = ~102 GiB of 141 GiB, leaving
#   room for the main head's [4 x 4096 x 131072] logits; MBS 8 (the public stack's) estimates at
#   ~175 GiB and would need activation recompute.
# * Compute per GPU: all 52 layers for its own tokens (PP=1: no pipeline bubble; the MTP block and its
#   loss sit on the one stage), and the experts' share of every GPU's routed tokens (balanced routing:
#   the same expert FLOPs as EP=1). By hybrid_flops 35.23 GFLOP/token (ours: 29.29 G), so 12,000
#   tokens/s/GPU is 423 TFLOP/s/GPU.
# * Communication per GPU per step (32,768 tokens per GPU): MoE all-to-all, dispatch + combine, forward
#   + backward, over 24 E passes (22 + the MTP block's E at both depths): 4 x 24 x 32,768 x 4 (top-k)
#   x 4096 x 2 B x 7/8 leaving the GPU = 90 GB, ~0.3 s at an assumed 300 GB/s NVLink all-to-all (~11%
#   of a 2.7 s step at 12,000 tokens/s, unless hidden); gradient reduce-scatter (fp32) + parameter
#   all-gather (bf16) of the 3.04B dense parameters: 16 GB, ~0.05 s, overlapped with backward
#   (--overlap-grad-reduce --overlap-param-gather). Experts need no gradient reduction (expert-DP 1).
# * TP=1: hidden 4096 is too narrow for tensor parallelism to pay for its per-layer all-reduces;
#   EP=8 over EP=4 (the public stack's): half the expert weights and optimizer state per GPU and
#   larger per-expert GEMMs, the same all-to-all bytes per GPU (7/8 vs 3/4 of them leave the GPU).
# Measured on one H200 (scripts/bench_stage.py --set stage, 2026-12-05, docs/benchmarks.md): the
# public-dims slices at MBS 4 peak at 67.0 GiB (12 layers) and 103.8 GiB (24 layers), each with all 16
# experts and an unsharded optimizer on the one GPU, so MBS 4 without recompute holds here; 16.8 us
# per token per 12-layer period, head 11.0 us, MTP (depth 2) 16.3 us; projected 9,036 tokens/s/GPU
# (318 TFLOP/s/GPU by hybrid_flops) with the all-to-all and gradient sync above, not hidden.
# bench_stage also projects EP 4, 2 and 1 with their memory (docs/benchmarks.md, twentieth session):
# from the same slices EP=1 (all 16 experts per GPU, no all-to-all, the MoE counts kept on the
# device) projects 7% above EP=8, but its ~137 GiB (unfused loss) is over the 134 GiB line; with
# --megacpp-fused-lm-loss on it should fit. EP stays 8 until an H200 stage run with the fused loss
# measures both. Since then (call 21a, an H100, docs/benchmarks.md): the 12-layer slice with the MoE
# device counts, the fused permutation (on here since cb31f7c) and the fused loss runs at 685.8 ms
# (437 TFLOP/s by hybrid_flops, 58.0 GiB), against 910.8 ms on the H200 before them; the 24-layer and
# MTP slices, and so the projection and the EP choice, wait for an H200.
# TO MEASURE on 8 GPUs: the all-to-all time (the 300 GB/s is an assumption), EP=4 against EP=8,
# whether MBS 8 fits with recompute.
#
# Start-up: the launcher applies the patch registry, whose mamba-ssd-tuned-configs seeds mamba_ssm's
# SSD autotuners on SM90 with the H200's choices (for nam56r-lite's keys: start-up to the first step
# 124 -> 43.7 s on a fresh H200; here the two _state_passing kernels, whose key holds the width,
# still tune). TRITON_CACHE_AUTOTUNING=1 keeps the rest of Triton's autotuning results (MLA's fused
# RoPE) in Triton's cache (TRITON_CACHE_DIR, default ~/.triton/cache) for a second launch.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi

MEGATRON_LM=${MEGATRON_LM:-$HOME/Megatron-LM}
DATA=${DATA:-}                     # .bin/.idx prefix, e.g. X.train of `prepare-data --output X` (its BPE
                                   # X.tokenizer/, if any, becomes the tokenizer); empty: mock data
OUT=${OUT:-$REPO/runs/nam56r_8xh200}
SPEC=${SPEC:-NAM56R}               # an object of layer_specs/nam56r.py (NAM56R_DENSE: without MoD)
NPROC=${NPROC:-8}
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-8}
ITERS=${ITERS:-20}
MBS=${MBS:-4}
GBS=${GBS:-64}
LR=${LR:-3e-4}
VOCAB=${VOCAB:-131072}             # with NullTokenizer (mock or byte data); a BPE of the data sets its own
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
  --moe-shared-expert-intermediate-size 1024 --moe-aux-loss-coeff 0.01
  --moe-router-load-balancing-type aux_loss --moe-router-dtype fp32
  --moe-token-dispatcher-type alltoall --moe-grouped-gemm
  --moe-permute-fusion           # TE's fused permutation: x1.051 (H200) and x1.038 (H100) on the
                                 # full-width 12-layer stage (bench_stage --fast, docs/benchmarks.md)
)
MLA=()
if (( USE_MLA )); then
  MLA=(
    --multi-latent-attention --q-lora-rank 64 --kv-lora-rank 64
    --qk-head-dim 64 --qk-pos-emb-head-dim 64 --v-head-dim 64
    --qk-layernorm                 # RMSNorm on the q/kv latents, as the package's MLA has
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
set_tokenizer_args "$DATA" "$VOCAB"  # the data's BPE (prepare-data --tokenizer bpe:N), else NullTokenizer
OUTPUT=(
  --save "$OUT/checkpoints" --save-interval "$ITERS" --tensorboard-dir "$OUT/tensorboard"
  --log-interval 1 --eval-interval "$ITERS" --eval-iters 2
)

FLAGS=("${MODEL[@]}" "${MOE[@]}" "${MLA[@]}" "${MTP[@]}" "${PARALLEL[@]}" "${TRAINING[@]}"
       "${DATA_ARGS[@]}" "${TOKENIZER[@]}" "${OUTPUT[@]}" "$@")
(( DRY_RUN )) || check_megatron_flags "$MEGATRON_LM" "${FLAGS[@]}"
launch "$DRY_RUN" "$OUT" env PYTHONPATH="$PYTHONPATH_WITH_REPO" CUDA_DEVICE_MAX_CONNECTIONS=1 \
  TRITON_CACHE_AUTOTUNING="${TRITON_CACHE_AUTOTUNING:-1}" \
  torchrun --nproc-per-node "$NPROC" -m megacpp_mcore.launch_pretrain --megatron-lm "$MEGATRON_LM" \
  "${FLAGS[@]}"
