"""moela: Triton kernels and PyTorch references for DeepSeek-V3-style MoE, MLA and FP8.

One import package, ``moela``; its subpackages are the repository's top-level folders
(``kernels/`` -> ``moela.kernels`` and so on), mapped here with ``package_dir`` so that
nothing is importable as a bare top-level ``kernels`` or ``model``.
"""

from setuptools import setup

NESTED = ("profiling.ops", "profiling.examples")  # packages inside the subpackages
SUBPACKAGES = ("kernels", "model", "reference", "distributed", "profiling", "integrations", "train")

setup(
    name="moela",
    version="0.1.0",
    description="Readable references and fast Triton kernels for DeepSeek-V3-style MoE, MLA and FP8",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["moela", *(f"moela.{name}" for name in SUBPACKAGES), *(f"moela.{name}" for name in NESTED)],
    package_dir={"moela": ".", **{f"moela.{name}": name for name in SUBPACKAGES},
                 **{f"moela.{name}": name.replace(".", "/") for name in NESTED}},
    package_data={"moela.kernels": ["configs/*.json", "configs/README.md"]},
    # triton is left unpinned: torch's CUDA wheels pin the triton they were built with,
    # and a second pin here would fight it. CI's exact versions live in constraints/ci.txt.
    install_requires=[
        "torch>=2.5",
        "triton>=3.2",
        "einops>=0.7",
        "numpy",
        "nvidia-ml-py>=12",
        "safetensors>=0.4",
        "matplotlib>=3.5",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6.100"],
        "dev": ["ruff>=0.5"],
        "hf": ["transformers>=5.0"],  # moela.integrations.hf
    },
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
