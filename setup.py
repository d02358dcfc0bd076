"""Install the insightface-finetune toolkit.

GPU users choose the MXNet build through the ``MXNET_PACKAGE`` environment variable
(``MXNET_PACKAGE=mxnet-cu112 pip install -e .``); the code path is the same for every build.
"""
import os

from setuptools import find_packages, setup

MXNET = os.environ.get("MXNET_PACKAGE", "mxnet") + "==1.9.1"

setup(
    name="insightface-finetune",
    version="0.1.0",
    description="Fine-tune insightface face-recognition checkpoints with MXNet",
    python_requires=">=3.8",
    packages=find_packages(include=["recognition", "recognition.*", "deploy", "deploy.*", "datasets", "datasets.*"]),
    install_requires=[
        MXNET,
        "numpy<1.24",  # mxnet 1.9.1 uses np.bool, removed in numpy 1.24
        "opencv-python<4.12",  # 4.12+ needs numpy>=2
        "gluoncv>=0.10,<0.12",
        "easydict",
        "scikit-learn",
        "matplotlib",
        "tqdm",
        "pillow>=9",  # image sizes from the header, before decoding (recognition/image_header.py)
        # the face service (deploy/server.py); checked with numpy<1.24 on Python 3.11
        "fastapi==0.165.0",
        "uvicorn==0.55.0",
        "python-multipart==0.0.34",
    ],
    extras_require={
        "onnx": ["onnx<1.16", "onnxruntime"],  # mx.onnx imports onnx.mapping, gone in 1.16
        "faiss": ["faiss-cpu==1.7.4"],  # only benchmarks/bench_search.py's faiss rows; search itself is NumPy
        "test": ["pytest", "pytest-timeout", "ruff==0.17.6"],
    },
    entry_points={
        "console_scripts": [
            "ifr-train=recognition.train:cli",
            "ifr-train-softmax=recognition.train_softmax:cli",
            "ifr-train-parall=recognition.train_parall:cli",
            "ifr-launch=recognition.launch:cli",
            "ifr-verify=recognition.verification:cli",
            "ifr-linear-probe=recognition.linear_probe:cli",
            "ifr-advise=recognition.advise:cli",
            "ifr-synth=datasets.synth:cli",
            "ifr-data=datasets.tools:cli",
            "ifr-model-slim=deploy.model_slim:cli",
            "ifr-export-onnx=deploy.export_onnx:cli",
            "ifr-extract=deploy.extract:cli",
            "ifr-compare=deploy.compare:cli",
            "ifr-search=deploy.search:cli",
            "ifr-align=deploy.align:cli",
            "ifr-serve=deploy.server:cli",
        ]
    },
)
