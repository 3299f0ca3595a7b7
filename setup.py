"""Packaging for ringsync: a Horovod-style data-parallel training library in Python."""
from setuptools import find_packages, setup

setup(
    name="ringsync",
    version="0.1.0",
    description="Hand-written ring all-reduce, tensor fusion and straggler timing over mpi4py",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ringsync", "ringsync.*"]),
    install_requires=["numpy>=1.24", "mpi4py>=4", "scikit-learn>=1.2", "tqdm>=4.60"],
    extras_require={
        # the MPI library itself, from PyPI; leave it out to use a system MPI
        "mpich": ["mpich"],
        "dev": ["pytest>=7", "pytest-mpi>=0.6", "pytest-timeout>=2", "pytest-xdist>=3", "hypothesis>=6", "ruff",
                "ml_dtypes>=0.5"],
        "bf16": ["ml_dtypes>=0.5"],    # bfloat16 arrays (ops.py; NumPy has no bfloat16)
        # CuPy's prebuilt wheel for your CUDA major version (nvidia-smi shows it)
        "gpu": ["cupy-cuda12x"],
        "gpu-cuda11": ["cupy-cuda11x"],
        "gpu-cuda13": ["cupy-cuda13x"],
        "plot": ["matplotlib>=3.6"],   # ringsync-report --plot
    },
    entry_points={"console_scripts": [
        "ringsync-train = ringsync.training.train:main",
        "ringsync-report = ringsync.timing.report:main",
        "ringsync-cluster = ringsync.cluster.cli:main",
        "ringsync-model = ringsync.model.cli:main",
    ]},
)
