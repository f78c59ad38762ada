# vLLM 0.26.0's official OpenAI-compatible server with kitty_vllm installed as a plugin. It serves with
# --kv-cache-dtype kitty2 unless the arguments given to `docker run` say otherwise (the last one wins).
#   docker build -t kitty-vllm .
#   docker run --gpus all --ipc=host -p 8000:8000 kitty-vllm Qwen/Qwen3-8B --tensor-parallel-size 2
FROM vllm/vllm-openai:v0.26.0
COPY setup.py /opt/kitty_vllm/
COPY configs /opt/kitty_vllm/configs
COPY kitty_vllm /opt/kitty_vllm/kitty_vllm
# Editable, so the presets in /opt/kitty_vllm/configs stay next to the package; vLLM is already there.
RUN pip install --no-cache-dir --no-deps -e /opt/kitty_vllm
ENTRYPOINT ["vllm", "serve", "--kv-cache-dtype", "kitty2"]
CMD ["Qwen/Qwen3-8B"]
