#!/usr/bin/env bash
# The prepared accelerator run of issue 16: autoencoder and transformer step cost and time to
# target for Adam, Muon and kfax (and PSGD-Kron / kfac-jax where installed), in under 8 minutes
# on one H200, written as one JSON record naming the device and the JAX version.
#
#   benchmarks/gpu.sh                  # full run (GPU machine); record in benchmarks/results/
#   benchmarks/gpu.sh --quick          # tiny CPU check of the same path (or KFAX_GPU_QUICK=1)
#   benchmarks/gpu.sh --only autoencoder_race,transformer_race
#
# kfax runs from this checkout (PYTHONPATH=.); nothing is installed. Python: $PYTHON, else
# .venv/bin/python if it exists, else python3. MNIST: $KFAX_MNIST_DIR, else
# benchmarks/data/mnist (make bench-gpu-data copies it there, for machines without ../shared),
# else ../shared/data/mnist; without MNIST the autoencoder falls back to scikit-learn's digits.
# When $OUT is set (the device machine's output folder), the record is copied there too.
# --quick writes to a temporary folder unless --out is given.
set -euo pipefail
cd "$(dirname "$0")/.."

quick="${KFAX_GPU_QUICK:-0}"
for arg in "$@"; do
  if [ "$arg" = "--quick" ]; then quick=1; fi
done
args=("$@")
if [ "$quick" = 1 ] && [[ " $* " != *" --quick "* ]]; then args+=("--quick"); fi

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TQDM_DISABLE="${TQDM_DISABLE:-1}"  # progress bars would flood a captured log
if [ -z "${KFAX_MNIST_DIR:-}" ] && [ -f benchmarks/data/mnist/t10k-images-idx3-ubyte.gz ]; then
  export KFAX_MNIST_DIR="$PWD/benchmarks/data/mnist"
fi
if [ "$quick" = 1 ]; then
  # A plumbing check: compile fast (benchmarks.run.QUICK_XLA_FLAGS, repeated here).
  export XLA_FLAGS="${XLA_FLAGS:-${KFAX_QUICK_XLA_FLAGS:---xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false}}"
  limit="${KFAX_GPU_TIMEOUT:-300}"
else
  limit="${KFAX_GPU_TIMEOUT:-470}"  # hard stop under 8 minutes; parts stop at 420 s
fi

echo "gpu.sh: $("$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())')"
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then args+=("--also-to" "$OUT"); fi
exec timeout "$limit" "$PYTHON" -m benchmarks.gpu "${args[@]}"
