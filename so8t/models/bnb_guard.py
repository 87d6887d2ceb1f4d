"""Keeps a 4-bit bitsandbytes model trainable after an inference forward on CPU.

On CPUs with avx512_bf16, bitsandbytes (0.50.2 here) rewrites a ``Linear4bit`` weight, in place and for
good, into a layout for its fused bf16 inference kernel the first time the layer runs in eval mode on
an input that needs no gradient (``quant_state.packing_format_for_cpu``). From then on every forward
of that layer, training ones included, goes through the inference kernel, which has no backward:
gradients through the frozen 4-bit layers are dropped without an error, and LoRA ``B`` matrices upstream
get exactly zero (12 of 24 in the embedded demo after one eval forward). An eval before training, a
mid-training eval or a generation on the model being trained each trigger it.

``keep_4bit_weights_trainable`` turns that repack off per layer (the ``support_avx512bf16_for_cpu``
flag bitsandbytes reads), so eval forwards take the dequantising path the training forward takes: same
weights, same gradients, slower only for inference. A layer that was already repacked is converted
back with bitsandbytes' own inverse, which is close but not exact: the repack rounds the block scales to
bf16 (weights move by up to ~0.6 % of their largest magnitude in the demo).
"""

from __future__ import annotations

from torch import nn

REPACK_SWITCH = "support_avx512bf16_for_cpu"  # Linear4bit attribute: may this layer repack on CPU?


def keep_4bit_weights_trainable(model: nn.Module) -> int:
    """Stops every bitsandbytes 4-bit layer of ``model`` from repacking for CPU inference and undoes a
    repack that already happened. Returns how many layers had been repacked. Call it once, before any
    eval or generation on a 4-bit model that will be trained; it is idempotent and cheap."""
    try:
        from bitsandbytes.nn import Linear4bit
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # without bitsandbytes there are no 4-bit layers
        return 0
    restored = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        setattr(module, REPACK_SWITCH, False)
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
            restored += 1
    return restored
