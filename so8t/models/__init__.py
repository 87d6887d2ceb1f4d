"""so8t.models: base models and what is done to them: loading a model and its tokenizer from a hub id, a
directory, a ``.gguf`` file (``source``, ``loading``) or the embedded demo (``demo``); the base a run was
trained on (``run_base``); a trained run ready for inference (``inference``); a run written as a standalone
gated Hugging Face folder (``export``) and the gated configs and classes that load it (``gated_config``,
``gated``); the causal-LM loss without a logits tensor (``fused_loss``); keeping a 4-bit model trainable
(``bnb_guard``); JSON files handed over by a user (``json_file``)."""
