"""so8t.gates: the SO(8) gates themselves: their configuration (``config``), the parameter bank every gate
of a model shares (``bank``), attaching them to a decoder's layers and detaching them (``placement``), the
α warmup (``annealing``) and the adapter files (``adapter``)."""
