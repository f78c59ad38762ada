# vLLM 0.26.0's official OpenAI-compatible server with kitty_vllm installed as a plugin.
#   docker build -t kitty-vllm .
#   docker run --gpus all -p 8000:8000 kitty-vllm Qwen/Qwen3-8B --kv-cache-dtype kitty2
FROM vllm/vllm-openai:v0.26.0
COPY . /opt/kitty_vllm
# Editable, so the presets in /opt/kitty_vllm/configs stay next to the package; vLLM is already there.
RUN pip install --no-cache-dir --no-deps -e /opt/kitty_vllm
ENTRYPOINT ["vllm", "serve"]
CMD ["Qwen/Qwen3-8B", "--kv-cache-dtype", "kitty2"]
