"""so8t: SO(8) rotation gates for Hugging Face decoder models (model side; the ops live in so8t_kernels)."""
