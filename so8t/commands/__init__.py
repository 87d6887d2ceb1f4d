"""so8t.commands: the ``so8t`` command line (``main``) and one module per command. A command module imports
nothing heavy at its top, so ``so8t --help`` and argument errors answer at once."""
