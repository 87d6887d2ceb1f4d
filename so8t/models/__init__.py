"""so8t.models: base models and what is done to them: loading a model and its tokenizer from a hub id, a
directory, a ``.gguf`` file (``source``, ``loading``) or the embedded demo (``demo``); a trained run ready
for inference (``inference``); the causal-LM loss without a logits tensor (``fused_loss``); keeping a
4-bit model trainable (``bnb_guard``)."""
