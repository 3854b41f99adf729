#!/usr/bin/env bash
# The GPU evidence, in phases that fit one device call each. Two lanes run
# side by side on a two-GPU machine (lane 0 on GPU 0, lane 1 on GPU 1); on
# one GPU they run one after the other.
#
# Usage (on the GPU machine, Keras carried as wheels in .whl/ and the
# corpora as .xz files in .data/, see ../shared/docs/GPU.md):
#   bash benchmarks/run_gpu.sh PHASE [OUTDIR]
# Phases:
#   train  wiki-text8: text8_small vs the same-size Transformer for equal
#          time; PTB: ptb_small_cpu vs its Transformer (issues 3 and 6);
#          JAX throughput at adaptive spans ~1024 and fixed 1024 (issue 4)
#   multi  1 vs 2 GPUs: step losses (global batch 64) and scaling (batch 64
#          per GPU), JAX and PyTorch (issue 7)
#   speed  training throughput per backend and span setting, the adaptive
#          softmax memory, fused vs portable loss curves (issues 4 and 6)
#   kernels per-kernel times (Pallas --profile, Triton kernel check), the
#          cost of the deterministic mode, adaptive vs fixed 1024 (issue 4)
#   match  the loss matches of `multi` with deterministic kernels next to
#          the same one-GPU run from weights moved by one ulp (how far the
#          recipe carries a last-bit difference; deterministic repeats gave
#          bitwise equal losses at 77985b7); on four GPUs also scaling over
#          1, 2, 4 GPUs
#   recipe the recipe's attention dropout (0.3) on the fused kernels:
#          per-kernel times with and without it, a tile sweep, training
#          throughput at fixed 2048, adaptive ~1024 and fixed 1024 (issue 13)
#   presets peak memory of every large preset with default arguments and its
#          recipe's dropout at its largest span, planned for an 80 GB card;
#          PyTorch recipe throughput (issue 13)
#   position the position term through XLA matmuls (no in-kernel ring):
#          compiled checks, per-kernel times, recipe throughput (issue 13)
#   compiled the compiled PyTorch step (Triton kernels as custom operators,
#          inductor) against eager: recipe throughput at fixed 2048,
#          adaptive ~1024, fixed 1024 and the small geometry; the
#          operators' tests on CUDA (issue 13)
#   profile where the recipe's step time goes (`throughput.py --profile`:
#          device time by category and the top kernels, per step), JAX and
#          compiled PyTorch at fixed 2048, adaptive ~1024 and fixed 1024,
#          the Triton kernels' two position designs kernel by kernel
#          (issue 13; the traces stay on the machine, the summaries come
#          back in the JSON lines)
#   chunks the position-score cap, 1 GiB against 512 MiB (JAX), and the
#          Triton matmul position design's whole compiled step (issue 13)
#   recipes the small geometry on both backends and the large presets'
#          recipes at full span, planned for 80 GB (issue 13)
#   fullspan the large presets at full span with default arguments after
#          the batch-chunk fix, JAX's memory-usage report at 6 layers of
#          enwik8_large (issue 13)
#   cudagraphs the compiled PyTorch step replayed as one CUDA graph against
#          launches from the host: small geometry, recipe (issue 13)
#   ring   the segment memory as a ring buffer: adaptive ~1024 against
#          fixed 1024, JAX and compiled PyTorch (issue 13)
#   torchring the PyTorch segment memory as a ring buffer
#          (KERAS_ALLATTN_TORCH_RING=1) against the rotation: compiled
#          adaptive ~1024 (both) and fixed 1024 (ring), 20 steps; the CUDA
#          tests of the compiled step with the ring (issue 13; one GPU,
#          about 8 minutes)
#   tritonsweep the Triton kernels' tile sweep (SWEEP of
#          triton_kernel_check.py) with the recipe's dropout at fixed 2048
#          and at the trimmed adaptive shape, kernel by kernel (issue 13)
#   tritonprobe what the Triton kernels' time is made of: dropout 0 against
#          0.3 (the mask's hash) and the two designs of the position term,
#          at fixed 2048 and the trimmed adaptive shape, kernel by kernel
#   pallassweep Pallas tile shapes against the default tiles, kernel by
#          kernel in alternating rounds (pallas_ab.py --tiles), at fixed
#          2048 and the trimmed adaptive shape, dropout 0.3
#   pallasprograms how many programs the Pallas grids aim at (each program
#          loops over ceil(tiles / groups) tiles; 4096 by default, one tile a
#          program at enwik8_small) against 1024, 32768 and 512, fixed 2048
#          and trimmed adaptive, dropout 0.3
#   pallasab the Pallas kernels against each file of PALLAS_BASELINES
#          (pallas_ab.py), fixed 2048 and trimmed adaptive, dropout 0.3
#   tritonab the Triton kernels against each file of TRITON_BASELINES
#          (other versions of triton_attention.py, e.g. from `git show`),
#          per kernel in alternating rounds (benchmarks/triton_ab.py) at
#          the trimmed adaptive shape and fixed 1024, dropout 0.3
#   hosts  on two GPUs: the 200-step equivalence verdict of 2 devices and
#          2 processes against one (JAX, PyTorch), against the spread of
#          three one-ulp nudged one-device runs, deterministic (issue 17)
#   hosts-scaling on two GPUs: scaling's 2-processes x 1-GPU rows against
#          1 process x 2 GPUs (issue 17)
#   multi8 on a 4- or 8-GPU machine: scaling over 1, 2, 4, 8 GPUs (batch 64
#          per GPU) and the first 200 step losses of 8 GPUs against one
#          GPU at global batch 64 (deterministic kernels; next to the one-ulp
#          nudge of `match`), JAX, then PyTorch scaling
#          (loss_match and scaling.py checked on 8 virtual CPU devices)
# Settings: TRAIN_SECONDS (text8, default 110), PTB_SECONDS (45),
# PORTABLE=1 (multi: also the loss match through the portable path),
# NO_SCALING=1 (multi: the loss matches only),
# LANE_GPUS (the GPUs of lanes 0 and 1, default "0 1": two phases can run
# side by side on a four-GPU machine, e.g. LANE_GPUS="2 3" for the second),
# NO_TRAIN_THROUGHPUT=1 (train: leave the throughput runs to `speed`).
set -u
phase=${1:?phase: train, multi, speed, kernels, match or multi8}
out=${2:-${OUT:-/tmp/out}}
mkdir -p "$out"
# One install at a time when phases run side by side.
flock .site.lock python3 -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --upgrade --target .site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/.site:$PWD TF_CPP_MIN_LOG_LEVEL=3
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
gpus=$(nvidia-smi -L | wc -l)
T=${TRAIN_SECONDS:-110} P=${PTB_SECONDS:-45}

step() {  # name, timeout, command...: output in $out/name.txt, summary here
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "== $name rc=$? $((SECONDS - t0)) s"
  grep '^{' "$out/$name.txt" | tail -3 | cut -c1-900
  grep -m3 -E 'Error|error:|Traceback' "$out/$name.txt" | cut -c1-300
  # Rows recorded so far come back even if the call is cut short.
  cp benchmarks/RESULTS.md "$out/RESULTS.md"
}
read -r g0 g1 <<< "${LANE_GPUS:-0 1}"
lanes() {  # runs lane0 and lane1, in parallel where there are two GPUs
  if [ "$gpus" -ge 2 ]; then
    (CUDA_VISIBLE_DEVICES=$g0 lane0) & (CUDA_VISIBLE_DEVICES=$g1 lane1) & wait
  else
    lane0; lane1
  fi
}
tp="python3 benchmarks/throughput.py --preset enwik8_small --steps ${STEPS:-6} --warmup-steps 2 --record"
pre="python3 benchmarks/throughput.py --steps 4 --warmup-steps 2 --record --dropout recipe"
jax_presets_full() {  # the JAX presets at their largest span, default arguments, 80 GB
  for p in enwik8_small enwik8_large; do
    step "jax_${p}_full" 200 env KERAS_BACKEND=jax XLA_PYTHON_CLIENT_MEM_FRACTION=0.43 \
      $pre --preset $p --span adaptive:8192
  done
  step jax_wikitext103_full 150 env KERAS_BACKEND=jax XLA_PYTHON_CLIENT_MEM_FRACTION=0.43 \
    $pre --preset wikitext103 --span adaptive:2048
}

case $phase in
train)
  t8="python3 examples/train_text8.py --data .data/wiki-text8 --preset text8_small
      --mixed-precision --steps 600 --time-budget $T --eval-every 100
      --valid-tokens 131072"
  ptb="python3 examples/train_ptb.py --data .data/ptb --steps 20000
      --time-budget $P --eval-every 1000"
  lane0() {
    step text8_allattn 330 env KERAS_BACKEND=jax $t8 --output "$out/text8_allattn"
    step ptb_allattn 130 env KERAS_BACKEND=jax $ptb --output "$out/ptb_allattn"
    [ -n "${NO_TRAIN_THROUGHPUT:-}" ] ||
      step jax_adaptive 140 env KERAS_BACKEND=jax $tp --span adaptive:1024 --implementation fused
  }
  lane1() {
    step text8_transformer 330 env KERAS_BACKEND=jax $t8 --transformer --output "$out/text8_transformer"
    step ptb_transformer 130 env KERAS_BACKEND=jax $ptb --transformer --output "$out/ptb_transformer"
    [ -n "${NO_TRAIN_THROUGHPUT:-}" ] ||
      step jax_fixed1k 140 env KERAS_BACKEND=jax $tp --span fixed:1024 --implementation fused
  }
  lanes
  # Bring back curve.json and spans.png only: checkpoints are too large,
  # and the device tool returns a limited number of files.
  rm -rf "$out"/*/checkpoints "$out"/*/tensorboard ;;
multi)
  lm="python3 benchmarks/loss_match.py --compare devices --steps 50 --record
      --data .data/enwik8-head/enwik8-head.txt.xz --implementation fused"
  sc="python3 benchmarks/scaling.py --preset enwik8_small --batch-per-device 64
      --steps 8 --warmup-steps 2 --implementation fused --record"
  step torch_loss_1gpu 80 env KERAS_BACKEND=torch $lm --save /tmp/one_gpu
  step torch_loss_2gpu 80 env KERAS_BACKEND=torch torchrun --nproc_per_node 2 ${lm#python3 } --reference /tmp/one_gpu --plot "$out/torch_loss_match.png"
  [ -n "${NO_SCALING:-}" ] ||
    step torch_scaling_1 90 env KERAS_BACKEND=torch $sc
  [ -n "${NO_SCALING:-}" ] ||
    step torch_scaling_2 90 env KERAS_BACKEND=torch torchrun --nproc_per_node 2 ${sc#python3 }
  step jax_loss_match 200 env KERAS_BACKEND=jax $lm --devices 2 --plot "$out/jax_loss_match.png"
  [ -n "${NO_SCALING:-}" ] ||
    step jax_scaling 200 env KERAS_BACKEND=jax $sc --devices 1,2
  # The floor: the same one-GPU run twice.
  step torch_loss_repeat 100 env KERAS_BACKEND=torch ${lm/devices/repeat}
  step jax_loss_repeat 150 env KERAS_BACKEND=jax ${lm/devices/repeat}
  # PORTABLE=1: the match through the portable path too (no atomics).
  [ -n "${PORTABLE:-}" ] && step jax_loss_match_portable 200 env KERAS_BACKEND=jax \
    ${lm/--implementation fused/--implementation portable} --devices 2 ;;
speed)
  lane0() {
    step jax_fixed 200 env KERAS_BACKEND=jax $tp --span fixed:2048 --implementation fused
    step jax_adaptive 200 env KERAS_BACKEND=jax $tp --span adaptive:1024 --implementation fused
    step jax_fixed1k 200 env KERAS_BACKEND=jax $tp --span fixed:1024 --implementation fused
    step jax_portable 200 env KERAS_BACKEND=jax $tp --span fixed:2048 --implementation portable
    step jax_fused_vs_portable 240 env KERAS_BACKEND=jax python3 benchmarks/loss_match.py \
      --compare implementations --steps 200 --layers 6 --batch-size 32 \
      --data .data/enwik8-head/enwik8-head.txt.xz --record --plot "$out/jax_fused_vs_portable.png"
  }
  lane1() {
    step torch_fixed 150 env KERAS_BACKEND=torch $tp --span fixed:2048 --implementation fused
    step torch_adaptive 150 env KERAS_BACKEND=torch $tp --span adaptive:1024 --implementation fused
    step torch_fixed1k 150 env KERAS_BACKEND=torch $tp --span fixed:1024 --implementation fused
    step softmax_memory 200 env KERAS_BACKEND=torch python3 benchmarks/adaptive_softmax_memory.py --record
    step torch_fused_vs_portable 240 env KERAS_BACKEND=torch python3 benchmarks/loss_match.py \
      --compare implementations --steps 200 --layers 6 --batch-size 32 \
      --data .data/enwik8-head/enwik8-head.txt.xz --record --plot "$out/torch_fused_vs_portable.png"
  }
  lanes ;;
multi8)
  sc="python3 benchmarks/scaling.py --preset enwik8_small --batch-per-device 64
      --steps 8 --warmup-steps 2 --implementation fused --record"
  lm="python3 benchmarks/loss_match.py --compare devices --steps 200 --record
      --data .data/enwik8-head/enwik8-head.txt.xz --implementation fused --deterministic"
  counts=1; for n in 2 4 8; do [ "$n" -le "$gpus" ] && counts="$counts,$n"; done
  step jax_scaling 400 env KERAS_BACKEND=jax $sc --devices "$counts"
  step jax_loss_match 400 env KERAS_BACKEND=jax $lm --devices "$gpus" --plot "$out/jax_loss_match_$gpus.png"
  step jax_loss_perturbed 300 env KERAS_BACKEND=jax ${lm/devices/perturbed} --plot "$out/jax_loss_perturbed.png"
  step torch_scaling_1 90 env KERAS_BACKEND=torch $sc
  for n in ${counts//,/ }; do
    [ "$n" -gt 1 ] && step "torch_scaling_$n" 120 env KERAS_BACKEND=torch torchrun --nproc_per_node "$n" ${sc#python3 }
  done ;;
kernels)
  # Where the step time goes, per kernel (forward, dK/dV, dQ, persistent),
  # and what the deterministic mode costs; the adaptive vs fixed-1024 pair
  # times the Pallas kernels' skipped mask logarithm (a042cd6).
  lane0() {
    step pallas_profile 300 env KERAS_BACKEND=jax python3 benchmarks/kernel_check.py \
      --profile --no-check --only enwik8_small_bf16,adaptive_L8192_span1k_bf16
    step jax_adaptive 120 env KERAS_BACKEND=jax $tp --span adaptive:1024 --implementation fused
    step jax_fixed1k 120 env KERAS_BACKEND=jax $tp --span fixed:1024 --implementation fused
    step jax_deterministic 120 env KERAS_BACKEND=jax KERAS_ALLATTN_DETERMINISTIC=1 \
      $tp --span fixed:2048 --implementation fused
    step jax_fixed 120 env KERAS_BACKEND=jax $tp --span fixed:2048 --implementation fused
  }
  lane1() {
    step triton_check 300 env KERAS_BACKEND=torch python3 benchmarks/triton_kernel_check.py \
      --no-sweep --no-check --no-portable-timing
    step torch_deterministic 120 env KERAS_BACKEND=torch KERAS_ALLATTN_DETERMINISTIC=1 \
      $tp --span fixed:2048 --implementation fused
    step torch_fixed 120 env KERAS_BACKEND=torch $tp --span fixed:2048 --implementation fused
  }
  lanes ;;
match)
  # Deterministic kernels (one position-gradient buffer per program) and
  # backend switches: 1 vs 2 GPUs and the run-to-run floor, side by side on
  # a four-GPU machine, then the scaling rows a four-GPU machine adds.
  lm="python3 benchmarks/loss_match.py --compare devices --steps 50 --record
      --data .data/enwik8-head/enwik8-head.txt.xz --implementation fused --deterministic"
  pair() {
    step torch_loss_1gpu 80 env KERAS_BACKEND=torch $lm --save /tmp/one_gpu
    step torch_loss_2gpu 80 env KERAS_BACKEND=torch torchrun --nproc_per_node 2 ${lm#python3 } --reference /tmp/one_gpu --plot "$out/torch_loss_match.png"
    step jax_loss_match 200 env KERAS_BACKEND=jax $lm --devices 2 --plot "$out/jax_loss_match.png"
  }
  if [ "$gpus" -ge 4 ]; then
    (export CUDA_VISIBLE_DEVICES=0,1; pair) &
    (export CUDA_VISIBLE_DEVICES=2; step jax_loss_perturbed 150 env KERAS_BACKEND=jax ${lm/devices/perturbed} --plot "$out/jax_loss_perturbed.png") &
    (export CUDA_VISIBLE_DEVICES=3; step torch_loss_perturbed 100 env KERAS_BACKEND=torch ${lm/devices/perturbed} --plot "$out/torch_loss_perturbed.png") &
    wait
    sc="python3 benchmarks/scaling.py --preset enwik8_small --batch-per-device 64
        --steps 8 --warmup-steps 2 --implementation fused --record"
    step jax_scaling 200 env KERAS_BACKEND=jax $sc --devices 1,2,4
    step torch_scaling_4 100 env KERAS_BACKEND=torch torchrun --nproc_per_node 4 ${sc#python3 }
  else
    pair
    step jax_loss_perturbed 150 env KERAS_BACKEND=jax ${lm/devices/perturbed}
    step torch_loss_perturbed 100 env KERAS_BACKEND=torch ${lm/devices/perturbed}
  fi ;;
recipe)
  # The paper's recipe (attention dropout 0.3) on the fused kernels: the
  # per-kernel cost of the in-kernel dropout, a Hopper tile sweep, and
  # training throughput at fixed 2048, adaptive ~1024 and fixed 1024.
  kc="python3 benchmarks/kernel_check.py --no-check --only enwik8_small_bf16"
  lane0() {
    step pallas_profile 240 env KERAS_BACKEND=jax $kc --profile
    step pallas_profile_dropout 240 env KERAS_BACKEND=jax $kc --profile --dropout 0.3
    step jax_fixed_dropout 150 env KERAS_BACKEND=jax $tp --span fixed:2048 --dropout 0.3 --implementation fused --remat off
    step jax_adaptive_dropout 150 env KERAS_BACKEND=jax $tp --span adaptive:1024 --dropout 0.3 --implementation fused --remat off
    step jax_fixed1k_dropout 150 env KERAS_BACKEND=jax $tp --span fixed:1024 --dropout 0.3 --implementation fused --remat off
  }
  lane1() {
    step pallas_sweep_dropout 500 env KERAS_BACKEND=jax $kc --no-time --sweep --dropout 0.3
  }
  lanes ;;
presets)
  # Default arguments (remat="auto") with each preset's recipe dropout at
  # the largest span it can reach, planned for an 80 GB card: JAX with the
  # allocator share it takes on such a card by default (75% of 80 GB), and
  # PyTorch limited to 80 GiB; then the recipe's throughput on PyTorch.
  lane0() {
    jax_presets_full
  }
  lane1() {
    step triton_gpu_tests 150 env KERAS_BACKEND=torch TRITON_INTERPRET=0 \
      python3 -m pytest -q -p no:cacheprovider tests/test_triton_attention.py
    step triton_dropout_timing 150 env KERAS_BACKEND=torch python3 benchmarks/triton_kernel_check.py \
      --configs fixed --no-sweep --no-check --no-portable-timing --dropout 0.3
    step torch_fixed_dropout 120 env KERAS_BACKEND=torch $tp --span fixed:2048 --dropout 0.3
    step torch_adaptive_dropout 120 env KERAS_BACKEND=torch $tp --span adaptive:1024 --dropout 0.3
    step torch_fixed1k_dropout 120 env KERAS_BACKEND=torch $tp --span fixed:1024 --dropout 0.3
    step torch_enwik8_large_full 200 env KERAS_BACKEND=torch $pre --preset enwik8_large \
      --span adaptive:8192 --memory-gib 80
  }
  lanes ;;
adaptive)
  # Why adaptive spans near 1024 cost more than a fixed 1024 on JAX: the
  # kernels on the trimmed memory (1280 rows) against A = 1024, with the
  # recipe's dropout; the small geometry on both backends; PyTorch's
  # enwik8_large at its full span (whole-layer remat) planned for 80 GB.
  kc="python3 benchmarks/kernel_check.py --no-check --profile --profile-tiles 1 --dropout 0.3"
  small="--layers 6 --hidden-dim 256 --num-heads 4 --persistent 256 --block-size 256 --batch-size 32 --span fixed:2048 --dropout 0.3"
  lane0() {
    step pallas_profile_adaptive 200 env KERAS_BACKEND=jax $kc --only adaptive_A1280_span1k_bf16,fixed_A1024_bf16
    step jax_small 120 env KERAS_BACKEND=jax $tp $small
    step jax_adaptive_dropout 150 env KERAS_BACKEND=jax $tp --span adaptive:1024 --dropout 0.3
  }
  lane1() {
    step torch_small 120 env KERAS_BACKEND=torch $tp $small
    step torch_enwik8_large_full 240 env KERAS_BACKEND=torch python3 benchmarks/throughput.py \
      --steps 4 --warmup-steps 2 --record --dropout recipe --preset enwik8_large \
      --span adaptive:8192 --memory-gib 80
  }
  lanes ;;
adaptive2)
  # Adaptive ~1024 against fixed 1024 with the recipe's dropout, both
  # backends, side by side.
  lane0() {
    step jax_adaptive_dropout 150 env KERAS_BACKEND=jax $tp --span adaptive:1024 --dropout 0.3
    step jax_fixed1k_dropout 150 env KERAS_BACKEND=jax $tp --span fixed:1024 --dropout 0.3
  }
  lane1() {
    step torch_adaptive_dropout 150 env KERAS_BACKEND=torch $tp --span adaptive:1024 --dropout 0.3
    step torch_fixed1k_dropout 150 env KERAS_BACKEND=torch $tp --span fixed:1024 --dropout 0.3
  }
  lanes ;;
position)
  # The position term through XLA (QP scores, dS, two matmuls) instead of
  # the in-kernel ring: compiled correctness, per-kernel times for a few
  # tile shapes without and with the recipe's dropout, and the recipe's
  # training throughput (fixed 2048, adaptive ~1024, fixed 1024).
  kc="python3 benchmarks/kernel_check.py --no-check --profile --only enwik8_small_bf16"
  lane0() {
    step pallas_check_dropout 150 env KERAS_BACKEND=jax python3 benchmarks/kernel_check.py \
      --no-time --dropout 0.3 --only smoke_odd_shapes,smoke_separate_q128_k32,enwik8_small_bf16
    step pallas_profile_dropout 200 env KERAS_BACKEND=jax $kc --dropout 0.3 --profile-tiles ${PROFILE_TILES:-2}
    [ -n "${PROFILE_PLAIN:-}" ] && step pallas_profile 200 env KERAS_BACKEND=jax $kc
  }
  lane1() {
    step jax_fixed_dropout 150 env KERAS_BACKEND=jax $tp --span fixed:2048 --dropout 0.3
    step jax_adaptive_dropout 150 env KERAS_BACKEND=jax $tp --span adaptive:1024 --dropout 0.3
    step jax_fixed1k_dropout 150 env KERAS_BACKEND=jax $tp --span fixed:1024 --dropout 0.3
  }
  lanes ;;
compiled)
  # The compiled PyTorch step with the Triton kernels as custom operators
  # (inductor) against eager, at the recipe and the small geometry; the
  # operators' tests on CUDA; JAX's small geometry beside them.
  small="--layers 6 --hidden-dim 256 --num-heads 4 --persistent 256 --block-size 256 --batch-size 32 --span fixed:2048 --dropout 0.3"
  lane0() {
    step triton_cuda_tests 240 env KERAS_BACKEND=torch TRITON_INTERPRET=0 \
      python3 -m pytest -q -p no:cacheprovider tests/test_triton_attention.py tests/test_torch_compile.py
    step torch_small_eager 120 env KERAS_BACKEND=torch $tp $small --jit-compile off
    step torch_small_compiled 240 env KERAS_BACKEND=torch $tp $small --jit-compile on
    step jax_small 120 env KERAS_BACKEND=jax $tp $small
  }
  lane1() {
    for s in fixed:2048 adaptive:1024 fixed:1024; do
      step "torch_${s/:/_}_eager" 150 env KERAS_BACKEND=torch $tp --span $s --dropout 0.3 --jit-compile off
      step "torch_${s/:/_}_compiled" 300 env KERAS_BACKEND=torch $tp --span $s --dropout 0.3 --jit-compile on
    done
  }
  lanes ;;
profile)
  # Fits one call (two lanes of at most 560 s): JAX's three spans, then the
  # Triton kernels' two position designs kernel by kernel, beside compiled
  # PyTorch's three spans.
  pf="--dropout 0.3 --profile /tmp/traces --profile-steps 3"
  lane0() {
    for s in fixed:2048 adaptive:1024 fixed:1024; do
      step "jax_${s/:/_}_profile" 130 env KERAS_BACKEND=jax $tp --span $s $pf
    done
    # The Triton kernels' other position design (QP and its gradients
    # through PyTorch matmuls) against the default, kernel by kernel.
    step triton_positions 160 env KERAS_BACKEND=torch python3 benchmarks/triton_kernel_check.py \
      --configs fixed,adaptive --check-batch 4 --no-sweep --no-portable-timing \
      --no-portable-bf16-error --dropout 0.3 --position in_kernel,matmul --profile
  }
  lane1() {
    for s in fixed:2048 adaptive:1024 fixed:1024; do
      step "torch_${s/:/_}_profile" 180 env KERAS_BACKEND=torch $tp --span $s $pf --jit-compile on
    done
  }
  lanes ;;
chunks)
  # The position-score cap (KERAS_ALLATTN_POSITION_BYTES): JAX at the
  # default (1 GiB: one pass over the batch at fixed 2048 and adaptive
  # ~1024) against the earlier 512 MiB (two chunks), in the same call;
  # beside them the Triton kernels' matmul position design, compiled, at the
  # three spans (issue 13).
  pf="--dropout 0.3 --profile /tmp/traces --profile-steps 3"
  lane0() {
    for s in fixed:2048 adaptive:1024; do
      step "jax_${s/:/_}_1gib" 130 env KERAS_BACKEND=jax $tp --span $s $pf
      step "jax_${s/:/_}_512mib" 130 env KERAS_BACKEND=jax KERAS_ALLATTN_POSITION_BYTES=536870912 \
        $tp --span $s --dropout 0.3
    done
  }
  lane1() {
    for s in fixed:2048 adaptive:1024 fixed:1024; do
      step "torch_${s/:/_}_matmul" 180 env KERAS_BACKEND=torch KERAS_ALLATTN_TRITON_POSITION=matmul \
        $tp --span $s $pf --jit-compile on
    done
  }
  lanes ;;
recipes)
  # The defaults of the session (1 GiB position-score cap, the Triton
  # kernels' matmul position design): the small geometry on both backends
  # (PyTorch compiled at least half of JAX), and the large presets with
  # their recipes at full span with default arguments, planned for an 80 GB
  # card as in `presets` (issue 13).
  small="--layers 6 --hidden-dim 256 --num-heads 4 --persistent 256 --block-size 256 --batch-size 32 --span fixed:2048 --dropout 0.3"
  pre="python3 benchmarks/throughput.py --steps 4 --warmup-steps 2 --record --dropout recipe --span adaptive:8192"
  lane0() {
    step jax_small 100 env KERAS_BACKEND=jax $tp $small
    for p in enwik8_large text8_large; do
      step "jax_${p}_full" 150 env KERAS_BACKEND=jax XLA_PYTHON_CLIENT_MEM_FRACTION=0.43 $pre --preset $p
    done
  }
  lane1() {
    step torch_small 150 env KERAS_BACKEND=torch $tp $small --jit-compile on
    step torch_text8_large_full 150 env KERAS_BACKEND=torch $pre --preset text8_large --memory-gib 80
  }
  lanes ;;
fullspan)
  # Every large preset with default arguments and its recipe's dropout at
  # the largest span it can reach, planned for an 80 GB card, after the
  # Pallas batch chunks stopped keeping every layer's dK/dV (8ba9f17); and
  # where JAX's whole-layer recomputation still spends 1.0 GiB a layer
  # (0.84 at c0bd5e7): the step's XLA memory-usage report at 6 layers.
  # PyTorch text8_large trains eagerly on CUDA under remat="layer" (2f509c6).
  lane0() {
    jax_presets_full
    step jax_large6_dump 120 env KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false \
      XLA_FLAGS="--xla_dump_to=/tmp/fullspan_dump --xla_dump_hlo_module_re=.*train_step.*" \
      python3 benchmarks/throughput.py --preset enwik8_large --span adaptive:8192 \
      --dropout recipe --remat layer --layers 6 --steps 1 --warmup-steps 1
    head -45 /tmp/fullspan_dump/*memory-usage-report* | cut -c1-300
  }
  lane1() {
    step torch_text8_large_full 300 env KERAS_BACKEND=torch $pre --preset text8_large \
      --span adaptive:8192 --memory-gib 80
  }
  lanes ;;
cudagraphs)
  # The compiled PyTorch step as one CUDA graph (KERAS_ALLATTN_TORCH_CUDA_GRAPHS,
  # default on) against kernel launches from the host: its CUDA test, the
  # small geometry (host-bound) with and without, JAX's beside it, and the
  # recipe at fixed 2048 with it (issue 13).
  small="--layers 6 --hidden-dim 256 --num-heads 4 --persistent 256 --block-size 256 --batch-size 32 --span fixed:2048 --dropout 0.3"
  lane0() {
    step cuda_graph_test 150 env KERAS_BACKEND=torch TRITON_INTERPRET=0 \
      python3 -m pytest -q -p no:cacheprovider tests/test_torch_compile.py -k cuda_graph
    step torch_small_graphs 150 env KERAS_BACKEND=torch $tp $small --jit-compile on
    step torch_small_launches 150 env KERAS_BACKEND=torch KERAS_ALLATTN_TORCH_CUDA_GRAPHS=0 \
      $tp $small --jit-compile on
    step jax_small 100 env KERAS_BACKEND=jax $tp $small
  }
  lane1() {
    for s in ${SPANS:-fixed:2048}; do
      step "torch_${s/:/_}_graphs" 200 env KERAS_BACKEND=torch $tp --span $s --dropout 0.3 --jit-compile on
    done
  }
  lanes ;;
ring)
  # The segment memory as a ring buffer (JAX, PyTorch): adaptive ~1024
  # against fixed 1024 on both backends (rows at 5a3aac8 are the rotation
  # it replaces), after the CUDA tests of the compiled step (CUDA graph,
  # the ring operator inside it) (issue 13).
  lane0() {
    step cuda_graph_test 150 env KERAS_BACKEND=torch TRITON_INTERPRET=0 \
      python3 -m pytest -q -p no:cacheprovider tests/test_torch_compile.py -k cuda_graph
    for s in adaptive:1024 fixed:1024; do
      step "jax_${s/:/_}" 120 env KERAS_BACKEND=jax $tp --span $s --dropout 0.3
    done
  }
  lane1() {
    for s in adaptive:1024 fixed:1024; do
      step "torch_${s/:/_}" 200 env KERAS_BACKEND=torch $tp --span $s --dropout 0.3 --jit-compile on
    done
  }
  lanes ;;
torchring)
  # PyTorch's segment memory as a ring buffer against the rotation it
  # replaces where KERAS_ALLATTN_TORCH_RING=1, compiled, the same call
  # (issue 13). Reading only the attended rows (1bdede6), a step should
  # write 512 rows and read 1,280 a layer instead of rewriting 8,192.
  lane0() {
    step cuda_tests_ring 200 env KERAS_BACKEND=torch TRITON_INTERPRET=0 KERAS_ALLATTN_TORCH_RING=1 \
      python3 -m pytest -q -p no:cacheprovider tests/test_torch_compile.py -k "cuda_graph or torch_ring"
    for ring in 1 0; do
      step "torch_adaptive_1024_ring$ring" 200 env KERAS_BACKEND=torch KERAS_ALLATTN_TORCH_RING=$ring \
        $tp --steps 20 --span adaptive:1024 --dropout 0.3 --jit-compile on
    done
  }
  lane1() {  # the rotation's fixed 1024: 171,541 tokens/s at 74a3785
    step torch_fixed_1024_ring1 200 env KERAS_BACKEND=torch KERAS_ALLATTN_TORCH_RING=1 \
      $tp --steps 20 --span fixed:1024 --dropout 0.3 --jit-compile on
  }
  lanes ;;
tritonsweep)
  # Tile shapes of the Triton kernels under the matmul position design and
  # dropout 0.3 (the defaults were swept under the in-kernel design), each
  # shape's whole forward+backward and its kernels' times (issue 13).
  lane0() {
    step triton_sweep_fixed 280 env KERAS_BACKEND=torch python3 benchmarks/triton_kernel_check.py \
      --configs fixed --no-check --no-portable-timing --dropout 0.3 --profile
  }
  lane1() {
    step triton_sweep_trimmed 280 env KERAS_BACKEND=torch python3 benchmarks/triton_kernel_check.py \
      --configs trimmed --no-check --no-portable-timing --dropout 0.3 --profile
  }
  lanes ;;
tritonprobe)
  # Where the Triton kernels' time goes at 4 warps (issue 13): the
  # dropout mask (a 32-bit hash a weight, in each of the three kernels) and
  # the position term's design (the matmul design moves the (B, H, M, A)
  # scores and their gradient through memory, the in-kernel one computes
  # them per tile with atomics for the position gradient).
  for rate in 0 0.3; do
    step "triton_probe_dropout$rate" 200 env KERAS_BACKEND=torch python3 benchmarks/triton_kernel_check.py \
      --configs fixed,trimmed --no-check --no-sweep --no-portable-timing \
      --dropout $rate --position in_kernel,matmul --profile
  done ;;
pallassweep)
  # Tiles of the Pallas kernels against their defaults (64x64 forward,
  # dK/dV 64x64, dQ 64x32 with 3 stages, 4 warps), each variant in one
  # process with the defaults (issue 13): baseline_over_current > 1 means
  # the variant is faster.
  pab="python3 benchmarks/pallas_ab.py --baseline keras_allattn/ops/pallas_attention.py
       --configs enwik8_small_bf16,adaptive_A1280_span1k_bf16 --dropout 0.3 --record"
  n=0
  for t in '{"backward_blocks": [[64, 64], [64, 64, 4, 3]]}' \
           '{"backward_blocks": [[64, 64], [32, 64, 4, 2]]}' \
           '{"backward_blocks": [[64, 64, 4, 3], [64, 32, 4, 3]]}' \
           '{"backward_blocks": [[32, 64, 4, 2], [64, 32, 4, 3]]}' \
           '{"num_stages": 3, "backward_blocks": [[64, 64, 4, 2], [64, 32, 4, 3]]}' \
           '{"block_q": 128, "num_warps": 8, "backward_blocks": [[64, 64, 4, 2], [64, 32, 4, 3]]}'; do
    n=$((n + 1))
    step "pallas_tiles_$n" 150 env KERAS_BACKEND=jax $pab --tiles "$t"
  done ;;
pallasprograms)
  # The Pallas grids aim at `num_programs` programs (default 4096: at B 64,
  # H 8 one forward query tile a program, the Triton kernels' grid; 1024,
  # four tiles a program, ran 5 to 10% slower on an H200, RESULTS.md).
  # baseline_over_current > 1: the variant (the baseline's tiles) is slower.
  pab="python3 benchmarks/pallas_ab.py --baseline keras_allattn/ops/pallas_attention.py
       --configs enwik8_small_bf16,adaptive_A1280_span1k_bf16 --dropout 0.3 --record"
  n=0
  for t in '{"num_programs": 1024}' '{"num_programs": 32768}' '{"num_programs": 512}'; do
    n=$((n + 1))
    step "pallas_programs_$n" 150 env KERAS_BACKEND=jax $pab --baseline-tiles "$t"
  done ;;
pallasab)
  # Code variants of the Pallas kernels in one process with the current
  # module (issue 13): baseline_over_current < 1 means the variant is
  # faster ("bwd" compares whole backward passes).
  for f in ${PALLAS_BASELINES:?PALLAS_BASELINES: files of other versions of pallas_attention.py}; do
    step "pallas_ab_$(basename "$f" .py)" 280 env KERAS_BACKEND=jax \
      python3 benchmarks/pallas_ab.py --baseline "$f" \
      --configs enwik8_small_bf16,adaptive_A1280_span1k_bf16 --dropout 0.3 --record
  done ;;
tritonab)
  # Code variants of the Triton kernels, kernel by kernel, in one process
  # with the current module (issue 13): baseline_over_current < 1 means the
  # variant is faster.
  for f in ${TRITON_BASELINES:?TRITON_BASELINES: files of other versions of triton_attention.py}; do
    step "triton_ab_$(basename "$f" .py)" 280 env KERAS_BACKEND=torch \
      python3 benchmarks/triton_ab.py --baseline "$f" --configs trimmed,fixed1024 \
      --dropout 0.3 --record
  done ;;
hosts)
  # Issue 17 on two GPUs of one host: the 200-step equivalence verdict of
  # 2 devices of one process and of 2 processes against one device, each
  # against the spread of three one-ulp nudged repeats of the one-device
  # run (`--nudges 3`), JAX and PyTorch, every run bitwise reproducible
  # (`--deterministic`, on the saving and the loading side alike). The
  # one-device runs (the reference and its three nudged repeats, four
  # 200-step runs) run once per backend, JAX on the first GPU beside
  # PyTorch on the second, and are saved; the 2-device and 2-process runs
  # load them (one 200-step run each). The loss matches train 6 of the
  # preset's 18 layers so that the phase fits one call: in the default
  # mode a JAX run took 25-30 s after a ~30 s compile, the saving runs
  # (then two) 86-89 s (JAX) and 76 s (PyTorch), the 2-process launches
  # 41 s and 44 s, so about 300 s here. The deterministic mode's cost on
  # these runs is not measured yet: the step limits (570 s in all) allow
  # runs about 1.7 times as slow.
  # Scaling's rows: `hosts-scaling`.
  lm="python3 benchmarks/loss_match.py --compare devices --steps 200 --layers 6 --deterministic --nudges 3 --record --data .data/enwik8-head/enwik8-head.txt.xz"
  # One JAX process of two (`timeout` runs programs, not shell functions).
  jd="env KERAS_BACKEND=jax KERAS_DISTRIBUTION_JOB_ADDRESSES=localhost:12355 KERAS_DISTRIBUTION_NUM_PROCESSES=2"
  lane0() { step jax_match_one 270 env KERAS_BACKEND=jax $lm --save /tmp/one_gpu_jax; }
  lane1() { step torch_match_one 270 env KERAS_BACKEND=torch $lm --save /tmp/one_gpu_torch; }
  lanes
  # Both GPUs in one JAX process (what `--devices 2` compares, without
  # repeating the saved one-device runs).
  step jax_match_devices 100 env KERAS_BACKEND=jax $lm --reference /tmp/one_gpu_jax \
    --plot "$out/jax_match_devices.png"
  ( step jax_match_proc1 100 $jd KERAS_DISTRIBUTION_PROCESS_ID=1 CUDA_VISIBLE_DEVICES=1 \
      $lm --reference /tmp/one_gpu_jax ) &
  step jax_match_proc0 100 $jd KERAS_DISTRIBUTION_PROCESS_ID=0 CUDA_VISIBLE_DEVICES=0 \
    $lm --reference /tmp/one_gpu_jax --plot "$out/jax_match_2proc.png"; wait
  step torch_match_2proc 100 env KERAS_BACKEND=torch torchrun --nproc_per_node 2 \
    ${lm#python3 } --reference /tmp/one_gpu_torch --plot "$out/torch_match_2proc.png" ;;
hosts-scaling)
  # Issue 17 on two GPUs of one host: scaling's one-process rows, then the
  # 2-processes x 1-GPU rows against them.
  # 64 rows per GPU as the earlier scaling rows (the default, 8, leaves
  # eager PyTorch launch-bound).
  sc="python3 benchmarks/scaling.py --record --batch-per-device 64"
  step jax_scaling 200 env KERAS_BACKEND=jax $sc --devices 1,2
  ( step jax_scaling_proc1 200 env KERAS_BACKEND=jax KERAS_DISTRIBUTION_JOB_ADDRESSES=localhost:12356 \
      KERAS_DISTRIBUTION_NUM_PROCESSES=2 KERAS_DISTRIBUTION_PROCESS_ID=1 CUDA_VISIBLE_DEVICES=1 $sc ) &
  step jax_scaling_proc0 200 env KERAS_BACKEND=jax KERAS_DISTRIBUTION_JOB_ADDRESSES=localhost:12356 \
    KERAS_DISTRIBUTION_NUM_PROCESSES=2 KERAS_DISTRIBUTION_PROCESS_ID=0 CUDA_VISIBLE_DEVICES=0 $sc; wait
  step torch_scaling_1 120 env KERAS_BACKEND=torch $sc
  step torch_scaling_2proc 150 env KERAS_BACKEND=torch torchrun --nproc_per_node 2 ${sc#python3 } ;;
*) echo "unknown phase $phase: train, multi, speed, kernels, match, multi8, recipe, presets, adaptive, adaptive2, position, compiled, profile, chunks, recipes, fullspan, hosts or hosts-scaling"; exit 2 ;;
esac
cp benchmarks/RESULTS.md "$out/RESULTS.md"
# The device tool returns a limited number of files: RESULTS.md and the
# plots as they are, the logs and run folders (curve.json, spans.png) in one
# archive.
rest=$(cd "$out" && ls | grep -v -e '^RESULTS.md$' -e '\.png$')
[ -n "$rest" ] && tar czf "$out/logs.tgz" -C "$out" --remove-files $rest
