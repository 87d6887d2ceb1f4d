"""SO8T adapter files: the gate parameters (safetensors) and what they fit (JSON, with a format version).

A directory holds ``so8t_adapter.safetensors`` (``theta`` ``[G, hidden/8, 28]``, ``alpha`` ``[G]``, fp32)
and ``so8t_adapter.json``: format version, SO8TConfig, gated layer indices, the base model's layer
count and hidden size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import SO8TError
from .config import SO8TConfig
from .placement import SO8THandle, attach_so8t, find_decoder_layout, find_so8t_handle

FORMAT_VERSION = 1
WEIGHTS_FILE = "so8t_adapter.safetensors"
CONFIG_FILE = "so8t_adapter.json"
# Where `so8t train` (and the judge's training) put the SO8T adapter inside an output directory.
SO8T_ADAPTER_DIR = "so8t"


def save_so8t_adapter(handle_or_model: SO8THandle | nn.Module, path: str | Path) -> Path:
    """Writes the gates of a handle (or of the model they are attached to) into directory ``path``."""
    handle = handle_or_model if isinstance(handle_or_model, SO8THandle) else find_so8t_handle(handle_or_model)
    if handle is None:
        raise SO8TError("the model has no SO8T gates to save")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"theta": handle.theta.detach().cpu().contiguous(), "alpha": handle.alpha.detach().cpu().contiguous()}
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format_version": str(FORMAT_VERSION)})
    description = {
        "format_version": FORMAT_VERSION,
        "config": handle.config.to_dict(),
        "layer_indices": handle.layer_indices,
        "num_layers": handle.num_layers,
        "hidden_size": handle.hidden_size,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return directory


def read_so8t_adapter_description(path: str | Path) -> dict:
    """The JSON half of an adapter directory, with its format version checked."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise SO8TError(f"{config_path} not found: not an SO8T adapter directory")
    try:
        description = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise SO8TError(f"{config_path} is not valid JSON: {error}") from None
    version = description.get("format_version")
    if version != FORMAT_VERSION:
        raise SO8TError(f"{config_path} has format version {version!r}; this so8t reads version {FORMAT_VERSION}")
    return description


def load_so8t_adapter(model: nn.Module, path: str | Path) -> SO8THandle:
    """Attaches gates saved by ``save_so8t_adapter`` to ``model`` (the same base architecture) and returns them."""
    description = read_so8t_adapter_description(path)
    layout = find_decoder_layout(model)
    for key, actual in (("num_layers", layout.num_layers), ("hidden_size", layout.hidden_size)):
        if description[key] != actual:
            raise SO8TError(
                f"the SO8T adapter in {path} was trained on a model with {key}={description[key]}; "
                f"this model has {key}={actual}"
            )
    weights_path = Path(path) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise SO8TError(f"{weights_path} not found: the SO8T adapter in {path} is incomplete")
    tensors = load_file(weights_path)
    missing = sorted({"theta", "alpha"} - set(tensors))
    if missing:
        raise SO8TError(f"{weights_path} has no {' or '.join(missing)} tensor")
    config = SO8TConfig.from_dict({**description["config"], "layers": description["layer_indices"]})
    handle = attach_so8t(model, config)
    try:
        for name in ("theta", "alpha"):
            parameter = getattr(handle, name)
            if tensors[name].shape != parameter.shape:
                raise SO8TError(
                    f"{name} in {path} has shape {tuple(tensors[name].shape)}; expected {tuple(parameter.shape)}"
                )
            with torch.no_grad():
                parameter.copy_(tensors[name])
    except SO8TError:
        handle.detach()
        raise
    return handle
