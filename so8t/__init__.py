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

Importing ``so8t`` also lets transformers load what ``so8t export`` writes: the gated configs and model
classes (so8t.models.gated) are registered with the Auto classes when transformers imports them (or at
once if it already has), so ``AutoModelForCausalLM.from_pretrained(EXPORT)`` needs no trust_remote_code
while ``import so8t`` stays free of transformers (~10 s of imports on a 2-core machine).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading

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



# transformers module → the so8t module whose register() it calls for: configs with AutoConfig, model
# classes with the Auto model classes. Registering imports transformers' model modules, which fails while
# transformers is part-way through importing itself (its modules import each other in cycles): it runs
# when the outermost transformers module of an import has finished executing.
_REGISTRARS = {
    "transformers.models.auto.configuration_auto": "so8t.models.gated_config",
    "transformers.models.auto.modeling_auto": "so8t.models.gated",
}


class _TransformersImports(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loaders of transformers' modules to learn when their import ends."""

    def __init__(self):
        self.pending: list[str] = []  # registrars whose transformers module is imported
        self.depth = threading.local()  # transformers modules executing, per thread
        self.registering = False  # a registrar's own imports finish transformers modules too

    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] != "transformers":
            return None
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if finder is not self and hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ReportingLoader(spec.loader, self)
                return spec
        return None

    def executed(self, name: str) -> None:
        if name in _REGISTRARS:
            self.pending.append(_REGISTRARS[name])
        if getattr(self.depth, "value", 0) == 0 and not self.registering:
            self.registering = True
            try:
                while self.pending:
                    _register(self.pending.pop(0))
            finally:
                self.registering = False


class _ReportingLoader(importlib.abc.Loader):
    """The module's own loader (everything delegated), telling ``imports`` when a module has executed."""

    def __init__(self, loader, imports: _TransformersImports):
        self.loader = loader
        self.imports = imports

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        depth = self.imports.depth
        depth.value = getattr(depth, "value", 0) + 1
        try:
            self.loader.exec_module(module)
        finally:
            depth.value -= 1
        self.imports.executed(module.__name__)

    def __getattr__(self, name):  # get_source for tracebacks, resource readers, is_package …
        return getattr(self.loader, name)


def _register(registrar: str) -> None:
    try:
        importlib.import_module(registrar).register()
    except Exception as error:  # transformers still works; only so8t's exports do not load through it
        import warnings

        warnings.warn(f"so8t: exported gated models are not registered with transformers ({registrar}: "
                      f"{type(error).__name__}: {error})", stacklevel=2)


def _register_gated_models() -> None:
    if any(isinstance(finder, _TransformersImports) for finder in sys.meta_path):
        return
    for module_name, registrar in _REGISTRARS.items():
        if module_name in sys.modules:
            _register(registrar)
    sys.meta_path.insert(0, _TransformersImports())


_register_gated_models()
