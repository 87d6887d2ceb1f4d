"""Load on ``so8t serve`` over loopback: throughput and latency at a fixed concurrency, measured in one run
for several server configurations:

- ``--compare batching`` (default): dynamic batching (the default ``--max-batch 16``) against the same
  server handling requests one at a time (``--max-batch 1``), both with ``--threads`` (default: the
  server's own choice);
- ``--compare threads``: ``--threads 1``, ``--threads 2`` and the server's default, batched;
- ``--compare engines``: ``--engine hf`` against ``--engine vllm`` (run by ``--vllm-python``, default
  ``.venv-vllm/bin/python``), the same model (``--model`` an export folder, which both load, or
  ``--adapter RUN``), the same ``--threads``, each batching up to the concurrency (``--max-batch``).
  ``--engine`` picks the engine of the other comparisons.

Each configuration is a real ``so8t serve`` subprocess on 127.0.0.1 (a free port, its own temporary
audit database; OMP_NUM_THREADS is removed from its environment, so only ``--threads`` or the server's
default decides its threads). A round sends ``--requests`` /think requests (greedy, ``--max-new-tokens``
each, distinct prompts) with at most ``--concurrency`` in flight; rounds alternate between the servers so a
shared machine's changing load hits them alike. Bounded: at most ``--rounds`` rounds each and
``--max-seconds`` in all.

    python benchmarks/serve_load.py --model demo                # the random demo model, concurrency 16
    python benchmarks/serve_load.py                             # the default model (SmolLM2): read tokens/s
    python benchmarks/serve_load.py --compare threads           # 1 vs 2 vs the default threads
    python benchmarks/serve_load.py --model EXPORT --compare engines --threads 1 --concurrency 16 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 600  # a vLLM engine: 25 s idle, minutes on a loaded 2-core machine


@contextlib.contextmanager
def serve(name: str, python: str, options: list[str], model: str | None, audit_dir: Path):
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    index = len(list(audit_dir.glob("*.db")))
    command = [python, "-m", "so8t", "serve", "--port", "0", "--log-level", "warning", "--max-queue", "1024",
               "--audit-db", str(audit_dir / f"audit-{index}.db"), *options]
    if model is not None:
        command += ["--model", model]
    log = audit_dir / f"server-{index}.log"  # a file, not a pipe: vLLM logs on, and nobody would read a pipe
    with open(log, "w") as output:
        # Its own session: vLLM's engine processes go with the server's group when it is stopped.
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True, env=env,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        match = None
        while match is None:
            match = re.search(r"on (http://127\.0\.0\.1:\d+) .*torch threads: (\d+)", log.read_text())
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"so8t serve ({name}) did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        url = match.group(1)
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        yield url, int(match.group(2))
    finally:
        process.terminate()
        try:
            process.wait(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


async def one_round(url: str, requests: int, concurrency: int, max_new_tokens: int, offset: int) -> dict:
    limit = asyncio.Semaphore(concurrency)
    latencies, tokens = [], 0

    async def one(http: httpx.AsyncClient, index: int) -> None:
        nonlocal tokens
        async with limit:
            started = time.perf_counter()
            response = await http.post("/think", json={"prompt": f"What is {index} + {index * 7 % 13}?",
                                                       "max_new_tokens": max_new_tokens, "temperature": 0})
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
            tokens += response.json()["monitor"]["generated_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(one(http, offset + index) for index in range(requests)))
        elapsed = time.perf_counter() - started
    return {"elapsed": elapsed, "latencies": latencies, "tokens": tokens, "requests": requests}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(rounds: list[dict]) -> dict:
    throughputs = [r["requests"] / r["elapsed"] for r in rounds]
    latencies = [latency for r in rounds for latency in r["latencies"]]
    return {"req_s": statistics.median(throughputs), "tok_s": statistics.median(r["tokens"] / r["elapsed"] for r in rounds),
            "p50_ms": 1000 * percentile(latencies, 0.50), "p99_ms": 1000 * percentile(latencies, 0.99),
            "requests": len(latencies)}


def configurations(args) -> list[tuple[str, str, list[str]]]:
    """(name, python, so8t serve options) of each server; the first is what the ratios are against."""
    common = ["--threads", str(args.threads)] if args.threads is not None else []
    common += ["--adapter", args.adapter] if args.adapter is not None else []
    if args.compare == "engines":
        batch = ["--max-batch", str(max(args.concurrency)), *common]
        return [("--engine hf", sys.executable, batch),
                ("--engine vllm", args.vllm_python, ["--engine", "vllm", *batch])]
    python = args.vllm_python if args.engine == "vllm" else sys.executable
    engine = ["--engine", args.engine]
    if args.compare == "threads":
        return [(f"--threads {n}", python, [*engine, "--threads", str(n)]) for n in (1, 2)] + [("default threads", python, engine)]
    return [("--max-batch 16 (default)", python, [*engine, "--max-batch", "16", *common]),
            ("--max-batch 1 (one at a time)", python, [*engine, "--max-batch", "1", *common])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="as so8t serve --model (default: so8t serve's, SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", help="as so8t serve --adapter")
    parser.add_argument("--compare", choices=("batching", "threads", "engines"), default="batching",
                        help="which servers to compare (default: %(default)s)")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                        help="so8t serve --engine of --compare batching and threads (default: %(default)s)")
    parser.add_argument("--vllm-python", default=str(Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"),
                        help="the python with vLLM and so8t (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16],
                        help="requests in flight; several: each in turn within a round (default: 16)")
    parser.add_argument("--requests", type=int, default=64, help="per round (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="per configuration (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="so8t serve --threads with --compare batching or engines "
                                                    "(default: the server's own choice)")
    parser.add_argument("--max-seconds", type=float, default=600, help="stop starting rounds after this")
    args = parser.parse_args()

    import torch

    # A SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the servers started below are stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    configs = configurations(args)
    results = {(name, concurrency): [] for name, _, _ in configs for concurrency in args.concurrency}
    with tempfile.TemporaryDirectory() as audit_dir, contextlib.ExitStack() as servers:
        urls = {name: servers.enter_context(serve(name, python, options, args.model, Path(audit_dir)))
                for name, python, options in configs}
        for url, _ in urls.values():  # warm-up: first-call allocations, tokenizer caches
            asyncio.run(one_round(url, max(args.concurrency), max(args.concurrency), 4, 10_000))
        for index in range(args.rounds):
            if time.monotonic() - started > args.max_seconds:
                break
            for concurrency in args.concurrency:
                for name, (url, _) in urls.items():
                    results[name, concurrency].append(asyncio.run(one_round(
                        url, args.requests, concurrency, args.max_new_tokens, index * args.requests)))
    summaries = {key: summary(rounds) for key, rounds in results.items() if rounds}
    first = configs[0][0]
    print(f"so8t serve load: {args.model or args.adapter or 'the default model'}, concurrency "
          f"{', '.join(map(str, args.concurrency))}, {args.requests} requests × "
          f"{len(results[first, args.concurrency[0]])} rounds, {args.max_new_tokens} new tokens (greedy)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} (1 min) at the end; torch {torch.__version__}")
    print("| server | concurrency | torch threads | requests/s | tokens/s | p50 latency ms | p99 latency ms | "
          "tokens/s ÷ first |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, concurrency), result in summaries.items():
        baseline = summaries[first, concurrency]["tok_s"]
        print(f"| {name} | {concurrency} | {urls[name][1]} | {result['req_s']:.2f} | {result['tok_s']:.1f} | "
              f"{result['p50_ms']:.0f} | {result['p99_ms']:.0f} | {result['tok_s'] / baseline:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
