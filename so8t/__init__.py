"""so8t: SO(8) rotation gates for Hugging Face decoder models (model side; the ops live in so8t_kernels).

```python
from so8t import SO8TConfig, attach_so8t, save_so8t_adapter, load_so8t_adapter

handle = attach_so8t(model, SO8TConfig(warmup_steps=100))  # gates on decoder layers 1 … L−2
...                                                        # train (AlphaAnnealingCallback runs the α warmup)
save_so8t_adapter(handle, "out/so8t")
handle = load_so8t_adapter(fresh_model, "out/so8t")        # same logits as the trained model
```

Importing ``so8t`` loads torch but not transformers; the annealing callback and the training command
import it when used.
"""

from .adapter import load_so8t_adapter, save_so8t_adapter
from .config import SO8TConfig
from .errors import SO8TError
from .placement import SO8THandle, attach_so8t, find_so8t_handle

__all__ = [
    "SO8TConfig",
    "SO8TError",
    "SO8THandle",
    "attach_so8t",
    "find_so8t_handle",
    "load_so8t_adapter",
    "save_so8t_adapter",
    "AlphaAnnealingCallback",
    "alpha_at_step",
    "apply_alpha_schedule",
]


def __getattr__(name: str):
    # The annealing module subclasses transformers' TrainerCallback: import transformers only on use.
    if name in ("AlphaAnnealingCallback", "alpha_at_step", "apply_alpha_schedule"):
        from . import annealing

        return getattr(annealing, name)
    raise AttributeError(f"module 'so8t' has no attribute {name!r}")
