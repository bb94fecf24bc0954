from pathlib import Path

from setuptools import setup

TEST_DEPS = ["pytest>=8", "hypothesis>=6.100", "pytest-benchmark>=4"]
INTEGRATIONS = ["matplotlib>=3.7", "tensorboard>=2.14", "wandb>=0.16", "lightning>=2.2", "transformers>=4.40",
                "accelerate>=1.1", "safetensors>=0.4", "tqdm"]
# torch.nn.utils.get_total_norm and clip_grads_with_norm_ (fgs.clip_grad_norm_) are new in torch 2.6.
TORCH = "torch>=2.6"
# The kernels call tl.histogram(..., mask=), new in Triton 3.4; torch wheels before 2.8 pin older Tritons
# (2.6: triton==3.2.0, 2.7: triton==3.3.0), so the kernels also need torch 2.8.
TRITON = ["triton>=3.4", "torch>=2.8"]

setup(
    name="fastgradstats",
    version="0.1.0",
    description="Fused per-layer gradient and parameter statistics for PyTorch, in a few Triton launches",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # typing.Self
    packages=["fastgradstats", "fastgradstats.backends", "fastgradstats.bench", "fastgradstats.integrations",
              "fastgradstats.kernels", "fastgradstats.monitoring", "fastgradstats.trajectory"],
    package_dir={"fastgradstats": "fastgradstats", "fastgradstats.kernels": "kernels"},
    package_data={"fastgradstats.backends": ["native_stats.c"]},
    install_requires=[TORCH, "numpy"],
    extras_require={
        "triton": TRITON,
        "plots": ["matplotlib>=3.7"],
        "dev": [*TRITON, "ruff", *TEST_DEPS, *INTEGRATIONS],
        "all": [*TRITON, *INTEGRATIONS],
    },
    entry_points={"console_scripts": ["fastgradstats=fastgradstats.cli:main"]},
)
