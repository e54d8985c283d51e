"""aimkern: Triton kernels and a lean causal ViT for autoregressive image pretraining."""
from setuptools import find_packages, setup

# `aimkern.kernels` is the top-level `kernels/` folder (only @triton.jit code and launch configs), reached
# through the link `aimkern/kernels -> ../kernels`. It is a namespace package: `kernels/` has no
# `__init__.py`, so from the repository root `import kernels` never finds this folder ahead of an installed
# `kernels` distribution (Hugging Face's, a transformers dependency). find_packages skips folders without
# `__init__.py`, hence the explicit name. The editable install serves it through `aimkern/`'s own path, and a
# plain install copies the files behind the link.
packages = find_packages(include=["aimkern", "aimkern.*"]) + ["aimkern.kernels"]

setup(
    name="aimkern",
    version="0.1.0",
    description="Triton kernels and a lean causal ViT for fast autoregressive (AIM-style) ViT pretraining",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    install_requires=[
        # The oldest versions anything tests: torch 2.11 + Triton 3.6 are the GPU machine's (its run is
        # benchmarks/gpu_check.sh), and CI compiles every kernel with Triton 3.6
        # (benchmarks/compile_gate_triton36.sh); CI's full test suite runs the newest (torch 2.14, Triton 3.8).
        "torch>=2.11",
        "triton>=3.6",
        "timm>=1.0",
        "numpy",
        "scikit-learn",
        "tqdm",
        "pillow",
        # WebDataset shards (aimkern.data): ShardWriter / TarWriter and the indexed `wids` reader, which the
        # 1.x releases no longer ship (checked: 1.0.2 has no wids package; 0.2.111 does).
        "webdataset>=0.2.100,<1",
        # JPEG decode with libjpeg-turbo at a DCT scale (aimkern.data.jpeg): binary wheels, no system library.
        "simplejpeg>=1.8",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "bench": ["matplotlib"],
        # Hugging Face integration (aimkern.integrations.transformers: AttentionInterface, transformers 5.x);
        # CI installs it, the README's install line being ".[test,hf]".
        "hf": ["transformers>=5.0", "safetensors>=0.4"],
        # .safetensors checkpoints (CausalViT.from_checkpoint / save_checkpoint) without transformers.
        "safetensors": ["safetensors>=0.4"],
    },
    entry_points={"console_scripts": [
        "aimkern-train=aimkern.train.__main__:main",
        "aimkern-eval=aimkern.eval.__main__:main",
    ]},
)
