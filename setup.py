import glob
import os
import re

from setuptools import find_packages, setup

CPP_SWITCH = "SO8T_BUILD_CPP"


def package_version() -> str:
    """The one version string, from so8t/__init__.py (``so8t --version`` prints it)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "so8t", "__init__.py")) as source:
        return re.search(r'^__version__ = "([^"]+)"', source.read(), re.MULTILINE).group(1)


def cpp_extension_options() -> dict:
    """setup() arguments that build csrc/ into so8t_kernels._C, or none: installing never fails over it.

    Built against the torch already installed (``pip install --no-build-isolation``; with isolation
    torch is absent from the build environment and the extension is skipped). ``SO8T_BUILD_CPP=0``
    skips it; without it so8t runs the PyTorch reference on CPU tensors.
    """
    if os.environ.get(CPP_SWITCH, "1") == "0":
        print(f"so8t: {CPP_SWITCH}=0, skipping the C++ CPU extension (csrc/)")
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as error:
        print(f"so8t: torch is not importable at build time ({error}); skipping the C++ CPU extension "
              "(install with --no-build-isolation to build it)")
        return {}

    class OptionalBuildExtension(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as error:  # no compiler, a failing one: install without the extension
                print(f"so8t: building the C++ CPU extension failed, installing without it "
                      f"(so8t runs the PyTorch reference on CPU tensors): {error}")

    extension = CppExtension(
        "so8t_kernels._C",
        sorted(glob.glob("csrc/*.cpp")),
        # -O3 without -march: kernel variants per CPU come from target_clones (csrc/simd.h).
        # -fopenmp: at::parallel_for is inline and threads only under OpenMP; it links the libgomp
        # that torch already loaded. -ffp-contract=fast: fuse a * b + c into FMAs where the CPU has them.
        # -Wno-psabi: csrc/simd.h's 32-byte vectors never cross a non-inlined call; GCC's ABI note is moot.
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi"],
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(
    name="so8t",
    version=package_version(),
    description="SO(8) rotation gates for Hugging Face decoder models: kernels, QLoRA training, monitoring",
    packages=find_packages(include=["so8t", "so8t.*", "so8t_kernels", "so8t_kernels.*"]),
    package_data={"so8t.data": ["*.jsonl"]},
    python_requires=">=3.10",
    # A range, never a pin: a user with a CUDA torch keeps it. On a machine without torch, install the
    # CPU wheel first (see README) or pip may fetch a CUDA build.
    install_requires=["torch>=2.4", "numpy", "triton>=3.1; platform_system == 'Linux'"],
    extras_require={
        "train": [
            "transformers>=4.45", "peft>=0.13", "bitsandbytes>=0.45", "accelerate>=1.0",
            "safetensors", "tokenizers", "pandas", "pyarrow", "matplotlib", "seaborn", "tqdm",
            "gguf",  # --model FILE.gguf: transformers dequantises GGUF files with it
            "tensorboard",  # --report-to tensorboard
        ],
        "test": ["pytest", "pytest-benchmark", "pytest-timeout", "scipy", "openai", "schemathesis"],
        "serve": ["fastapi", "uvicorn", "httpx", "prometheus-client"],
    },
    entry_points={
        "console_scripts": ["so8t=so8t.commands.main:main"],
        # vLLM calls it in each of its processes: the gated architectures of `so8t export` folders.
        "vllm.general_plugins": ["so8t = so8t.vllm:register"],
    },
    **cpp_extension_options(),
)
