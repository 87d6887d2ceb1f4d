"""The pieces both training tasks of ``so8t train`` use, one job per module.

- ``options``: ``TrainOptions`` and the command-line arguments (imports no torch, so ``--help`` stays fast).
- ``loading``: the base model and tokenizer (``--model`` or the embedded default), causal LM or classifier.
- ``lora``: LoRA targets and adapters (with the 4-bit preparation peft needs).
- ``callbacks``: the Trainer callbacks of a run (monitor, α annealing).
- ``outputs``: the output directory: staging and publishing the final files.

The tasks themselves are ``so8t.finetune`` (``--task generate``) and ``so8t.classify`` (``--task classify``);
``so8t.train`` is the command that picks one.
"""
