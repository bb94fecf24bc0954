from pathlib import Path

from setuptools import setup

TEST_DEPS = ["pytest>=8", "hypothesis>=6.100", "pytest-benchmark>=4"]
INTEGRATIONS = ["matplotlib>=3.7", "tensorboard>=2.14", "wandb>=0.16", "lightning>=2.2", "transformers>=4.40",
                "accelerate>=1.1", "safetensors>=0.4", "tqdm"]

setup(
    name="fastgradstats",
    version="0.1.0",
    description="Fused per-layer gradient and parameter statistics for PyTorch, in a few Triton launches",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastgradstats", "fastgradstats.integrations", "fastgradstats.kernels"],
    package_dir={"fastgradstats": "fastgradstats", "fastgradstats.kernels": "kernels"},
    package_data={"fastgradstats": ["native_stats.c"]},
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton>=3.3"],
        "plots": ["matplotlib>=3.7"],
        "dev": ["triton>=3.3", "ruff", *TEST_DEPS, *INTEGRATIONS],
        "all": ["triton>=3.3", *INTEGRATIONS],
    },
    entry_points={"console_scripts": ["fastgradstats=fastgradstats.cli:main"]},
)
