"""Compile every Triton kernel of so8t_kernels for an NVIDIA GPU ahead of time, on a machine without one.

    python -m so8t_kernels.aot                       # sm_80 and sm_90, table on stdout
    python -m so8t_kernels.aot --arch 90 --jobs 2 --json rows.json

The launchers (exp_triton, rotate_triton, ...) run on ``meta`` tensors of the shapes in ``SCENARIOS``
with ``JITFunction.run`` replaced by a recorder, so the arguments, constexprs and grids are exactly
what they pass on a GPU. Triton's own binder specializes each launch for the target (16-byte aligned
pointers, 16-divisible ints), then ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
builds it, the wheel's ``ptxas -v`` reports registers and spills and its ``cuobjdump -sass`` the
instruction mix, split into loop bodies (a backward branch closes a loop) and the rest.

Results are cached as JSON under ``SO8T_AOT_CACHE`` (default ``~/.cache/so8t/aot``), keyed by the
kernel's source and dependencies, the specialization, the target and the Triton version: an unchanged
kernel never compiles twice. Triton's own cache (``TRITON_CACHE_DIR``) receives the compiled kernels
too: on a GPU with the same Triton wheel, the JIT finds them there instead of compiling.

Needs torch (CPU is enough) and triton, with ``TRITON_INTERPRET`` unset (the kernels must be
compiled, not interpreted). Exit status: 0 all compiled, 1 a kernel failed, 2 a setup error.
"""

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

ARCHES = (80, 90)
CACHE_ENV = "SO8T_AOT_CACHE"
# Per-SM limits (CUDA occupancy calculator): 64 warps, 32 CTAs, 64 K registers allocated per warp in
# units of 256; shared memory per SM and 1 KB reserved per resident CTA.
SM_LIMITS = {80: dict(warps=64, ctas=32, registers=65536, shared=167936),
             90: dict(warps=64, ctas=32, registers=65536, shared=233472)}
SHARED_RESERVED_PER_CTA = 1024

# SASS opcodes by the unit that issues them.
CATEGORIES = {
    "fp32": ("FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "FCHK"),
    "int": ("IMAD", "IADD3", "IMNMX", "LOP3", "SHF", "LEA", "ISETP", "SEL", "IABS", "PRMT", "MOV", "IMAD.WIDE"),
    "mufu": ("MUFU",),
    "convert": ("F2F", "F2FP", "I2F", "F2I", "FRND"),
    "shuffle": ("SHFL",),
    "shared": ("LDS", "STS", "LDSM", "STSM"),
    "barrier": ("BAR",),
    "global_load": ("LDG",),
    "global_store": ("STG",),
    "async_copy": ("LDGSTS", "LDGDEPBAR", "DEPBAR"),
    "local": ("LDL", "STL"),
    "atomic": ("ATOM", "ATOMG", "RED", "REDG"),
}


# ---------------------------------------------------------------------------------------------
# Scenarios: the shapes each launcher is compiled at
# ---------------------------------------------------------------------------------------------
HIDDEN_SIZES = (8, 24, 136, 3072, 4096)
TOKEN_COUNTS = (1, 7, 4096)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _meta(shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _op_modules():
    """The modules that define Triton kernels, one per op (imported by path: the package's attribute
    of each op's name is the op's function, which shadows its module)."""
    from so8t_kernels._backend import OPS

    return [importlib.import_module(f"so8t_kernels.{name}") for name in OPS]


def scenarios():
    """[(label, thunk)]: each thunk calls one launcher on meta tensors."""
    exp_ops, rotate_ops, stats_ops, lce_ops = _op_modules()

    out = []
    # so8_exp: a gate bank θ [layers, hidden/8, 28]; dL/dR arrives in R's dtype (fp32).
    for dtype_name, dtype in DTYPES.items():
        for hidden in HIDDEN_SIZES:
            shape = (30, hidden // 8, 28)
            out.append((f"exp fwd θ {dtype_name} 30x{hidden // 8}", lambda s=shape, d=dtype: exp_ops.exp_triton(_meta(s, d))))
            out.append((f"exp bwd θ {dtype_name} 30x{hidden // 8}",
                        lambda s=shape, d=dtype: exp_ops.exp_backward_triton(_meta(s[:-1] + (8, 8)), _meta(s, d))))

    # so8_rotate: R and alpha are views into fp32 banks [G, hidden/8, 8, 8] and [G]; gate 1's alpha
    # sits 4 bytes into its bank, unaligned, as in a model with several gates.
    def params(hidden, gate):
        return _meta((3, hidden // 8, 8, 8))[gate], _meta((3,))[gate]

    for dtype_name, dtype in DTYPES.items():
        for hidden in HIDDEN_SIZES:
            for tokens in TOKEN_COUNTS:
                label = f"{dtype_name} {tokens}x{hidden}"
                for gate in (0, 1):
                    x = lambda t=tokens, h=hidden, d=dtype: _meta((t, h), d)
                    for with_stats in (False, True):
                        out.append((f"rotate fwd {label}{' +stats' if with_stats else ''}",
                                    lambda x=x, h=hidden, g=gate, s=with_stats: rotate_ops.rotate_triton(x(), *params(h, g), s)))
                    for need_x, need_params in ((True, True), (True, False), (False, True)):
                        out.append((f"rotate bwd {label} {'dx' if need_x else ''}{'+' if need_x and need_params else ''}{'dR' if need_params else ''}",
                                    lambda x=x, h=hidden, g=gate, nx=need_x, np_=need_params:
                                    rotate_ops.rotate_backward_triton(x(), x(), *params(h, g), nx, np_)))

    # logit_stats: training and serving logits, and one over 2^31 elements.
    for dtype_name, dtype in DTYPES.items():
        for shape in ((2048, 32064), (1, 32064), (7, 100), (4, 8192, 128256)):
            out.append((f"logit_stats {dtype_name} {'x'.join(map(str, shape))}",
                        lambda s=shape, d=dtype: stats_ops.logit_stats_triton(_meta(s, d))))

    # linear_cross_entropy: one chunk of logits per launch (Phi-3: 512 × 32,064; SmolLM2: 256 × 49,152).
    for dtype_name, dtype in DTYPES.items():
        for rows, vocab in ((512, 32064), (256, 49152), (7, 100)):
            for write_grad in (False, True):
                for with_stats in (False, True):
                    out.append((f"linear_cross_entropy rows {dtype_name} {rows}x{vocab}"
                                f"{' +grad' if write_grad else ''}{' +stats' if with_stats else ''}",
                                lambda r=rows, v=vocab, d=dtype, g=write_grad, st=with_stats: lce_ops.rows_triton(
                                    _meta((r, v), d), _meta((r,), torch.int64), _meta((r,), torch.bool), _meta((r,)), g, st)))
    return out


def kernels():
    """Every @triton.jit kernel (name ends in _kernel) of the op modules."""
    from triton.runtime.jit import JITFunction

    return {obj.__name__: obj for module in _op_modules() for obj in vars(module).values()
            if isinstance(obj, JITFunction) and obj.__name__.endswith("_kernel")}


def record_launches(thunk):
    """[(kernel, args, kwargs, grid)] of every launch the thunk makes, none of them run."""
    from triton.runtime.jit import JITFunction

    calls, original = [], JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, kwargs, tuple(grid(kwargs) if callable(grid) else grid)))

    JITFunction.run = record
    try:
        thunk()
    finally:
        JITFunction.run = original
    return calls


def specialize(fn, args, kwargs, arch):
    """(options, signature, constexprs, attrs) that Triton's JIT compiles for this launch on ``arch``."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(kwargs, debug=kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, spec, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, spec, options)


# ---------------------------------------------------------------------------------------------
# Compiling one specialization
# ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    kernel: str
    arch: int
    signature: dict
    constexprs: list
    attrs: list
    options: dict
    key: str


def _tool(name: str, arch: int) -> str:
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path if name == "ptxas" else knobs.nvidia.cuobjdump.path


def parse_sass(text: str) -> dict:
    """Static SASS counts per category: ``outside`` loops, and per loop body (a loop: the code from a
    backward branch's target to the branch), innermost first."""
    program = []
    for match in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-9T]\s+)?([A-Z0-9]+)([.A-Z0-9_]*)([^;]*);", text):
        pc, opcode, modifiers, operands = int(match.group(1), 16), match.group(3), match.group(4), match.group(5)
        target = re.match(r"\s*(0x[0-9a-f]+)", operands) if opcode == "BRA" else None
        program.append((pc, opcode, modifiers, int(target.group(1), 16) if target else None))
    loops = sorted({(target, pc) for pc, opcode, _, target in program if target is not None and target < pc},
                   key=lambda loop: loop[1] - loop[0])

    def category(opcode):
        return next((name for name, opcodes in CATEGORIES.items() if opcode in opcodes), "other")

    def counts(instructions):
        tally = {"total": len(instructions)}
        for _, opcode, modifiers, _ in instructions:
            tally[category(opcode)] = tally.get(category(opcode), 0) + 1
            if opcode in ("LDG", "STG", "LDGSTS"):
                width = re.search(r"\.(128|64|U16|16|U8|8)\b", modifiers)
                key = f"{opcode}.{width.group(1) if width else '32'}"
                tally[key] = tally.get(key, 0) + 1
        return tally

    claimed, bodies = set(), []
    for start, end in loops:
        body = [ins for ins in program if start <= ins[0] <= end and ins[0] not in claimed]
        claimed.update(ins[0] for ins in body)
        bodies.append(dict(start=start, end=end, counts=counts(body)))
    outside = [ins for ins in program if ins[0] not in claimed]
    return dict(outside=counts(outside), loops=bodies)


def occupancy(registers: int, shared: int, num_warps: int, arch: int) -> dict:
    """Resident CTAs per SM and the fraction of the SM's 64 warp slots they fill, with the limiter."""
    limits = SM_LIMITS[arch]
    registers_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    caps = {"warps": limits["warps"] // num_warps, "ctas": limits["ctas"],
            "registers": limits["registers"] // (registers_per_warp * num_warps),
            "shared": limits["shared"] // (shared + SHARED_RESERVED_PER_CTA)}
    ctas = min(caps.values())
    return dict(ctas=ctas, fraction=ctas * num_warps / limits["warps"], limiter=min(caps, key=caps.get))


def compile_job(job: Job) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    from triton.compiler.compiler import ASTSource
    from triton.compiler.compiler import compile as triton_compile

    fn = kernels()[job.kernel]
    source = ASTSource(fn, job.signature, dict(job.constexprs), dict(job.attrs))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # Triton prints the whole PTX when ptxas fails
            compiled = triton_compile(source, target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as error:  # noqa: BLE001 - a failure is a row of the table
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return dict(ok=False, error=f"{type(error).__name__}: {lines[-1] if lines else ''}"[:300])
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "k.ptx").write_text(compiled.asm["ptx"])
        Path(tmp, "k.cubin").write_bytes(compiled.asm["cubin"])
        log = subprocess.run([_tool("ptxas", job.arch), "-v", f"--gpu-name={sm_arch_from_capability(job.arch)}",
                              f"{tmp}/k.ptx", "-o", f"{tmp}/ptxas.o"], capture_output=True, text=True).stderr
        sass = subprocess.run([_tool("cuobjdump", job.arch), "-sass", f"{tmp}/k.cubin"],
                              capture_output=True, text=True).stdout

    def grab(pattern):
        match = re.search(pattern, log)
        return int(match.group(1)) if match else 0

    metadata = compiled.metadata
    registers = grab(r"Used (\d+) registers")
    return dict(ok=True, registers=registers, spill_store=grab(r"(\d+) bytes spill stores"),
                spill_load=grab(r"(\d+) bytes spill loads"), stack=grab(r"(\d+) bytes stack frame"),
                shared=metadata.shared, num_warps=metadata.num_warps, num_stages=metadata.num_stages,
                occupancy=occupancy(registers, metadata.shared, metadata.num_warps, job.arch), sass=parse_sass(sass))


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "so8t" / "aot")


def cached_compile(job: Job) -> dict:
    path = cache_dir() / f"{job.key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = compile_job(job)
    if result["ok"]:  # a failure is retried next time, never cached
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(result))
        temporary.replace(path)
    return result


# ---------------------------------------------------------------------------------------------
# Every kernel at every scenario
# ---------------------------------------------------------------------------------------------
def plan(arches=ARCHES) -> tuple[list[dict], list[str]]:
    """Distinct specializations [{kernel, arch, variant, shapes, grids, job}] and setup problems."""
    import triton

    groups, launched, problems = {}, set(), []
    for label, thunk in scenarios():
        try:
            calls = record_launches(thunk)
        except Exception as error:  # noqa: BLE001
            problems.append(f"{label}: the launcher raised {type(error).__name__}: {error}")
            continue
        for fn, args, kwargs, grid in calls:
            launched.add(fn.__name__)
            for arch in arches:
                options, signature, constexprs, attrs = specialize(fn, args, kwargs, arch)
                described = json.dumps([fn.__name__, arch, signature, sorted(map(str, constexprs.items())),
                                        sorted(map(str, attrs.items())), sorted(map(str, options.__dict__.items()))])
                key = hashlib.sha256(f"{fn.cache_key}\0{triton.__version__}\0{described}".encode()).hexdigest()[:24]
                group = groups.setdefault(key, dict(
                    kernel=fn.__name__, arch=arch, variant=_variant(fn, signature, constexprs, attrs),
                    shapes=[], grids=[], job=Job(fn.__name__, arch, signature, list(constexprs.items()),
                                                 list(attrs.items()), options.__dict__, key)))
                group["shapes"].append(label)
                group["grids"].append(grid)
    problems += [f"{name} is defined but no scenario launches it" for name in sorted(set(kernels()) - launched)]
    return list(groups.values()), problems


def _variant(fn, signature, constexprs, attrs) -> str:
    names = fn.arg_names
    shown = ("WITH_STATS", "NEED_X", "NEED_PARAMS", "WRITE_GRAD", "BLOCK")
    parts = [f"{names[index]}={int(value)}" for (index,), value in sorted(constexprs.items()) if names[index] in shown]
    parts += [f"{names[index]}=1" for (index,) in sorted(constexprs) if not fn.params[index].is_constexpr]
    pointers = [name for name in names if signature.get(name, "").startswith("*")]
    parts.append(" ".join(sorted({signature[name][1:] for name in pointers if name.startswith(("x_", "theta", "logits_"))})))
    unspecialized = {names[i] if isinstance(i, int) else i for i in getattr(fn, "do_not_specialize", ())}
    unaligned = [name for name in pointers if not attrs.get((names.index(name),)) and name not in unspecialized]
    if unaligned:
        parts.append("unaligned:" + ",".join(unaligned))
    divisible = [name for name in names if signature.get(name, "*").startswith("i") and attrs.get((names.index(name),))]
    if divisible:
        parts.append("%16:" + ",".join(divisible))
    wide = [name for name in names if signature.get(name) == "i64"]
    if wide:
        parts.append("i64:" + ",".join(wide))
    return " ".join(part for part in parts if part)


def compile_all(arches=ARCHES, jobs: int = 1, progress=None) -> tuple[list[dict], list[str]]:
    """Compiles (or reads from the cache) every specialization; returns records and setup problems."""
    groups, problems = plan(arches)
    work = [group["job"] for group in groups]
    with ProcessPoolExecutor(jobs) if jobs > 1 else contextlib.nullcontext() as pool:
        results = (pool.map if pool else map)(cached_compile, work)
        records = []
        for index, (group, result) in enumerate(zip(groups, results)):
            records.append(dict({k: v for k, v in group.items() if k != "job"}, key=group["job"].key, **result))
            if progress:
                progress(index + 1, len(groups), group)
    return records, problems


def table(records: list[dict]) -> str:
    header = ("arch", "kernel", "variant", "regs", "spill st/ld B", "smem B", "warps", "stages", "CTA/SM (occ, limit)",
              "SHFL", "LDS/STS", "BAR", "LDG/STG", "shapes")
    rows = []
    for r in records:
        if not r["ok"]:
            rows.append((f"sm_{r['arch']}", r["kernel"], r["variant"], "FAIL: " + r["error"], *[""] * 9, len(r["shapes"])))
            continue
        total = _sum_counts(r["sass"])
        occ = r["occupancy"]
        rows.append((f"sm_{r['arch']}", r["kernel"], r["variant"], r["registers"], f"{r['spill_store']}/{r['spill_load']}",
                     r["shared"], r["num_warps"], r["num_stages"], f"{occ['ctas']} ({occ['fraction']:.0%}, {occ['limiter']})",
                     total.get("shuffle", 0), total.get("shared", 0), total.get("barrier", 0),
                     f"{total.get('global_load', 0)}/{total.get('global_store', 0)}", len(r["shapes"])))
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _sum_counts(sass: dict) -> dict:
    """Static counts over the whole kernel (a loop body counted once)."""
    total = dict(sass["outside"])
    for loop in sass["loops"]:
        for name, count in loop["counts"].items():
            total[name] = total.get(name, 0) + count
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=",".join(map(str, ARCHES)), help="compute capabilities, e.g. 90 or 80,90")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--json", type=Path, help="also write the records as JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    try:
        arches = tuple(int(a) for a in re.sub(r"sm_?", "", args.arch).split(","))
    except ValueError:
        parser.error(f"--arch {args.arch!r}: expected compute capabilities such as 90 or 80,90")
    if unknown := set(arches) - set(SM_LIMITS):
        parser.error(f"--arch: no SM limits for {sorted(unknown)}; known: {sorted(SM_LIMITS)}")
    try:
        import triton
    except ImportError as error:
        print(f"so8t_kernels.aot: triton is not importable ({error})", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1" or not kernels():
        print("so8t_kernels.aot: TRITON_INTERPRET=1 makes the kernels interpreted; unset it", file=sys.stderr)
        return 2

    def progress(done, total, group):
        if not args.quiet:
            print(f"  [{done}/{total}] {group['kernel']} sm_{group['arch']} {group['variant']}", file=sys.stderr, flush=True)

    records, problems = compile_all(arches, args.jobs, progress)
    print(table(records))
    failed = [r for r in records if not r["ok"]]
    print(f"\n{len(records) - len(failed)} specializations compiled, {len(failed)} failed with triton "
          f"{triton.__version__}; cache {cache_dir()}")
    for problem in problems:
        print(f"problem: {problem}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 2 if problems else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
