# vLLM 0.32.0's official OpenAI-compatible server with kitty_vllm installed as a plugin. It serves with
# --kv-cache-dtype kitty2 unless the arguments given to `docker run` say otherwise (the last one wins).
#   docker build -t kitty-vllm .
#   docker run --gpus all --ipc=host -p 8000:8000 kitty-vllm Qwen/Qwen3-8B --tensor-parallel-size 2
FROM vllm/vllm-openai:v0.32.0
COPY pyproject.toml README.md /tmp/kitty_vllm/
COPY kitty_vllm /tmp/kitty_vllm/kitty_vllm
# A plain install (the presets ship inside the package); --no-deps keeps the image's vLLM and torch.
RUN pip install --no-cache-dir --no-deps /tmp/kitty_vllm && rm -rf /tmp/kitty_vllm
ENTRYPOINT ["vllm", "serve", "--kv-cache-dtype", "kitty2"]
CMD ["Qwen/Qwen3-8B"]
