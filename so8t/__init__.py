"""so8t: SO(8) rotation gates for Hugging Face decoder models (model side; the ops live in so8t_kernels).

```python
from so8t import SO8TConfig, attach_so8t, save_so8t_adapter, load_so8t_adapter

handle = attach_so8t(model, SO8TConfig(warmup_steps=100))  # gates on decoder layers 1 … L−2
...                                                        # train (AlphaAnnealingCallback runs the α warmup)
save_so8t_adapter(handle, "out/so8t")
handle = load_so8t_adapter(fresh_model, "out/so8t")        # same logits as the trained model
```

Importing ``so8t`` imports nothing heavy: each name below is imported from its module on first use
(torch with the model-side names, transformers with the annealing callback), so ``so8t --help`` and
the torch-free commands start without them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "SO8TConfig": "gates.config",
    "SO8TError": "errors",
    "SO8THandle": "gates.placement",
    "attach_so8t": "gates.placement",
    "find_so8t_handle": "gates.placement",
    "load_so8t_adapter": "gates.adapter",
    "save_so8t_adapter": "gates.adapter",
    "AlphaAnnealingCallback": "gates.annealing",
    "alpha_at_step": "gates.annealing",
    "apply_alpha_schedule": "gates.annealing",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'so8t' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
