"""Serve SmolLM2-135M-Instruct with ``--kv-cache-dtype kitty2`` and ask it one question.

    python -m kitty_vllm.tools.demo [--kv-cache-dtype kitty2] [--port 8765]

Starts ``vllm serve`` on 127.0.0.1 (the model is converted offline from a PyPI wheel on first use,
see kitty_vllm.tools.assets), waits until it is healthy, sends one chat completion through the OpenAI
client, prints vLLM's KV-cache lines and the answer, and stops the server.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from kitty_vllm.tools.assets import smollm2_path

STARTUP_TIMEOUT_S = 600
QUESTION = "In one sentence: why does a smaller KV cache let a server run more requests at once?"


def serve_command(model: Path, kv_cache_dtype: str, port: int) -> list[str]:
    vllm = Path(sys.executable).with_name("vllm")
    command = [str(vllm), "serve", str(model), "--kv-cache-dtype", kv_cache_dtype, "--host", "127.0.0.1",
               "--port", str(port), "--max-model-len", "2048", "--max-num-seqs", "8",
               "--max-num-batched-tokens", "512", "--served-model-name", "smollm2"]
    import torch

    if torch.cuda.is_available():
        command += ["--gpu-memory-utilization", "0.5", "--enforce-eager"]
    else:
        command += ["--dtype", "bfloat16", "--enforce-eager"]
    return command


def wait_healthy(port: int, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"vllm serve was not healthy after {STARTUP_TIMEOUT_S} s; log: {log}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-cache-dtype", default="kitty2")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    model = smollm2_path()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    log = Path(tempfile.mkstemp(prefix="kitty-demo-", suffix=".log")[1])
    print(f"starting vllm serve {model.name} --kv-cache-dtype {args.kv_cache_dtype} (log: {log})", flush=True)
    with open(log, "w") as out:
        server = subprocess.Popen(serve_command(model, args.kv_cache_dtype, args.port), stdout=out,
                                  stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_healthy(args.port, server, log)
        for line in log.read_text().splitlines():
            if re.search(r"KV cache size|Maximum concurrency", line):
                print(line.split("] ", 1)[-1])
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="none")
        reply = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=64,
                                               messages=[{"role": "user", "content": QUESTION}])
        print(f"Q: {QUESTION}\nA: {reply.choices[0].message.content.strip()}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
