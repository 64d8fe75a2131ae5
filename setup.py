"""plfusion: vision-transformer backbones, ToMe and multimodal fusion patches for PaddlePaddle."""
from setuptools import find_packages, setup

setup(
    name="plfusion",
    version="0.1.0",
    description="PaddlePaddle vision transformers (ViT/DeiT, T2T-ViT, MiT, Swin, MViTv2) with ToMe, "
                "TokenFusion and GeminiFusion patches",
    packages=find_packages(include=["plfusion", "plfusion.*"]),
    python_requires=">=3.9",
    install_requires=[
        "numpy>=1.23",
        "pyyaml>=6.0",
        "visualdl>=2.5",                 # VisualDL scalars, as PLSC/PaddleSeg users expect
        "opencv-python-headless>=4.7",   # image IO, transforms, visualisations (no GUI on servers)
        "safetensors>=0.4",              # timm / HF weights without torch
        "tqdm>=4.60",                    # progress bars
    ],
    extras_require={
        "cpu": ["paddlepaddle>=3.0"],
        "gpu": ["paddlepaddle-gpu>=3.0"],
        # nbclient/ipykernel execute the notebooks headless in the tests so they cannot rot
        "test": ["pytest>=7", "nbclient>=0.9", "nbformat>=5.9", "ipykernel>=6"],
    },
    entry_points={
        "console_scripts": [
            "plfusion-train=plfusion.engine.cli:train_main",
            "plfusion-eval=plfusion.engine.cli:eval_main",
            "plfusion-export=plfusion.cli:export_main",
            "plfusion-benchmark=plfusion.cli:benchmark_main",
            "plfusion-launch=plfusion.launch:main",
        ],
    },
)
