"""``so8t export``: a trained run as a standalone Hugging Face model folder that transformers and vLLM load.

The folder holds the base weights with the LoRA merged, each gated layer's θ and α
(so8t.models.gated_config names them), a config.json naming the gated class (``So8tLlamaForCausalLM`` …)
with an ``so8t`` block, the tokenizer with its chat template, and the generation config. A run trained
with ``--no-so8t`` exports as its plain base architecture.

What can be exported: a finished ``so8t train`` output directory (its final files published), or one of
its complete checkpoints (``so8t_checkpoint.json`` written). Every check runs before anything is written;
the folder is written under a temporary name beside the target and renamed into place, so a failed or
killed export leaves nothing a loader could mistake for a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..durable import fsync_tree
from ..errors import SO8TError
from ..gates.adapter import CONFIG_FILE as GATES_CONFIG_FILE
from ..gates.adapter import SO8T_ADAPTER_DIR
from .json_file import read_json_object
from .run_base import EMBEDDED_BASE_FILE, PEFT_CONFIG_FILE, run_base_model
from .source import cache_root, check_model

# Names the training side writes (so8t.training.outputs / .checkpoints; tests keep them equal): the
# models layer reads a run's files without importing training.
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_FILE = "so8t_checkpoint.json"
CHECKPOINT_PREFIX = "checkpoint-"
PUBLISH_DIR = ".publish"
MODEL_CONFIG_FILE = "config.json"
CALIBRATION_FILE = "judge_calibration.json"  # so8t.judge.calibration's: copied beside an exported judge
DTYPES = ("float32", "bfloat16", "float16")
GENERATE, CLASSIFY = "generate", "classify"
# What the demo tokenizer's prompts look like without a chat template (so8t.data.dataset.render_prompt),
# as a template: vLLM's chat endpoint needs one, and with it the export renders the same text.
FALLBACK_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")


@dataclass(frozen=True)
class RunSource:
    """What ``inspect_run`` read from a run's files (no model loaded)."""

    path: Path
    checkpoint: bool
    task: str  # GENERATE or CLASSIFY
    base: str | None  # the base model: a hub id, a directory or file, DEMO_MODEL; None: not recorded (a judge)
    gated: bool


def _step(checkpoint: Path) -> tuple[int, str]:
    suffix = checkpoint.name[len(CHECKPOINT_PREFIX):]
    return (int(suffix) if suffix.isdigit() else -1, checkpoint.name)


def inspect_run(run: str | Path, model: str | None = None) -> RunSource:
    """Refuses, from its files alone, what is not a finished run or a complete checkpoint, and a base
    model that is not where the run recorded it (``model`` overrides the recorded base)."""
    path = Path(run).expanduser().resolve()
    if not path.is_dir():
        raise SO8TError(f"{run}: no such directory")
    checkpoint = path.name.startswith(CHECKPOINT_PREFIX) or (path / CHECKPOINT_FILE).is_file()
    if checkpoint and not (path / CHECKPOINT_FILE).is_file():
        raise SO8TError(f"{run}: not a complete checkpoint (no {CHECKPOINT_FILE}: it was cut short)")
    if not checkpoint and (not (path / TRAINER_STATE_FILE).is_file() or (path / PUBLISH_DIR).exists()):
        complete = [p.name for p in sorted(path.glob(f"{CHECKPOINT_PREFIX}*"), key=_step) if (p / CHECKPOINT_FILE).is_file()]
        hint = f"; export one of its checkpoints ({', '.join(complete)})" if complete else ""
        raise SO8TError(f"{run}: not a finished so8t train run (its final files are not published){hint}")
    peft_config, model_config = path / PEFT_CONFIG_FILE, path / MODEL_CONFIG_FILE
    if peft_config.is_file():
        task = CLASSIFY if read_json_object(peft_config).get("task_type") == "SEQ_CLS" else GENERATE
    elif model_config.is_file() and read_json_object(model_config).get("id2label"):
        task = CLASSIFY  # the demo judge, every weight trained: the folder is its model
    else:
        raise SO8TError(f"{run}: neither a LoRA adapter ({PEFT_CONFIG_FILE}) nor a trained classifier "
                        f"({MODEL_CONFIG_FILE}): not a so8t train output")
    try:
        base = check_model(model) if model is not None else run_base_model(str(path))
    except SO8TError as error:  # "--adapter RUN was trained on BASE, which no longer exists: pass --model …"
        raise SO8TError(str(error).removeprefix("--adapter ")) from None
    if base is None and task == GENERATE:
        raise SO8TError(f"{run} records no base model (no {EMBEDDED_BASE_FILE}, no base in {PEFT_CONFIG_FILE}): "
                        "pass --model with the model it was trained on")
    gated = (path / SO8T_ADAPTER_DIR / GATES_CONFIG_FILE).is_file()
    return RunSource(path, checkpoint, task, base, gated)


def check_output_dir(output: str | Path) -> Path:
    """The target folder: absent, or an empty directory."""
    target = Path(output).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise SO8TError(f"--output-dir {output} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()):
        raise SO8TError(f"--output-dir {output} already exists and is not empty")
    return target


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise SO8TError(f"--dtype {name}: expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def export_model(model, tokenizer, handle, output: str | Path, dtype: str, source: RunSource,
                 progress=print) -> Path:
    """Writes ``model`` (LoRA merged; a causal LM or a sequence classifier) with the gates of ``handle``
    (an SO8THandle attached to it, or None) and ``tokenizer`` into ``output``; returns the folder."""
    from ..gates.placement import BANK_ATTRIBUTE, find_decoder_layout
    from .gated_config import gate_tensor_names, gated_config

    target = check_output_dir(output)
    head = "ForSequenceClassification" if source.task == CLASSIFY else "ForCausalLM"
    layers_path = find_decoder_layout(model).path
    # The merged base in the export's dtype; the gates stay fp32 (trained in fp32, 2 × 28 floats per block).
    weights = {name: tensor.to(torch_dtype(dtype)) if tensor.is_floating_point() else tensor
               for name, tensor in model.state_dict().items() if BANK_ATTRIBUTE not in name}
    config = model.config
    if handle is not None:
        for gate, layer in enumerate(handle.layer_indices):
            theta_name, alpha_name = gate_tensor_names(layers_path, layer)
            weights[theta_name] = handle.theta[gate].detach().float().cpu().contiguous()
            weights[alpha_name] = handle.alpha[gate].detach().float().cpu().contiguous()
        block = {"layers": list(handle.layer_indices), "base_model": source.base or "recorded in the run",
                 "run": str(source.path)}
        config = gated_config(model.config, block, head)
    config.dtype = dtype
    if not getattr(tokenizer, "chat_template", None) and source.task == GENERATE:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    made = [parent for parent in (target, *target.parents) if not parent.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}"  # mkdir: the umask's mode, as for target
    try:
        staging.mkdir()
        progress(f"so8t export: writing {len(weights)} tensors ({dtype}) into {target}")
        model.save_pretrained(staging, state_dict=weights)
        config.save_pretrained(staging)  # after the model's: names the gated class, with the so8t block
        tokenizer.save_pretrained(staging)
        if (source.path / CALIBRATION_FILE).is_file():
            shutil.copyfile(source.path / CALIBRATION_FILE, staging / CALIBRATION_FILE)
        fsync_tree(staging)
        staging.rename(target)  # replaces an empty target directory
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return target


def export_run(run: str | Path, output: str | Path, dtype: str = "float32", model: str | None = None,
               progress=print) -> Path:
    """A ``--task generate`` run (or checkpoint) exported into ``output``, loaded the way ``so8t serve
    --adapter`` loads it (so8t.models.inference), so the export's logits are the served run's."""
    from .inference import load_for_inference

    source = inspect_run(run, model)
    if source.task != GENERATE:
        raise SO8TError(f"{run} is a --task classify run (a safety judge), not a generation model")
    target = check_output_dir(output)
    torch_dtype(dtype)
    progress(f"so8t export: loading {source.base} with the run's LoRA merged and its gates")
    loaded = load_for_inference(source.base, str(source.path))
    return export_model(loaded.model, loaded.tokenizer, loaded.handle, target, dtype, source, progress)


def cached_export(run: str | Path, dtype: str = "float32", model: str | None = None) -> Path:
    """The export of ``run`` in so8t's cache (``$SO8T_CACHE_DIR/exports``), written on first use. The key
    hashes the run's files' names, sizes and modification times, the base and the dtype: a run trained
    again into the same directory is exported again."""
    source = inspect_run(run, model)
    digest = hashlib.sha256(json.dumps([str(source.path), source.base, dtype]).encode())
    for file in sorted(p for p in source.path.rglob("*") if p.is_file() and not _run_only(p, source.path)):
        stat = file.stat()
        digest.update(f"{file.relative_to(source.path)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    target = cache_root() / "exports" / digest.hexdigest()[:32]
    if (target / MODEL_CONFIG_FILE).is_file():
        return target
    try:
        export_run(source.path, target, dtype, model, progress=lambda message: print(message, file=sys.stderr))
    except (OSError, SO8TError):
        if not (target / MODEL_CONFIG_FILE).is_file():
            raise
        # else another process finished the same export first
    return target


def _run_only(file: Path, run: Path) -> bool:
    """Files of the run that are not what is exported (checkpoints, monitoring, logs)."""
    top = file.relative_to(run).parts[0]
    return top.startswith((CHECKPOINT_PREFIX, ".")) or top in ("monitoring", "runs")


def read_gate_activations(folder: str | Path) -> dict[int, float]:
    """σ(α) of each gated layer of an exported folder, read from its safetensors headers and α tensors
    (θ's presence checked too: a server would otherwise fail deep inside its engine); {} for a folder
    without an so8t block."""
    import torch
    from safetensors import safe_open

    from .gated_config import SO8T_BLOCK, gate_tensor_names

    folder = Path(folder)
    config = read_json_object(folder / MODEL_CONFIG_FILE)
    if SO8T_BLOCK not in config:
        return {}
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as weights:
            tensors.update({name: (file, name) for name in weights.keys()})
    activations = {}
    for layer in config[SO8T_BLOCK]["layers"]:
        theta, alpha = gate_tensor_names("model.layers", layer)
        missing = [name for name in (theta, alpha) if name not in tensors]
        if missing:
            raise SO8TError(f"{folder} lacks the gate tensors its config.json lists: {', '.join(missing)}")
        with safe_open(tensors[alpha][0], "pt") as weights:
            activations[layer] = torch.sigmoid(weights.get_tensor(alpha).float()).item()
    return activations

