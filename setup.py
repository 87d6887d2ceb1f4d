from setuptools import find_packages, setup

setup(
    name="so8t",
    version="0.1.0",
    description="SO(8) rotation gates for Hugging Face decoder models: kernels, QLoRA training, monitoring",
    packages=find_packages(include=["so8t", "so8t.*", "so8t_kernels", "so8t_kernels.*"]),
    package_data={"so8t": ["data/*.jsonl"]},
    python_requires=">=3.10",
    # A range, never a pin: a user with a CUDA torch keeps it. On a machine without torch, install the
    # CPU wheel first (see README) or pip may fetch a CUDA build.
    install_requires=["torch>=2.4", "numpy", "triton>=3.1; platform_system == 'Linux'"],
    extras_require={
        "train": [
            "transformers>=4.45", "peft>=0.13", "bitsandbytes>=0.45", "accelerate>=1.0",
            "safetensors", "tokenizers", "pandas", "matplotlib", "seaborn", "tqdm",
        ],
        "test": ["pytest", "pytest-benchmark", "pytest-timeout", "scipy"],
        "serve": ["fastapi", "uvicorn", "httpx"],
    },
    entry_points={"console_scripts": ["so8t=so8t.cli:main"]},
)
