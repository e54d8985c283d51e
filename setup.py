"""aimkern: Triton kernels and a lean causal ViT for autoregressive image pretraining."""
from setuptools import find_packages, setup

# `aimkern.kernels` lives in the top-level `kernels/` folder (only @triton.jit code and launch
# configs); everything else is found under `aimkern/`.
packages = find_packages(include=["aimkern", "aimkern.*"]) + ["aimkern.kernels"]

setup(
    name="aimkern",
    version="0.1.0",
    description="Triton kernels and a lean causal ViT for fast autoregressive (AIM-style) ViT pretraining",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"aimkern.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "timm>=1.0",
        "numpy",
        "scikit-learn",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "bench": ["matplotlib"],
        # Hugging Face integration (aimkern.integrations.transformers: AttentionInterface, transformers 5.x);
        # CI installs it, the README's install line being ".[test,hf]".
        "hf": ["transformers>=5.0"],
    },
    entry_points={"console_scripts": ["aimkern-train=aimkern.train.__main__:main"]},
)
