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
        # Paddle 3.x GPU wheels are only on Paddle's own index, one per CUDA version (README, section GPU),
        # so pip cannot resolve paddlepaddle-gpu>=3.0 here: install Paddle first, then `.[gpu]`, which adds
        # what plfusion-env reads the NVIDIA driver with (nvidia-smi is the fallback).
        "gpu": ["nvidia-ml-py>=12"],
        # export --onnx and the onnxruntime engine (tested: paddle2onnx 2.1, which converts Paddle 3's PIR
        # .json models, and onnxruntime 1.32)
        "onnx": ["paddle2onnx>=2.1", "onnxruntime>=1.20"],
        # nbclient/ipykernel execute the notebooks headless in the tests so they cannot rot; the ONNX
        # packages are here too because the tests (and so CI) run the ONNX export and engine
        "test": ["pytest>=7", "nbclient>=0.9", "nbformat>=5.9", "ipykernel>=6", "paddle2onnx>=2.1",
                 "onnxruntime>=1.20"],
    },
    entry_points={
        "console_scripts": [
            "plfusion-train=plfusion.engine.cli:train_main",
            "plfusion-eval=plfusion.engine.cli:eval_main",
            "plfusion-export=plfusion.cli:export_main",
            "plfusion-benchmark=plfusion.cli:benchmark_main",
            "plfusion-launch=plfusion.launch:main",
            "plfusion-env=plfusion.env:main",
        ],
    },
)
