"""``python benchmarks/roofline.py``: a static roofline estimate of the Triton kernels on H100, H200
and A100 — predicted from the compiled SASS, never measured.

The kernels are compiled for sm_90/sm_80 on any machine (``python -m so8t_kernels.aot``, cached). For
each kernel at the benchmark's shapes (rotate 4096×3072, exp 30×384 blocks, logit stats 2048×32064,
linear_cross_entropy's row pass over a 512 × 32,064 bf16 chunk with its gradient):

- dynamic warp instructions = (outside-loop counts + loop-body counts × trips) per warp, × the warps an
  SM runs (the busiest SM: ⌈programs / SMs⌉ programs);
- time of each unit at its published per-SM rate (``RATES``), and of the 4 schedulers together;
- DRAM time = the bytes the kernel must move ÷ the copy bandwidth (``GPUS``);
- latency bound = the bytes in flight per SM (resident warps × the loop's loads, × stages when the loop
  is pipelined with async copies) ÷ the DRAM latency.

The prediction is the largest of these; "bound" names it; "% copy" is the ideal bytes (the benchmark's
count) over the predicted time, against the copy bandwidth. It ignores caches, tails and clocks under
load: a floor on time, a ceiling on bandwidth.
"""

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Gpu:
    name: str
    arch: int
    sms: int
    clock_ghz: float  # boost clock
    copy_tb_s: float  # achievable copy bandwidth: ~90 % of the HBM peak, as x.clone() reaches
    latency_ns: float  # loaded DRAM latency


# HBM peaks from NVIDIA's data sheets (H100 SXM5 3.35 TB/s, H200 SXM 4.8 TB/s, A100 SXM 80 GB
# 2.04 TB/s); SM counts and boost clocks from the architecture whitepapers; latency an assumption.
GPUS = (
    Gpu("H100 SXM", 90, 132, 1.98, 3.35 * 0.9, 700),
    Gpu("H200 SXM", 90, 132, 1.98, 4.8 * 0.9, 700),
    Gpu("A100 SXM 80GB", 80, 108, 1.41, 2.04 * 0.9, 700),
)
# Warp instructions per clock per SM (CUDA C++ Programming Guide, arithmetic instruction throughput,
# compute capability 8.0 / 9.0): fp32 FMA 64 / 128 lanes; integer, compare, min/max 64 lanes;
# shuffles 32 lanes; MUFU and conversions 16 lanes; shared memory 32 banks × 4 B; global accesses in
# 128-byte L1 wavefronts (a 128-bit warp access is 4); one instruction issued per scheduler, 4 per SM.
RATES = {
    80: dict(fp32=2, int=2, shuffle=1, mufu=0.5, convert=0.5, shared=1, lsu=1, dispatch=4),
    90: dict(fp32=4, int=2, shuffle=1, mufu=0.5, convert=0.5, shared=1, lsu=1, dispatch=4),
}
WIDTH_WAVEFRONTS = {"128": 4, "64": 2, "32": 1, "16": 1, "U16": 1, "8": 1, "U8": 1}


@dataclass(frozen=True)
class Case:
    """One kernel launch of the benchmark: the aot record's shape label, bytes, and loop trips."""
    kernel: str
    label: str  # the so8t_kernels.aot scenario label holding the launch
    what: str
    ideal_bytes: int  # what the benchmark counts for GB/s (0: compute-bound, no % copy)
    dram_bytes: int  # what this kernel moves, extras included
    trips: tuple  # per loop, in code order (innermost loops of Triton's kernels are not nested here)


def cases() -> list[Case]:
    # The package exports each op's function under its module's name: the modules by their paths.
    rotate = importlib.import_module("so8t_kernels.so8_rotate")
    linear_cross_entropy = importlib.import_module("so8t_kernels.linear_cross_entropy")
    from so8t_kernels.so8_exp import TAYLOR_DEGREE

    tokens, hidden, layers = 4096, 3072, 30
    blocks = hidden // 8
    out = []
    for dtype, size in (("fp32", 4), ("bf16", 2)):
        n = tokens * hidden * size
        label = f"{dtype} {tokens}x{hidden}"
        forward_grid = rotate._grid(tokens, blocks, rotate.FORWARD_TOKENS_PER_TILE)
        forward_trips = math.ceil(tokens / rotate.FORWARD_TOKENS_PER_TILE / forward_grid[1])
        out.append(Case("_rotate_forward_kernel", f"rotate fwd {label}", f"rotate fwd {dtype}", 2 * n, 2 * n,
                        (forward_trips,)))
        backward_grid = rotate._grid(tokens, blocks, rotate.BACKWARD_TOKENS_PER_TILE)
        backward_trips = math.ceil(tokens / rotate.BACKWARD_TOKENS_PER_TILE / backward_grid[1])
        partials = backward_grid[1] * hidden * 8 * 4
        out.append(Case("_rotate_backward_kernel", f"rotate bwd {label} dx+dR", f"rotate bwd dx+dR {dtype}",
                        3 * n, 3 * n + partials, (backward_trips,)))
    matrices = layers * blocks
    # ‖A‖_F ≈ 2.2 in the benchmark (θ ~ 0.3·N(0, 1)): one squaring.
    squarings = 1
    degree = TAYLOR_DEGREE[__import__("torch").float32]
    out.append(Case("_exp_forward_kernel", "exp fwd θ fp32 30x384", "exp fwd 30×384", 0,
                    matrices * (28 + 64 + 1) * 4, (degree, squarings)))
    out.append(Case("_exp_backward_kernel", "exp bwd θ fp32 30x384", "exp bwd 30×384", 0,
                    matrices * (28 + 64 + 28) * 4, (degree, squarings)))
    logits = 2048 * 32064 * 4
    out.append(Case("_logit_stats_partial_kernel", "logit_stats fp32 2048x32064", "logit stats fp32", logits,
                    logits, ()))
    # linear_cross_entropy's row pass over one chunk of bf16 logits (Phi-3.5: 512 tokens × 32,064):
    # a read for the reductions, a second read for the gradient, written in place. Ideal: one read and
    # one write; the second read is counted at DRAM (an L2 hit would make it cheaper).
    rows, vocab = 512, 32064
    chunk = rows * vocab * 2
    tiles = math.ceil(vocab / linear_cross_entropy.BLOCK_V)
    for suffix, what in (("", ""), (" +stats", " + stats")):
        out.append(Case("_rows_kernel", f"linear_cross_entropy rows bf16 {rows}x{vocab} +grad{suffix}",
                        f"CE rows bf16 512×32064{what}", 2 * chunk, 3 * chunk, (tiles, tiles)))
    return out


def load_records(path: Path | None) -> list[dict]:
    """aot records from ``path``, or compiled now (cached) in a subprocess with Triton compiling."""
    if path is not None:
        return json.loads(path.read_text())
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"so8t-roofline-{os.getpid()}.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    subprocess.run([sys.executable, "-m", "so8t_kernels.aot", "--quiet", "--jobs", str(min(4, os.cpu_count() or 1)),
                    "--json", str(out)], cwd=REPO_ROOT, env=env, check=False, stdout=subprocess.DEVNULL)
    try:
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def _dynamic_counts(record: dict, trips: tuple) -> dict:
    """Per-warp dynamic counts: outside once, each loop body × its trips (loops in code order)."""
    loops = sorted(record["sass"]["loops"], key=lambda loop: loop["start"])
    if len(loops) > len(trips):  # a loop the compiler kept that the case does not name: count it once
        trips = (*trips, *[1] * (len(loops) - len(trips)))
    elif len(loops) < len(trips):  # loops the compiler unrolled: the innermost-named trips stay
        trips = trips[len(trips) - len(loops):]
    total = dict(record["sass"]["outside"])
    for loop, count in zip(loops, trips):
        for name, value in loop["counts"].items():
            total[name] = total.get(name, 0) + value * count
    return total


def _in_flight_bytes_per_warp(record: dict) -> float:
    """Global load bytes one warp has in flight in the loop: a tile's loads, × stages if pipelined."""
    loops = record["sass"]["loops"]
    if not loops:
        counts = record["sass"]["outside"]
    else:
        counts = max(loops, key=lambda loop: loop["end"] - loop["start"])["counts"]
    loads = sum(value * 32 * (int(width) if width.isdigit() else 16) // 8
                for key, value in counts.items() if key.startswith(("LDG.", "LDGSTS."))
                for width in [key.split(".", 1)[1]])
    pipelined = any(key.startswith("LDGSTS.") for key in counts)
    return loads * (record["num_stages"] if pipelined else 1)


def predict(case: Case, record: dict, gpu: Gpu, grid: tuple) -> dict:
    rates = RATES[gpu.arch]
    programs = math.prod(grid)
    per_sm_programs = math.ceil(programs / gpu.sms)
    warps = per_sm_programs * record["num_warps"]
    counts = _dynamic_counts(record, case.trips)
    lsu = sum(value * WIDTH_WAVEFRONTS.get(key.split(".", 1)[1], 1) for key, value in counts.items()
              if key.startswith(("LDG.", "STG.", "LDGSTS.")))
    cycles = {
        "fp32": counts.get("fp32", 0) / rates["fp32"],
        "int": counts.get("int", 0) / rates["int"],
        "shuffle": counts.get("shuffle", 0) / rates["shuffle"],
        "mufu": counts.get("mufu", 0) / rates["mufu"],
        "convert": counts.get("convert", 0) / rates["convert"],
        "shared": counts.get("shared", 0) / rates["shared"],
        "lsu": lsu / rates["lsu"],
        "dispatch": counts["total"] / rates["dispatch"],
    }
    times = {unit: warps * value / (gpu.clock_ghz * 1e3) for unit, value in cycles.items()}  # µs
    times["dram"] = case.dram_bytes / (gpu.copy_tb_s * 1e6)
    resident = min(record["occupancy"]["ctas"], per_sm_programs) * record["num_warps"]
    in_flight = resident * _in_flight_bytes_per_warp(record) * gpu.sms
    times["latency"] = case.dram_bytes / (in_flight / gpu.latency_ns) * 1e-3 if in_flight else 0.0  # ns → µs
    bound = max(times, key=times.get)
    predicted = times[bound]
    copy_fraction = case.ideal_bytes / (predicted * 1e-6) / (gpu.copy_tb_s * 1e12) if case.ideal_bytes else None
    return dict(gpu=gpu.name, kernel=case.kernel, what=case.what, programs=programs, us=predicted, bound=bound,
                copy_fraction=copy_fraction, times=times)


def estimate(records: list[dict]) -> list[dict]:
    rows = []
    for case in cases():
        for gpu in GPUS:
            record = next((r for r in records if r["ok"] and r["kernel"] == case.kernel and r["arch"] == gpu.arch
                           and case.label in r["shapes"]), None)
            if record is None:
                rows.append(dict(gpu=gpu.name, kernel=case.kernel, what=case.what, error="not compiled"))
                continue
            grid = record["grids"][record["shapes"].index(case.label)]
            rows.append(predict(case, record, gpu, grid))
    return rows


def combined(rows: list[dict], first: str, second: str, ideal_bytes: int, extra_bytes: int, gpu: Gpu) -> float | None:
    """% copy of two kernels run back to back, plus a pass over ``extra_bytes`` at copy bandwidth."""
    pair = [r for r in rows if r["gpu"] == gpu.name and r["what"] in (first, second) and "us" in r]
    if len(pair) != 2:
        return None
    seconds = sum(r["us"] for r in pair) * 1e-6 + extra_bytes / (gpu.copy_tb_s * 1e12)
    return ideal_bytes / seconds / (gpu.copy_tb_s * 1e12)


def text(rows: list[dict]) -> str:
    header = ("GPU", "kernel at benchmark shape", "programs", "predicted µs", "bound", "% copy", "next bound")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append((r["gpu"], r["what"], "", r["error"], "", "", ""))
            continue
        others = sorted(((t, unit) for unit, t in r["times"].items() if unit != r["bound"]), reverse=True)
        lines.append((r["gpu"], r["what"], str(r["programs"]), f"{r['us']:.1f}", r["bound"],
                      "" if r["copy_fraction"] is None else f"{r['copy_fraction']:.0%}",
                      f"{others[0][1]} {others[0][0]:.1f} µs"))
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    body = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)]
    n32 = 4096 * 3072 * 4
    backward = next(case for case in cases() if case.what == "rotate bwd dx+dR fp32")
    partials = backward.dram_bytes - backward.ideal_bytes  # written by the kernel, read by torch's sum
    for gpu in GPUS:
        fwd_bwd = combined(rows, "rotate fwd fp32", "rotate bwd dx+dR fp32", 5 * n32, partials, gpu)
        exp = [r["us"] for r in rows if r["gpu"] == gpu.name and r["what"].startswith("exp") and "us" in r]
        body.append(f"{gpu.name}: rotate fwd+bwd fp32 {fwd_bwd:.0%} of copy (with the sum of dR's partials); "
                    f"exp fwd+bwd {sum(exp):.1f} µs (kernels only, no launch or autograd overhead)"
                    if fwd_bwd is not None else f"{gpu.name}: incomplete")
    return "\n".join(body)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=Path, help="so8t_kernels.aot --json output (default: compile now, cached)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    records = load_records(args.records)
    if not records:
        print("roofline: no compiled kernels (is triton installed?)", file=sys.stderr)
        return 2
    print("PREDICTED (static roofline from SASS; no GPU measured). Rates, clocks and bandwidths: "
          "benchmarks/roofline.py GPUS and RATES.")
    print(text(estimate(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
