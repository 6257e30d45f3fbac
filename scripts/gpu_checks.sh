#!/usr/bin/env bash
# The GPU rows of docs/BENCHMARKS.md in one short command, for a machine with an NVIDIA GPU that
# has JAX with CUDA but cannot reach a package index (wheels for what it lacks travel in .whl/):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       ml-collections==1.1.0 tensorboardX==2.6.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#   bash scripts/gpu_checks.sh            # results in $OUT (or ./gpu_results)
#
# `bench.py gpu` gives the MFU of configs/llama_1b_32k.py at 32K in bf16, for the XLA and the
# fused Pallas attention kernel. `bench.py hlo` reads whether the ring's collective-permutes
# compile to async start/done pairs with compute between; with one GPU it compiles for eight
# H100s instead (`--target h100`, no GPU needed for that).
set -uo pipefail
out=${OUT:-gpu_results}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/ringformer-site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/ringformer-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.csv"
n_gpus=$(python3 -c "import jax; print(jax.device_count())") || exit 2
timeout 480 python3 scripts/bench.py gpu --json 2>&1 | tee "$out/gpu.log"
if [ "$n_gpus" -ge 2 ]; then
    timeout 240 python3 scripts/bench.py hlo --sp "$n_gpus" --json 2>&1 | tee "$out/hlo.log"
else
    timeout 240 python3 scripts/bench.py hlo --target h100 --seq 32768 --json 2>&1 | tee "$out/hlo.log"
fi
