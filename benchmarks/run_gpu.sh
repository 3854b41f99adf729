#!/usr/bin/env bash
# One device call: kernel checks, then training throughput per backend.
# Usage (on the GPU machine, Keras carried as wheels in .whl/, see GPU.md):
#   bash benchmarks/run_gpu.sh [OUTDIR]
set -u
out=${1:-${OUT:-/tmp/out}}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target .site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/.site:$PWD TF_CPP_MIN_LOG_LEVEL=3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "== $name rc=$?"; grep '^{' "$out/$name.txt" | tail -4 | cut -c1-700
  grep -m3 -E 'Error|error:' "$out/$name.txt" | cut -c1-300
}
tp="python3 benchmarks/throughput.py --preset enwik8_small --steps ${STEPS:-5} --warmup-steps 2 --record"
for job in ${JOBS:-kcheck torch_fixed torch_adaptive jax_portable}; do
  case $job in
    kcheck) step kcheck 200 env KERAS_BACKEND=torch python3 benchmarks/triton_kernel_check.py --warmup 5 --rep 20 --no-sweep ;;
    torch_fixed) step torch_fixed 150 env KERAS_BACKEND=torch $tp --span fixed:2048 --implementation fused ;;
    torch_fixed1k) step torch_fixed1k 150 env KERAS_BACKEND=torch $tp --span fixed:1024 --implementation fused ;;
    torch_adaptive) step torch_adaptive 150 env KERAS_BACKEND=torch $tp --span adaptive:1024 --implementation fused ;;
    jax_portable) step jax_portable 150 env KERAS_BACKEND=jax $tp --span fixed:2048 --implementation portable ;;
    jax_fused) step jax_fused 150 env KERAS_BACKEND=jax $tp --span fixed:2048 --implementation fused ;;
  esac
done
cp benchmarks/RESULTS.md "$out/RESULTS.md"
