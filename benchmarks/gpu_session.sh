#!/usr/bin/env bash
# What a lent GPU machine is for, in calls that each fit its 10-minute limit (device time is scarce):
#
#   bash benchmarks/gpu_session.sh tests [pytest arguments]   # CUDA kernel, op and compile tests
#   bash benchmarks/gpu_session.sh report                     # static SASS counts of every config
#   bash benchmarks/gpu_session.sh sweep --shape 28672x8192 --ms 1,16,128 --tag big   # configs x splits
#   bash benchmarks/gpu_session.sh sweep --format int8 --ms 16,128,2048 --tag big       # int8 GEMM configs
#   bash benchmarks/gpu_session.sh bench --part layers --shapes 4096x4096,11008x4096 --tag a
#   bash benchmarks/gpu_session.sh bench --part layers --shapes 4096x11008,28672x8192 --tag b
#   bash benchmarks/gpu_session.sh bench --part e2e --e2e-variants bf16,"qpass nf4" --tag c
#   bash benchmarks/gpu_session.sh host --ms 1,16                 # eager host time per layer call
#   bash benchmarks/gpu_session.sh dequant                        # whole-weight decoding vs the peers
#   bash benchmarks/gpu_session.sh first                          # all a 15-minute device budget allows
#
# Each call installs the carried wheels and qpass (the machine starts bare), then writes its logs and
# results to $OUT, which the device tool brings back. See benchmarks/README.md for the wheels to carry.
set -uo pipefail
step=${1:?usage: gpu_session.sh tests|report|sweep|bench|host|dequant|first [arguments]}
shift
OUT=${OUT:-results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-cache-dir --target /tmp/qpass . || exit 1
export PYTHONPATH=/tmp/qpass${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
case "$step" in
  tests)
    # -P: the checkout's qpass/ (no kernels/ inside; pyproject maps them) must not shadow the installed one
    python3 -P -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_ops.py tests/test_compile.py "$@" 2>&1 | tee "$OUT/tests.log" ;;
  report)
    python3 benchmarks/compile_report.py --json "$OUT/compile_report.json" 2>&1 | tee "$OUT/compile_report.log" ;;
  sweep)
    python3 benchmarks/sweep_configs.py --out "$OUT" "$@" 2>&1 | tee "$OUT/sweep.log" ;;
  bench)
    python3 benchmarks/quantized_linears.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" ;;
  host)
    python3 benchmarks/host_overhead.py --device cuda --out "$OUT" "$@" 2>&1 | tee "$OUT/host.log" ;;
  dequant)
    python3 benchmarks/dequantize.py --out "$OUT" "$@" 2>&1 | tee "$OUT/dequantize.log" ;;
  first)
    # One call of at most 10 minutes, for a session whose device time (15 minutes, the machine's start
    # included) allows no more: the kernels on CUDA first (none has run on a GPU since 63fd4f4), then the
    # issue's targets at 28672 x 8192, each output checked against the reference op in the same table.
    # Each part has its own time limit and writes as it goes, so a part cut short keeps what it measured.
    timeout 170 python3 -P -m pytest -q -p no:cacheprovider --maxfail=10 tests/test_triton_kernels.py "$@" 2>&1 | tee "$OUT/tests.log"
    timeout 330 python3 benchmarks/quantized_linears.py --out "$OUT" --part layers --shapes 28672x8192 \
      --ms 1,16,128,2048 --tag first 2>&1 | tee "$OUT/bench.log" ;;
  *) echo "unknown step $step: tests, report, sweep, bench, host, dequant or first" >&2; exit 2 ;;
esac
