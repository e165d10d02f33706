"""simsiam-fast: a SimSiam trainer built around its data pipeline.

Install: ``pip install -e '.[dev]'`` (tests), ``.[dali]`` (NVIDIA DALI), ``.[ffcv]`` (FFCV; needs
``apt-get install pkg-config libturbojpeg0-dev libopencv-dev`` first). NVIDIA apex is never a
requirement: the model uses it only when ``import apex.parallel`` finds NVIDIA's package.
"""
from setuptools import find_packages, setup

setup(
    name="simsiam-fast",
    version="0.1.0",
    description="SimSiam self-supervised pre-training with fast DALI / FFCV / torch two-view pipelines",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "model", "model.*", "bench", "bench.*"]),
    py_modules=["train", "linear_eval", "knn_eval"],
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "numpy",
        "pillow",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "psutil",
        "webdataset==1.0.2",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130==2.4.0"],
        "ffcv": ["ffcv==1.0.2"],
        "profile": ["torch-tb-profiler==0.4.3"],
        "dev": ["pytest", "scikit-learn", "scipy", "torch-tb-profiler==0.4.3"],
    },
)
