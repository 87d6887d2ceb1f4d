"""vLLM on a so8t export: the same greedy tokens as transformers, and the gates' cost inside vLLM.

Run with a python that has vLLM and so8t (on CPU: ``.venv-vllm/bin/python``; on a GPU machine, one with the
``vllm`` package):

    python benchmarks/vllm_check.py --export DIR                 # an existing so8t export
    python benchmarks/vllm_check.py --gguf FILE.gguf --work DIR  # train 2 steps (θ ~ N(0, 0.3)), export, check

1. transformers on the export: greedy tokens of ``--prompts`` chat prompts (``--new-tokens`` each, EOS
   ignored) — the reference;
2. vLLM on the export: the same prompts, greedy: how many sequences are identical (a float32 near-tie may
   part them), and the largest gap between the two engines' log-probabilities of a token while they agree;
3. decode throughput (tokens/s: generated tokens over the wall time of one ``generate`` of N prompts at
   once, N = each ``--concurrency``, median over ``--rounds``); with ``--gates-cost`` also of the same
   export without its gates (its base architecture, the same merged weights), the rounds alternating
   between the two engines: the gates' cost is the ratio.

Prints a Markdown table and writes ``--json``. ``--tensor-parallel-size`` passes through to vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.", "What is 12 times 7?",
             "Write a haiku about rain.", "Why is the sky blue?", "Give me a synonym for happy.",
             "How many legs does a spider have?", "Translate 'good morning' into Spanish."]


def make_export(gguf: str, work: Path) -> Path:
    """A short gated run on the model (2 steps, gates away from the identity) exported into ``work``."""
    run, export = work / "run", work / "export"
    if not (export / "config.json").is_file():
        so8t = [sys.executable, "-m", "so8t"]
        subprocess.run([*so8t, "train", "--model", gguf, "--max-steps", "2", "--batch-size", "2", "--max-length", "64",
                        "--warmup-steps", "1", "--theta-init-std", "0.3", "--learning-rate", "1e-3", "--save-steps",
                        "0", "--no-monitor", "--overwrite", "--output-dir", str(run)], check=True)
        subprocess.run([*so8t, "export", str(run), "--output-dir", str(export)], check=True)
    return export


def without_gates(export: Path, target: Path) -> Path:
    """The export as its base architecture: the same merged weights, no gate tensors."""
    from safetensors.torch import load_file, save_file

    from so8t.models.gated_config import SO8T_BLOCK

    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for file in export.iterdir():
        if file.suffix == ".safetensors":
            weights = {name: tensor for name, tensor in load_file(file).items() if ".so8t_gate." not in name}
            save_file(weights, target / file.name, metadata={"format": "pt"})
        elif file.name == "model.safetensors.index.json":
            index = json.loads(file.read_text())
            index["weight_map"] = {k: v for k, v in index["weight_map"].items() if ".so8t_gate." not in k}
            (target / file.name).write_text(json.dumps(index))
        elif file.is_file():
            shutil.copy(file, target / file.name)
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = config["model_type"].removeprefix("so8t_")
    config["architectures"] = [config["architectures"][0].removeprefix("So8t")]
    del config[SO8T_BLOCK]
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def prompts(export: Path, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export)
    return [tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + " " * (i // len(QUESTIONS))}],
                                          add_generation_prompt=True, return_dict=True)["input_ids"]
            for i in range(count)]


def transformers_greedy(export: Path, ids: list[list[int]], new_tokens: int, device: str):
    """[(tokens, log-probabilities of those tokens)] per prompt, EOS not stopping."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).to(device).eval()
    results = []
    with torch.no_grad():
        for prompt in ids:
            sequence, logprobs = list(prompt), []
            for _ in range(new_tokens):
                row = torch.log_softmax(model(torch.tensor([sequence], device=device)).logits[0, -1].double(), -1)
                sequence.append(int(row.argmax()))
                logprobs.append(row.max().item())
            results.append((sequence[len(prompt):], logprobs))
    del model
    return results


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.processor() or platform.machine()


def vllm_engine(model: Path, args):
    """One engine; with --gates-cost two live at once, so each takes a share of the memory: vLLM's defaults
    give one engine 90 % of the GPU, or on a CPU all but ~1.6 GiB of RAM (the second engine was killed)."""
    from vllm import LLM

    memory = {"gpu_memory_utilization": 0.4} if args.gates_cost else {}
    return LLM(model=str(model), dtype="float32", max_model_len=512, seed=0, enforce_eager=args.enforce_eager,
               tensor_parallel_size=args.tensor_parallel_size, max_num_seqs=max(args.concurrency), **memory)


def vllm_greedy(llm, ids: list[list[int]], new_tokens: int):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": prompt} for prompt in ids], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outputs]


def throughput(llm, ids: list[list[int]], new_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": prompt} for prompt in ids], params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--export", help="a so8t export of a Llama/Phi-3/Mistral/Qwen2 run")
    source.add_argument("--gguf", help="a .gguf base model: train 2 steps and export it into --work first")
    parser.add_argument("--work", default="benchmarks/out/vllm-check", help="folder for the run, the exports, the json")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24, help="greedy tokens compared (default: %(default)s)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="per prompt in the throughput runs")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile / CUDA graphs")
    parser.add_argument("--gates-cost", action="store_true", help="also the export without its gates, alternating")
    parser.add_argument("--json", help="default: WORK/vllm-check.json")
    args = parser.parse_args()

    # On a CPU vLLM sizes its KV cache from this (GiB), else from the free RAM: 64 sequences of 512 tokens of
    # SmolLM2 take 1.5 GiB in float32.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    import torch
    import vllm

    import so8t  # noqa: F401  (registers the gated configs and classes before the first transformers load)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    export = Path(args.export) if args.export else make_export(args.gguf, work)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = prompts(export, args.prompts)
    reference = transformers_greedy(export, ids, args.new_tokens, device)
    if device == "cuda":
        torch.cuda.empty_cache()

    gated = vllm_engine(export, args)
    generated = vllm_greedy(gated, ids, args.new_tokens)
    identical = sum(tokens == expected for (tokens, _), (expected, _) in zip(generated, reference))
    first_difference = [next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), None)
                        for (tokens, _), (expected, _) in zip(generated, reference)]
    # While the sequences agree, how far apart the two engines' log-probabilities of the same token are.
    gap = max((abs(a - b) for (_, theirs), (_, mine), first in zip(generated, reference, first_difference)
               for a, b in list(zip(theirs, mine))[:first]), default=0.0)
    result = {"export": str(export), "device": torch.cuda.get_device_name(0) if device == "cuda" else cpu_name(),
              "versions": {"vllm": vllm.__version__, "torch": torch.__version__}, "prompts": args.prompts,
              "new_tokens": args.new_tokens, "identical_sequences": identical, "first_difference": first_difference,
              "max_logprob_gap": gap,
              "load_average": os.getloadavg()[0], "throughput": {}}
    engines = {"gated": gated}
    if args.gates_cost:
        engines["plain"] = vllm_engine(without_gates(export, work / "export-without-gates"), args)
    for concurrency in args.concurrency:
        batch = prompts(export, concurrency)
        samples = {name: [] for name in engines}
        for engine in engines.values():
            throughput(engine, batch, 4)  # warm-up
        for _ in range(args.rounds):
            for name, engine in engines.items():
                samples[name].append(throughput(engine, batch, args.decode_tokens))
        result["throughput"][str(concurrency)] = {name: statistics.median(values) for name, values in samples.items()}
    Path(args.json or work / "vllm-check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"vLLM check: {export} on {result['device']}, vLLM {vllm.__version__}, torch {torch.__version__}, "
          f"TP {args.tensor_parallel_size}, {'eager' if args.enforce_eager else 'compiled'}, load average "
          f"{result['load_average']:.1f}")
    print(f"greedy vs transformers: {identical}/{args.prompts} sequences of {args.new_tokens} tokens identical "
          f"(first differing step per prompt: {first_difference}); largest log-probability gap while they agree "
          f"{gap:.2g}")
    print("| concurrency | tokens/s | without gates tokens/s | gated ÷ without (time) |")
    print("| --- | --- | --- | --- |")
    for concurrency, values in result["throughput"].items():
        with_gates, plain = values["gated"], values.get("plain")
        compared = ("", "") if plain is None else (f"{plain:.1f}", f"{plain / with_gates:.3f}×")
        print(f"| {concurrency} | {with_gates:.1f} | {compared[0]} | {compared[1]} |")
    return 0 if identical >= args.prompts // 2 else 1


if __name__ == "__main__":
    sys.exit(main())
