"""Package metadata for moe. ``kernels/`` installs as ``moe.kernels``."""

from setuptools import find_packages, setup

setup(
    name="moe",
    version="0.1.0",
    description="A Mixture-of-Experts training framework for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["moe", "moe.*"]) + ["moe.kernels"],
    package_dir={"moe.kernels": "kernels"},
    include_package_data=True,
    # Any torch >= 2.8 (torch._grouped_mm) is kept as installed: a GPU user's CUDA build stays.
    install_requires=["torch>=2.8", "numpy"],
    extras_require={
        "dev": [
            "pytest>=8",
            "hypothesis>=6",
            "scipy>=1.10",
            "ruff",
            "pytest-timeout",
            "transformers>=5",
            "datasets>=2.14",
            "tokenizers>=0.15",
            "triton>=3.6; platform_system == 'Linux'",  # CPU tests run the kernels under TRITON_INTERPRET=1
        ],
        "train": ["hydra-core>=1.3", "wandb", "tqdm", "matplotlib", "safetensors"],
        "data": ["datasets>=2.14", "tokenizers>=0.15", "hydra-core>=1.3", "tqdm"],  # moe-prepare
        "slurm": ["hydra-submitit-launcher>=1.2"],
        "deepspeed": ["deepspeed>=0.19.8,<0.20"],  # moe.train.deepspeed_strategy uses engine internals of 0.19
        "compress": ["scipy>=1.10"],
        "hf": ["transformers>=5", "scipy>=1.10"],
    },
    entry_points={
        "console_scripts": [
            "moe-train=moe.train:main",
            "moe-report=moe.report:main",
            "moe-compress=moe.compress.cli:main",
            "moe-prepare=moe.prepare:main",
            "moe-inspect=moe.inspect:main",
            "moe-generate=moe.generate_cli:main",
            "moe-export=moe.export_cli:main",
            "moe-eval=moe.eval_cli:main",
        ]
    },
)
