#!/usr/bin/env bash
# GPU check (op tests on CUDA, then every benchmark suite) for a machine with no network, in a copy of the repository:
#   OUT=/some/dir bash benchmarks/device_check.sh
# Installs nothing. Uses the machine's python (override with PYTHON=...), which must already have
# torch with CUDA and triton. Runs the op tests on CUDA tensors with compiled Triton, then
# benchmarks/run.py --device cuda --suites all; everything lands under $OUT. Finishes in under 8 minutes:
# 2.5 for the tests, 4.5 for the benchmark (it rewrites its files after each benchmark, so a timeout
# keeps the kernel rows, which run first), the rest for start-up and at most 75 s for the FSDP check.
# Exit status: 0 when tests and benchmark both pass, 1 when either fails or times out, 2 when the
# machine lacks what the check needs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out/device}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
# so8t_kernels from this copy, uninstalled; Triton compiled, never interpreted.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

echo "== environment" | tee "$OUT/environment.txt"
if ! "$PYTHON" - <<'EOF' 2>&1 | tee -a "$OUT/environment.txt"; then
import sys
try:
    import torch, triton
except ImportError as error:
    sys.exit(f"MISSING: {error}. This check installs nothing; it needs a python with torch (CUDA) and triton.")
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
if not torch.cuda.is_available():
    sys.exit("MISSING: torch sees no CUDA device.")
print(f"device: {torch.cuda.get_device_name(0)}")
EOF
    echo "device check: the machine lacks what it needs (see above); nothing was run." | tee -a "$OUT/environment.txt"
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >>"$OUT/environment.txt" 2>&1
"$PYTHON" -m so8t_kernels.info >>"$OUT/environment.txt" 2>&1

status=0
echo "== op tests on CUDA (SO8T_TEST_DEVICE=cuda)"
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    SO8T_TEST_DEVICE=cuda timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_ops_*.py \
        2>&1 | tee "$OUT/pytest.txt" | tail -n 40
    test_status=${PIPESTATUS[0]}
    [ "$test_status" -eq 124 ] && printf '\nop tests: timed out after 150 s\n' | tee -a "$OUT/pytest.txt"
    [ "$test_status" -ne 0 ] && status=1
else
    echo "op tests: MISSING pytest on this machine; tests not run" | tee "$OUT/pytest.txt"
    status=1
fi

# FSDP (cannot run on CPU: accelerate shards only on GPUs): QLoRA + gates, one process per GPU.
echo "== FSDP: accelerate launch --use_fsdp, QLoRA + gates (tests/test_train_fsdp.py)"
if "$PYTHON" -c "import accelerate, peft, transformers, bitsandbytes" 2>/dev/null; then
    SO8T_TEST_DEVICE=cuda timeout 75 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_train_fsdp.py \
        2>&1 | tee "$OUT/fsdp.txt" | tail -n 30
    [ "${PIPESTATUS[0]}" -ne 0 ] && status=1
else
    echo "FSDP: MISSING accelerate/peft/transformers/bitsandbytes on this machine; not run" | tee "$OUT/fsdp.txt"
fi

echo "== benchmark"
timeout 270 "$PYTHON" benchmarks/run.py --device cuda --suites all --out "$OUT" 2>&1 | tee "$OUT/benchmark.txt"
bench_status=${PIPESTATUS[0]}
[ "$bench_status" -eq 124 ] && printf '\nbenchmark: timed out after 270 s (files in $OUT hold the suites that finished)\n' | tee -a "$OUT/benchmark.txt"
[ "$bench_status" -ne 0 ] && status=1

echo "== device check done: tests $([ "${test_status:-1}" -eq 0 ] && echo passed || echo FAILED)," \
     "benchmark $([ "$bench_status" -eq 0 ] && echo ok || echo FAILED); files in $OUT" | tee "$OUT/summary.txt"
exit "$status"
