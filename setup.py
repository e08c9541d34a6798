"""megaflow: online GRPO-family RL for flow-matching video generators."""
from setuptools import find_packages, setup

setup(
    name="megaflow",
    version="0.1.0",
    description="Online RL (GRPO family) for flow-matching video and image generators",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megaflow", "megaflow.*"]) + ["megaflow.kernels"],
    package_dir={"megaflow.kernels": "kernels"},
    package_data={"megaflow": ["recipes/*.yaml", "demo/base_model/*.json", "demo/base_model/*/*.json",
                             "demo/base_model/*/*.safetensors"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19.3",
        "diffusers>=0.36",
        "transformers>=4.46",
        "peft>=0.13",
        "safetensors>=0.4",
        "tensorboard>=2.15",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "Pillow>=10.0",
        "numpy>=1.24",
        "regex",
    ],
    extras_require={
        "test": ["pytest>=8.0", "triton>=3.0"],
        "gpu": ["flash-attn", "xformers"],
    },
    entry_points={"console_scripts": ["megaflow=megaflow.cli:main"]},
)
