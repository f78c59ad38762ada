"""What users run beside the plugin, never imported by it: the demo, the accuracy evaluation (eval, gsm8k,
needle, and oracle, the transformers simulation of the cache), the soak runner, and the offline assets
(SmolLM2 and Paul Graham's essays from PyPI wheels). Their extra dependencies: ``pip install kitty_vllm[eval]``.
"""
