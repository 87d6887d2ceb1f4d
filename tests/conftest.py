"""Test set-up: Triton runs through its interpreter on CPU tensors, and nothing reaches a model hub.

TRITON_INTERPRET must be set before any kernel module is imported: triton.jit reads it at decoration.
On a GPU machine, ``SO8T_TEST_DEVICE=cuda`` (benchmarks/device_check.sh) runs the op tests on CUDA
tensors with compiled Triton: there the interpreter stays off.
"""

import os

if os.environ.get("SO8T_TEST_DEVICE", "cpu") == "cuda":
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
