"""Test set-up: Triton runs through its interpreter on CPU tensors, and nothing reaches a model hub.

TRITON_INTERPRET must be set before any kernel module is imported: triton.jit reads it at decoration.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
