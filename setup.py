"""Build script for cnl_ext (pure-Python package; the optional CUDA extension is added in csrc/)."""
from setuptools import find_packages, setup

setup(
    name="cnl_ext",
    version="0.1.0",
    description="Fused Collaborative Neuron Learning (CNL) optimizers for PyTorch, in Triton",
    packages=find_packages(include=["cnl_ext", "cnl_ext.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "experiments": ["transformers>=4.46", "datasets", "accelerate", "gguf", "matplotlib"],
        "test": ["pytest", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["cnl-ext=cnl_ext.cli:main"]},
)
