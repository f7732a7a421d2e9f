#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call (device time is scarce): install the carried
# wheels and qpass, run the kernel tests on CUDA, compile report, then the benchmark. Results land in
# $OUT (the device tool brings that folder back). See benchmarks/README.md for the wheels to carry.
set -uo pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-cache-dir --target /tmp/qpass . || exit 1
export PYTHONPATH=/tmp/qpass${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_ops.py tests/test_compile.py 2>&1 | tee "$OUT/tests.log"
python3 benchmarks/quantized_linears.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
