"""so8t.training: ``so8t train``'s two tasks, ``finetune`` (``--task generate``) and ``classify`` (``--task
classify``), and what both use, one job per module: ``options`` (``TrainOptions``; imports no torch, so
``--help`` stays fast), ``lora``, ``trainer``, ``callbacks``, ``runner``, ``checkpoints``, ``outputs`` (the
output directory the run owns), ``heldout``, ``distributed``, ``summary``.
"""
