"""megaflow: online GRPO-family RL for flow-matching video generators."""
from setuptools import find_packages, setup

setup(
    name="megaflow",
    version="0.1.0",
    description="Online RL (GRPO family) for flow-matching video and image generators",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megaflow", "megaflow.*"]) + ["megaflow.kernels", "megaflow.ds_configs"],
    # kernels/ and ds_configs/ stay top-level folders of the repository (where users read them) and
    # are installed inside the package, so a wheel or a non-editable install has them too.
    package_dir={"megaflow.kernels": "kernels", "megaflow.ds_configs": "ds_configs"},
    package_data={"megaflow": ["recipes/*.yaml", "recipes/*.jsonl", "recipes/images/*.png", "models/configs/*.json",
                             "demo/base_model/*.json", "demo/base_model/*/*.json",
                             "demo/base_model/*/*.safetensors"],
                  "megaflow.ds_configs": ["*.json"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        # Upper bounds: the next minor version not tested. megaflow reaches into private parts of
        # these (DeepSpeed's ZeRO-3 parameters, diffusers' Wan attention); tested with deepspeed
        # 0.19.8, diffusers 0.42.1, transformers 5.24.0.
        "deepspeed>=0.19.3,<0.20",
        "diffusers>=0.36,<0.43",
        "transformers>=4.46,<5.25",
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
        # model.attention_backend: the versions diffusers' attention dispatcher accepts. sageattention
        # >= 2.1.1 is not on PyPI (1.x only), so `sage` needs a source build (megaflow.parallel.attention).
        "gpu": ["flash-attn>=2.6.3", "xformers>=0.0.29"],
    },
    entry_points={"console_scripts": ["megaflow=megaflow.cli:main"]},
)
