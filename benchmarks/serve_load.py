"""Load on ``so8t serve`` over loopback: throughput and latency at a fixed concurrency, dynamic batching
(the default ``--max-batch 16``) against the same server handling requests one at a time
(``--max-batch 1``), measured in one run.

Each configuration is a real ``so8t serve`` subprocess on 127.0.0.1 (a free port, its own temporary
audit database; OMP_NUM_THREADS is removed from its environment, so the server picks its threads, unless
``--threads`` sets it). A round sends
``--requests`` /think requests (greedy, ``--max-new-tokens`` each, distinct prompts) with at most
``--concurrency`` in flight; rounds alternate between the two servers so a shared machine's changing
load hits both alike. Bounded: at most ``--rounds`` rounds each and ``--max-seconds`` in all.

    python benchmarks/serve_load.py                      # embedded demo model, concurrency 16
    python benchmarks/serve_load.py --model FILE.gguf    # a real model: tokens/s is the figure to read
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
def serve(max_batch: int, model: str | None, audit_dir: Path, threads: int | None):
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-m", "so8t", "serve", "--port", "0", "--log-level", "warning",
               "--max-batch", str(max_batch), "--max-queue", "1024",
               "--audit-db", str(audit_dir / f"audit-batch{max_batch}.db")]
    if model is not None:
        command += ["--model", model]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        banner = process.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+) .*torch threads: (\d+)", banner)
        if match is None:
            raise RuntimeError(f"so8t serve did not start: {banner!r}")
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="as so8t serve --model (default: the embedded demo)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="per round (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="per configuration (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the servers (default: unset, so8t serve's "
                                                    "own choice)")
    parser.add_argument("--max-seconds", type=float, default=600, help="stop starting rounds after this")
    args = parser.parse_args()

    import torch

    # A SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the servers started below are stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.monotonic()
    results = {16: [], 1: []}
    with tempfile.TemporaryDirectory() as audit_dir, serve(16, args.model, Path(audit_dir), args.threads) \
            as (batched, threads), serve(1, args.model, Path(audit_dir), args.threads) as (single, _):
        for url in (batched, single):  # warm-up: first-call allocations, tokenizer caches
            asyncio.run(one_round(url, args.concurrency, args.concurrency, 4, 10_000))
        for index in range(args.rounds):
            if time.monotonic() - started > args.max_seconds:
                break
            for max_batch, url in ((16, batched), (1, single)):
                results[max_batch].append(asyncio.run(one_round(url, args.requests, args.concurrency,
                                                                args.max_new_tokens, index * args.requests)))
    batched_summary, single_summary = summary(results[16]), summary(results[1])
    print(f"so8t serve load: {args.model or 'embedded demo'}, concurrency {args.concurrency}, "
          f"{args.requests} requests × {len(results[16])} rounds, {args.max_new_tokens} new tokens (greedy), "
          f"{threads} torch thread(s)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}")
    print("| server | requests/s | tokens/s | p50 latency ms | p99 latency ms |")
    print("| --- | --- | --- | --- | --- |")
    for name, result in (("--max-batch 16 (default)", batched_summary), ("--max-batch 1 (one at a time)", single_summary)):
        print(f"| {name} | {result['req_s']:.2f} | {result['tok_s']:.1f} | {result['p50_ms']:.0f} | {result['p99_ms']:.0f} |")
    print(f"throughput ratio (batched / one at a time): {batched_summary['req_s'] / single_summary['req_s']:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
