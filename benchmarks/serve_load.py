"""Load on ``so8t serve`` over loopback: throughput and latency at a fixed concurrency, measured in one run
for several server configurations:

- ``--compare batching`` (default): dynamic batching (the default ``--max-batch 16``) against the same
  server handling requests one at a time (``--max-batch 1``), both with ``--threads`` (default: the
  server's own choice);
- ``--compare threads``: ``--threads 1``, ``--threads 2`` and the server's default, batched.

Each configuration is a real ``so8t serve`` subprocess on 127.0.0.1 (a free port, its own temporary
audit database; OMP_NUM_THREADS is removed from its environment, so only ``--threads`` or the server's
default decides its threads). A round sends ``--requests`` /think requests (greedy, ``--max-new-tokens``
each, distinct prompts) with at most ``--concurrency`` in flight; rounds alternate between the servers so a
shared machine's changing load hits them alike. Bounded: at most ``--rounds`` rounds each and
``--max-seconds`` in all.

    python benchmarks/serve_load.py --model demo                # the random demo model, concurrency 16
    python benchmarks/serve_load.py                             # the default model (SmolLM2): read tokens/s
    python benchmarks/serve_load.py --compare threads           # 1 vs 2 vs the default threads
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

STARTUP_TIMEOUT_S = 300


@contextlib.contextmanager
def serve(name: str, options: list[str], model: str | None, audit_dir: Path):
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "so8t", "serve", "--port", "0", "--log-level", "warning", "--max-queue", "1024",
               "--audit-db", str(audit_dir / f"audit-{len(list(audit_dir.iterdir()))}.db"), *options]
    if model is not None:
        command += ["--model", model]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        banner = process.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+) .*torch threads: (\d+)", banner)
        if match is None:
            raise RuntimeError(f"so8t serve ({name}) did not start: {banner!r}")
        url = match.group(1)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        yield url, int(match.group(2))
    finally:
        process.terminate()
        process.wait(timeout=120)


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


def configurations(compare: str, threads: int | None) -> list[tuple[str, list[str]]]:
    """(name, so8t serve options) of each server; the first is what the ratios are against."""
    if compare == "threads":
        return [("--threads 1", ["--threads", "1"]), ("--threads 2", ["--threads", "2"]), ("default threads", [])]
    thread_options = ["--threads", str(threads)] if threads is not None else []
    return [("--max-batch 16 (default)", ["--max-batch", "16", *thread_options]),
            ("--max-batch 1 (one at a time)", ["--max-batch", "1", *thread_options])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="as so8t serve --model (default: so8t serve's, SmolLM2-135M-Instruct)")
    parser.add_argument("--compare", choices=("batching", "threads"), default="batching",
                        help="which servers to compare (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="per round (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="per configuration (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="so8t serve --threads with --compare batching (default: the "
                                                    "server's own choice)")
    parser.add_argument("--max-seconds", type=float, default=600, help="stop starting rounds after this")
    args = parser.parse_args()

    import torch

    # A SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the servers started below are stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    configs = configurations(args.compare, args.threads)
    results = {name: [] for name, _ in configs}
    with tempfile.TemporaryDirectory() as audit_dir, contextlib.ExitStack() as servers:
        urls = {name: servers.enter_context(serve(name, options, args.model, Path(audit_dir)))
                for name, options in configs}
        for url, _ in urls.values():  # warm-up: first-call allocations, tokenizer caches
            asyncio.run(one_round(url, args.concurrency, args.concurrency, 4, 10_000))
        for index in range(args.rounds):
            if time.monotonic() - started > args.max_seconds:
                break
            for name, (url, _) in urls.items():
                results[name].append(asyncio.run(one_round(url, args.requests, args.concurrency,
                                                           args.max_new_tokens, index * args.requests)))
    summaries = {name: summary(rounds) for name, rounds in results.items()}
    first = configs[0][0]
    print(f"so8t serve load: {args.model or 'the default model'}, concurrency {args.concurrency}, "
          f"{args.requests} requests × {len(results[first])} rounds, {args.max_new_tokens} new tokens (greedy)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} (1 min) at the end; torch {torch.__version__}")
    print("| server | torch threads | requests/s | tokens/s | p50 latency ms | p99 latency ms | tokens/s ÷ first |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, result in summaries.items():
        print(f"| {name} | {urls[name][1]} | {result['req_s']:.2f} | {result['tok_s']:.1f} | {result['p50_ms']:.0f} | "
              f"{result['p99_ms']:.0f} | {result['tok_s'] / summaries[first]['tok_s']:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
