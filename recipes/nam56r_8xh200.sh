#!/usr/bin/env bash
# NAM56R, the public configuration (52 layers AEMEAEMEAEMR, hidden 4096, 32 heads, MLA q/kv latents
# 64/64, MoE 16 x 896 top-4 + a 1024 shared expert, Mamba-2 d_state 128, M2RNN k 64 v 16, shared-block
# MTP K=2, vocab 131072, seq 4096) on 8 H200s of one node through Megatron-LM's pretrain_gpt.py and
# megacpp_mcore's launcher: bf16, Transformer Engine. A core_v0.16.1 checkout (megatron-core 0.16.1,
# Python 3.11) or a core_v0.19.0 one (0.19.x, Python 3.12); --dry-run says which it found (stderr).
#
#   MEGATRON_LM=~/Megatron-LM DATA=/data/cpp_text_document recipes/nam56r_8xh200.sh [--dry-run] [flags]
#
# Layout: TP=1, PP=1, EP=1, DP=8, MBS=4, GBS=64, MTP block recomputed in backward, chosen from the
# stage benchmark's projection (below). The arithmetic (`megacpp-mcore plan --preset nam56r --ep 1
# --dp 8 --micro-batch-size 4 --mtp-recompute`, models/accounting.py):
# * 7.10B parameters: 4.05B in experts (22 E layers + the MTP block's E, 16 x 3 x 4096 x 896 each),
#   3.04B dense. EP=1: every GPU holds all 16 experts, so there is no all-to-all and the MoE token
#   counts stay on the device (no host wait per MoE layer, which EP > 1 needs); the distributed
#   optimizer shards the fp32 master + Adam state of all 7.10B parameters 8 ways. Per GPU: 13.2 GiB
#   bf16 weights + 26.4 GiB fp32 grads + 9.9 GiB optimizer + ~79.4 GiB activations at MBS 4 (6.7 of
#   them the MTP block's without recompute) = 128.9 GiB by the estimate, + what it leaves out,
#   measured as the 12-layer + MTP slice's peak less its estimate: 4.7 GiB without the MTP
#   recompute (133.7 GiB against the 134 GiB line, an H200's 140 less ~6 for the CUDA context and
#   NCCL: 0.3 GiB of margin, too little for rough activation factors), 1.3 GiB with it (130.2 GiB,
#   3.8 GiB of margin). So MTP_RECOMPUTE=1 by default: --megacpp-mtp-recompute on runs the MTP
#   block's forward again in backward (x0.967 on the 12-layer + MTP slice, 1.6% of the projected
#   whole-model throughput; 3.4 GiB less peak, the plan estimates 2.6).
#   --megacpp-fused-lm-loss on (the launcher's default, said here) keeps the main head's
#   [4 x 4096 x 131072] fp32 logits (8 GiB) from being built, and is faster: x1.124 on the 12-layer
#   slice at MBS 2 (pooled 1.084-1.162) and x1.088 on the shared structure (pooled 1.085-1.090), H100,
#   2026-12-07 (0.94-0.99 in two calls before the MoE device counts: docs/benchmarks.md).
#   With memory to spare, MTP_RECOMPUTE=0 (+1.6%). Should it not fit: MBS=2 (94.2 GiB by the same
#   estimate and measured rest at MBS 2, no recompute; projected 12,628 tokens/s/GPU), then EP=2
#   (122.3 GiB at MBS 4 without the recompute, 11,071) or EP=8 (113.8 GiB, 10,715).
# * Compute per GPU: all 52 layers for its own tokens (PP=1: no pipeline bubble; the MTP block and its
#   loss sit on the one stage). By hybrid_flops 35.23 GFLOP/token (ours: 29.29 G), so 12,000
#   tokens/s/GPU is 423 TFLOP/s/GPU.
# * Communication per GPU per step (32,768 tokens per GPU): gradient reduce-scatter (fp32) +
#   parameter all-gather (bf16) of all 7.10B parameters (7/8 of them leave the GPU): 37 GB, ~0.12 s
#   at an assumed 300 GB/s, overlapped with backward (--overlap-grad-reduce --overlap-param-gather)
#   but charged whole by the projection. No MoE all-to-all at EP=1 (at EP=8: 90 GB per step).
# * TP=1: hidden 4096 is too narrow for tensor parallelism to pay for its per-layer all-reduces.
# Measured (scripts/bench_stage.py --set stage --base moe_permute_fusion=on
# --ours-extra=--megacpp-fused-lm-loss=on --iters 12 --warmup 3 --profile-step 9 --mtp-recompute,
# 2026-12-07, docs/benchmarks.md twenty-sixth session; on an H100: no H200 came): the public-dims
# slices at MBS 4, all 16 experts on the one GPU: 4 / 8 / 12 layers 336.6 / 470.8 / 620.5 ms per
# step (the 12-layer slice 483 TFLOP/s by hybrid_flops, 58.0 GiB), 12 layers + MTP 2 1,077 ms
# (72.2 GiB), the same with the MTP recompute 1,114 ms (68.8 GiB), 12 layers with the MoE counts read
# on the host (as EP > 1 does) 721.6 ms. Layers taken as additive (checked at MBS 2: a 16-layer slice
# took 1.005 x what the 4-, 8- and 12-layer ones predict), the optimizer's kernels sharded 8 ways,
# all-to-all and gradient sync not hidden, the projection per GPU: EP=1 13,769 tokens/s with the MTP
# recompute (485 TFLOP/s by hybrid_flops; 13,984 without); EP=2 11,071, EP=4 10,831, EP=8 10,715.
# TO MEASURE on 8 GPUs: the peak memory at EP=1, the gradient sync's overlap; on one H200: the same
# slices (an H200 has the H100's bf16 peak and more bandwidth).
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
EP=${EP:-1}
ITERS=${ITERS:-20}
MBS=${MBS:-4}
GBS=${GBS:-64}
LR=${LR:-3e-4}
VOCAB=${VOCAB:-131072}             # with NullTokenizer (mock or byte data); a BPE of the data sets its own
SEED=${SEED:-1234}
USE_MLA=${USE_MLA:-1}               # 0: standard attention (e.g. with SPEC=NAM56R_DENSE_ATTENTION)
MTP_DEPTH=${MTP_DEPTH:-2}           # 0: no MTP
MTP_RECOMPUTE=${MTP_RECOMPUTE:-1}   # 0: keep the MTP block's activations (+1.6%, 3.4 GiB more; header)

APEX=${APEX:-0}                     # 1: apex installed (gradient-accumulation fusion; below)
require_switch USE_MLA APEX MTP_RECOMPUTE
require_count 1 NPROC TP PP EP ITERS MBS GBS VOCAB
require_count 0 SEED MTP_DEPTH
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
if (( MTP_DEPTH > 0 && MTP_RECOMPUTE )); then MTP+=(--megacpp-mtp-recompute on); fi
PARALLEL=(
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --expert-model-parallel-size "$EP"
)
if (( TP > 1 )); then PARALLEL+=(--sequence-parallel); fi
# Megatron's gradient-accumulation fusion in its non-TE linears (the output layer) needs apex's
# fused_weight_gradient_mlp_cuda; without apex it must be off. APEX=1 keeps it on.
GRAD_ACC_FUSION_FLAG=()
if (( ! APEX )); then GRAD_ACC_FUSION_FLAG=(--no-gradient-accumulation-fusion); fi
TRAINING=(
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$ITERS" --seed "$SEED"
  --lr "$LR" --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2
  --weight-decay 0.1 --clip-grad 1.0 --adam-beta2 0.95
  --bf16 --transformer-impl transformer_engine
  ${GRAD_ACC_FUSION_FLAG[@]+"${GRAD_ACC_FUSION_FLAG[@]}"}
  --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
  --megacpp-fused-lm-loss on     # no [tokens x vocab] logits: the memory EP=1 needs (header)
)
set_tokenizer_args "$DATA" "$VOCAB"  # the data's BPE (prepare-data --tokenizer bpe:N), else NullTokenizer
OUTPUT=(
  --save "$OUT/checkpoints" --save-interval "$ITERS" --tensorboard-dir "$OUT/tensorboard"
  --log-interval 1 --eval-interval "$ITERS" --eval-iters 2
)

FLAGS=("${MODEL[@]}" "${MOE[@]}" "${MLA[@]}" "${MTP[@]}" "${PARALLEL[@]}" "${TRAINING[@]}"
       "${DATA_ARGS[@]}" "${TOKENIZER[@]}" "${OUTPUT[@]}" "$@")
check_megatron_flags "$DRY_RUN" "$MEGATRON_LM" "${FLAGS[@]}"
launch "$DRY_RUN" "$OUT" env PYTHONPATH="$PYTHONPATH_WITH_REPO" CUDA_DEVICE_MAX_CONNECTIONS=1 \
  TRITON_CACHE_AUTOTUNING="${TRITON_CACHE_AUTOTUNING:-1}" \
  torchrun --nproc-per-node "$NPROC" -m megacpp_mcore.launch_pretrain --megatron-lm "$MEGATRON_LM" \
  "${FLAGS[@]}"
