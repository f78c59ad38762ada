"""A bounded soak of ``vllm serve --kv-cache-dtype kitty2``: mixed traffic, aborts, shared prefixes and a
preemption burst, then checks that nothing failed, leaked or changed the greedy output.

    python -m kitty_vllm.tools.soak --requests 2000 --concurrency 64 [--model DIR] [--json report.json] \\
        [-- extra vllm serve arguments]

It starts ``vllm serve`` on 127.0.0.1 (SmolLM2-135M by default, see kitty_vllm.tools.assets) with a KV cache
that holds ``--kv-requests`` requests of ``--max-model-len`` tokens (``--num-gpu-blocks-override``, so
the pool is small on any machine; half the concurrency by default), and drives it with
``--concurrency`` clients. Every prompt is a window of Paul Graham's essays, tokenized by the server;
every request is greedy with ``ignore_eos``, ``max_tokens`` drawn from 1..``--max-output``, prompt
lengths from 1..max_model_len - max_tokens:

* ``abort`` (20%): streams, and disconnects after reading half of its tokens;
* ``prefix`` (10%): one of four long shared prefixes (at least two pages) plus its own suffix, which
  the prefix cache is asked for (under ``exact_prefill`` every lookup misses, see the checks);
* ``stream`` (10%): streams to the end;
* ``plain``: one JSON response;
* ``burst``: when half of the rest have started, requests with prompts of 1..32 tokens and
  ``--max-output`` tokens each, but at least two pages' worth (burst_output), arrive at once, on top of
  the running clients, enough to need twice the pool once they have grown (their staging rings and
  pages grow with every token, over hundreds of steps, so they are running together when the pool runs
  out however the server's threads are scheduled): running
  requests are preempted, and vLLM's ``vllm:num_preemptions`` must rise from the burst's start (vLLM
  counts a preemption when the request resumes, so it is read once every request has finished).

Then every completed request is run again alone, with a fresh ``cache_salt`` so that it recomputes
its prompt instead of reading the pages the soak left in the prefix cache, and the two token sequences
must be equal. That needs a request's output not to depend on how its prompt was split into steps, on
prefix hits or on recomputation after preemption, so the server runs the preset with ``exact_prefill``
on (kitty_vllm.config; ``KITTY_CONFIG`` set to a copy of the config beside the server log, the
``kitty_config`` of the report). Without it, a prefill step's tokens read each other in full
precision; tests/test_vllm_e2e.py compares that mode with the oracle. Both runs return the top-2
logprobs at each position; where they first differ, the divergence is accepted as a near-tie, and
counted as such, only if in both runs the two candidate tokens are within ``--tie-gap`` nats of each
other. Logits come out of the model in its dtype, whose step at typical logit sizes (16..32) is 0.125
in bfloat16 and 0.016 in float16: the default gap is about two such steps (0.25, 0.05); in float32 it
is 1e-3, well above the differences that a batch's summation order makes. ``--verify-budget-s`` bounds this phase (the requests are verified kind by
kind in turn, so each kind is covered).

Checks (exit status 1 if any fails): every request answered 200 (no 5xx, no error); the server stays up;
the burst preempted; the prefix cache was asked and, as ``exact_prefill`` requires, never hit; streams
really were cut midway; every verified output equals its run alone (near-ties aside); once idle, vLLM's
KV-cache usage and kitty's staging blocks held (its log line, kitty_vllm.metrics) are back at 0; the
server's memory (RSS of its process tree, and device memory from nvidia-smi where there is a GPU) grew
by at most ``--max-memory-growth-mib`` between the warm-up and the end of the soak. Every wait is
bounded.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from kitty_vllm.config import CONFIG_FILE_ENV, PRESETS, load_config
from kitty_vllm.layout import StageLayout, stage_layout
from kitty_vllm.metrics import last_logged

KIND_SHARES = {"abort": 0.2, "prefix": 0.1, "stream": 0.1}   # of the requests before the burst; the rest: plain
NUM_PREFIXES = 4
BURST_PROMPT_TOKENS = 32     # burst prompts are 1..this long: their staging rings and pages grow a lot
BURST_OUTPUT_PAGES = 2       # burst outputs are at least this many pages long
TOP_LOGPROBS = 2
ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DEFAULT_TIE_GAP = {"float32": 1e-3, "float16": 0.05, "bfloat16": 0.25}
STARTUP_TIMEOUT_S = 900
DRAIN_TIMEOUT_S = 120
MiB = 1 << 20


# -- the server ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """``vllm serve <model> <args>`` on 127.0.0.1:<free port>, in its own process group, logged to a file.

    Runs vLLM's CLI module with this interpreter, so it works without the ``vllm`` script on PATH.
    Every wait is bounded; every failure message carries the tail of the server log.
    """

    def __init__(self, model: str | os.PathLike, args: list[str], log_path: Path,
                 env: dict[str, str | None] | None = None, python: str | os.PathLike = sys.executable,
                 cwd: str | os.PathLike | None = None):
        """``env`` is laid over os.environ; a value of None removes that variable. ``python`` is the
        interpreter that runs vLLM (this one by default), ``cwd`` its working directory."""
        self.model = str(model)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.cmd = [str(python), "-m", "vllm.entrypoints.cli.main", "serve", self.model,
                    "--host", "127.0.0.1", "--port", str(self.port), *args]
        full_env = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=full_env, cwd=cwd, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def wait_healthy(self, timeout: float) -> float:
        """Poll /health until it answers 200; returns the seconds waited. Fails if the server exits."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} before /health "
                                   f"answered:\n{self.log_tail()}")
            if self.healthy():
                return time.monotonic() - start
            time.sleep(1.0)
        raise TimeoutError(f"vllm serve did not become healthy within {timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def get(self, path: str, timeout: float = 30) -> str:
        with urllib.request.urlopen(f"{self.base_url}{path}", timeout=timeout) as r:
            return r.read().decode()

    def post(self, path: str, payload: dict, timeout: float = 60) -> dict:
        req = urllib.request.Request(f"{self.base_url}{path}", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """Every sample on /metrics as (name, labels, value)."""
        from prometheus_client.parser import text_string_to_metric_families

        return [(s.name, dict(s.labels), s.value)
                for family in text_string_to_metric_families(self.get("/metrics"))
                for s in family.samples]

    def stop(self, grace: float = 20) -> None:
        """SIGTERM the whole process group (API server, engine core, workers), SIGKILL after ``grace``."""
        try:
            if self.proc.poll() is None:
                _signal_group(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            # Children (engine core, workers) may outlive the API server: kill whatever is left.
            _signal_group(self.proc.pid, signal.SIGKILL)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        finally:
            self._log.close()


def metric(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``; fails if there are none."""
    matches = [v for n, l, v in samples if n == name and all(l.get(k) == x for k, x in labels.items())]
    if not matches:
        names = sorted({n for n, _, _ in samples if n.startswith("vllm:")})
        raise KeyError(f"no metric {name} {labels or ''} on /metrics; vllm metrics are: {names}")
    return sum(matches)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def server_rss_bytes(server: VllmServer) -> int:
    """Resident memory of the server's process tree (API server, engine core, workers)."""
    import psutil

    root = psutil.Process(server.proc.pid)
    total = 0
    for proc in (root, *root.children(recursive=True)):
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def device_memory_bytes() -> int | None:
    """Device memory in use on all GPUs (nvidia-smi), or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(int(line) for line in out.split()) * MiB


# -- the workload ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SoakRequest:
    index: int
    kind: str               # abort, prefix, stream, plain or burst
    prompt: tuple[int, ...]
    max_tokens: int


def burst_output(max_output: int, page_size: int) -> int:
    """The output length of every burst request."""
    return max(max_output, BURST_OUTPUT_PAGES * page_size)


def build_workload(corpus: list[int], num_requests: int, max_model_len: int, max_output: int,
                   burst: int, page_size: int, rng: random.Random) -> list[SoakRequest]:
    """``num_requests`` requests in arrival order, the last ``burst`` of them the burst: short prompts
    and burst_output tokens each."""
    if max_model_len < 2 * page_size + max_output + 1:
        raise ValueError(f"--max-model-len {max_model_len} leaves no room for a shared prefix of two "
                         f"{page_size}-token pages and {max_output} output tokens")
    if max_model_len < BURST_PROMPT_TOKENS + burst_output(max_output, page_size):
        raise ValueError(f"--max-model-len {max_model_len} leaves no room for a burst request of "
                         f"{BURST_PROMPT_TOKENS} + {burst_output(max_output, page_size)} tokens")
    if burst >= num_requests:
        raise ValueError(f"{num_requests} requests leave none beside a burst of {burst}")
    if len(corpus) < 2 * max_model_len:
        raise ValueError(f"the prompt corpus has {len(corpus)} tokens; need {2 * max_model_len}")

    def window(length: int) -> tuple[int, ...]:
        start = rng.randrange(len(corpus) - length)
        return tuple(corpus[start:start + length])

    prefix_room = max_model_len - max_output - 1
    prefixes = [window(rng.randint(2 * page_size, prefix_room)) for _ in range(NUM_PREFIXES)]
    regular = num_requests - burst
    counts = {kind: round(share * regular) for kind, share in KIND_SHARES.items()}
    kinds = [kind for kind, n in counts.items() for _ in range(n)]
    kinds += ["plain"] * (regular - len(kinds))
    rng.shuffle(kinds)
    requests = []
    for index, kind in enumerate(kinds):
        max_tokens = rng.randint(2 if kind == "abort" else 1, max_output)
        if kind == "prefix":
            prefix = rng.choice(prefixes)
            suffix = rng.randint(1, max_model_len - max_tokens - len(prefix))
            prompt = prefix + window(suffix)
        else:
            prompt = window(rng.randint(1, max_model_len - max_tokens))
        requests.append(SoakRequest(index, kind, prompt, max_tokens))
    for index in range(regular, num_requests):
        prompt = window(rng.randint(1, BURST_PROMPT_TOKENS))
        requests.append(SoakRequest(index, "burst", prompt, burst_output(max_output, page_size)))
    return requests


# -- one request -----------------------------------------------------------------------------------

@dataclass
class Completion:
    """What one request returned: token ids and each position's top logprobs {token id: logprob}."""

    status: int | None = None          # HTTP status; None if the connection failed
    error: str = ""
    tokens: list[int] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finished: bool = False              # the server sent a finish_reason


def complete(base_url: str, model: str, request: SoakRequest, *, stream: bool,
             read_tokens: int | None = None, cache_salt: str | None = None,
             timeout: float = 600) -> Completion:
    """POST /v1/completions; with ``read_tokens``, disconnect once that many tokens have arrived."""
    host, port = base_url.removeprefix("http://").split(":")
    body = {"model": model, "prompt": list(request.prompt), "max_tokens": request.max_tokens,
            "temperature": 0, "ignore_eos": True, "logprobs": TOP_LOGPROBS,
            "return_tokens_as_token_ids": True, "stream": stream}
    if cache_salt:
        body["cache_salt"] = cache_salt
    result = Completion()
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        result.status = response.status
        if response.status != 200:
            result.error = response.read().decode(errors="replace")[:500]
        elif not stream:
            _add_choice(result, json.loads(response.read())["choices"][0])
        else:
            while not result.finished and (read_tokens is None or len(result.tokens) < read_tokens):
                line = response.readline()
                if not line:
                    result.error = "stream ended without a finish_reason"
                    break
                line = line.strip()
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    _add_choice(result, json.loads(line[6:])["choices"][0])
    except (OSError, http.client.HTTPException, ValueError, LookupError) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()        # midway through a stream: the server sees the client go and aborts
    return result


def _add_choice(result: Completion, choice: dict) -> None:
    logprobs = choice.get("logprobs") or {}
    result.tokens += [_token_id(t) for t in logprobs.get("tokens") or ()]
    result.top_logprobs += [{_token_id(t): lp for t, lp in top.items()}
                            for top in logprobs.get("top_logprobs") or ()]
    result.finished = choice.get("finish_reason") is not None


def _token_id(token: str) -> int:
    return int(token.removeprefix("token_id:"))   # return_tokens_as_token_ids


# -- greedy comparison -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    verdict: str                 # match, near_tie, mismatch or alone_failed
    position: int | None = None  # where the two outputs first differ
    gap: float | None = None     # there: the larger of the two runs' logprob gaps between the two
                                 # candidates (None: one run did not have the other in its top 2)
    drift: float = 0.0           # largest |logprob| difference of the chosen token where they agree


def compare(soak: Completion, alone: Completion, tie_gap: float) -> Comparison:
    drift = 0.0
    for i, (a, b) in enumerate(zip(soak.tokens, alone.tokens)):
        soak_top, alone_top = soak.top_logprobs[i], alone.top_logprobs[i]
        if a == b:
            drift = max(drift, abs(soak_top[a] - alone_top[a]))
            continue
        if b not in soak_top or a not in alone_top:
            return Comparison("mismatch", i, None, drift)
        gap = max(soak_top[a] - soak_top[b], alone_top[b] - alone_top[a])
        return Comparison("near_tie" if gap <= tie_gap else "mismatch", i, gap, drift)
    if len(soak.tokens) != len(alone.tokens):
        return Comparison("mismatch", min(len(soak.tokens), len(alone.tokens)), None, drift)
    return Comparison("match", drift=drift)


# -- the run ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KVPool:
    """vLLM's block pool under kitty for one model: one block spans every layer, and a request holds
    its packed pages plus its staging blocks (kitty_vllm.layout)."""

    stage: StageLayout
    num_layers: int

    @classmethod
    def for_model(cls, model_dir: Path, preset: str, dtype: str) -> KVPool:
        """From the model's config.json."""
        config = json.loads((Path(model_dir) / "config.json").read_text())
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        num_kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
        stage = stage_layout(load_config(preset), head_dim, num_kv_heads, ELEMENT_BYTES[dtype])
        return cls(stage, config["num_hidden_layers"])

    def blocks_held(self, num_tokens: int) -> int:
        return -(-num_tokens // self.stage.page.page_size) + self.stage.blocks_needed(num_tokens)

    def num_bytes(self, num_blocks: int) -> int:
        return num_blocks * self.stage.block_bytes * self.num_layers


def essay_tokens(server: VllmServer, model: str, max_tokens: int) -> list[int]:
    """Paul Graham's essays as token ids, tokenized by the server, a paragraph batch at a time."""
    from kitty_vllm.tools.assets import paul_graham_text

    tokens: list[int] = []
    paragraphs = paul_graham_text().split("\n\n")
    for start in range(0, len(paragraphs), 8):
        text = "\n\n".join(paragraphs[start:start + 8]) + "\n\n"
        tokens += server.post("/tokenize", {"model": model, "prompt": text,
                                            "add_special_tokens": False})["tokens"]
        if len(tokens) >= max_tokens:
            break
    return tokens


def wait_idle(server: VllmServer, timeout: float) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and no KV block is in use; the last readings."""
    names = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting")
    deadline = time.monotonic() + timeout
    while True:
        samples = server.metrics()
        state = {name: metric(samples, name) for name in names}
        if not any(state.values()) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def wait_staging_released(server: VllmServer, timeout: float) -> tuple[int, int] | None:
    """The last kitty log line's (staging blocks held, pages packed), once it reads 0 blocks or at
    ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        logged = last_logged(server.log())
        if (logged and logged[0] == 0) or time.monotonic() > deadline:
            return logged
        time.sleep(0.5)


class Progress:
    """Counts finished requests; prints a line to stderr every tenth of the run."""

    def __init__(self, total: int):
        self.total, self.done, self.failed = total, 0, 0
        self.start = time.monotonic()
        self._lock = threading.Lock()

    def finished(self, result: Completion) -> None:
        with self._lock:
            self.done += 1
            self.failed += result.status != 200 or bool(result.error)
            if self.done % max(1, self.total // 10) == 0 or self.done == self.total:
                say(f"{self.done}/{self.total} requests done, {self.failed} failed, "
                    f"{time.monotonic() - self.start:.0f} s")


def say(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


def counters(server: VllmServer) -> dict[str, float]:
    samples = server.metrics()
    names = ("vllm:num_preemptions_total", "vllm:prefix_cache_queries_total",
             "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total")
    return {name.removeprefix("vllm:").removesuffix("_total"): metric(samples, name) for name in names}


def memory(server: VllmServer) -> dict[str, int | None]:
    return {"rss_bytes": server_rss_bytes(server), "device_bytes": device_memory_bytes()}


def soak(server: VllmServer, model: str, requests: list[SoakRequest], concurrency: int,
         timeout: float) -> tuple[dict[int, Completion], float]:
    """Run ``requests``: the regular ones through ``concurrency`` clients, the burst all at once when
    half of the regular ones have started. Returns the results and the preemptions from the burst's
    start on."""
    regular = [r for r in requests if r.kind != "burst"]
    burst = [r for r in requests if r.kind == "burst"]
    progress = Progress(len(requests))
    results: dict[int, Completion] = {}
    slots = threading.Semaphore(concurrency)

    def drive(request: SoakRequest, release: bool) -> None:
        try:
            if request.kind == "abort":
                result = complete(server.base_url, model, request, stream=True,
                                  read_tokens=request.max_tokens // 2, timeout=timeout)
            else:
                result = complete(server.base_url, model, request, stream=request.kind == "stream",
                                  timeout=timeout)
            results[request.index] = result
            progress.finished(result)
        finally:
            if release:
                slots.release()

    with ThreadPoolExecutor(concurrency, "soak") as pool, \
            ThreadPoolExecutor(max(1, len(burst)), "burst") as burst_pool:
        burst_futures = []
        for position, request in enumerate(regular):
            if position == len(regular) // 2:
                preemptions_before = counters(server)["num_preemptions"]
                say(f"burst: {len(burst)} requests at once")
                burst_futures = [burst_pool.submit(drive, r, False) for r in burst]
            slots.acquire()
            pool.submit(drive, request, True)
        wait(burst_futures)
    # vLLM counts a preemption when the preempted request next produces output (the event rides on it),
    # which may be after the burst's own requests have finished: read the counter once all have.
    burst_preemptions = counters(server)["num_preemptions"] - preemptions_before
    return results, burst_preemptions


def completed_requests(requests: list[SoakRequest], results: dict[int, Completion]) -> list[SoakRequest]:
    """The requests that ran to their end without error (what can be compared with a run alone)."""
    return [r for r in requests
            if r.index in results and results[r.index].finished and not results[r.index].error]


def verify(server: VllmServer, model: str, requests: list[SoakRequest], results: dict[int, Completion],
           tie_gap: float, budget_s: float | None, timeout: float) -> dict[int, Comparison]:
    """Run each completed request alone and compare; the kinds take turns until ``budget_s`` is spent."""
    completed = completed_requests(requests, results)
    by_kind = [[r for r in completed if r.kind == kind] for kind in sorted({r.kind for r in completed})]
    order = [r for turn in itertools.zip_longest(*by_kind) for r in turn if r is not None]
    comparisons: dict[int, Comparison] = {}
    start = time.monotonic()
    for request in order:
        if budget_s is not None and time.monotonic() - start > budget_s:
            break
        alone = complete(server.base_url, model, request, stream=False,
                         cache_salt=f"alone-{request.index}", timeout=timeout)
        comparisons[request.index] = (compare(results[request.index], alone, tie_gap)
                                      if alone.status == 200 and not alone.error
                                      else Comparison("alone_failed"))
        if len(comparisons) % max(1, len(order) // 10) == 0:
            say(f"verified {len(comparisons)}/{len(order)} alone, {time.monotonic() - start:.0f} s")
    return comparisons


@dataclass
class SoakOptions:
    model: str
    requests: int = 200
    concurrency: int = 16
    max_model_len: int = 1024
    max_output: int = 256
    kv_requests: int | None = None        # None: concurrency // 2
    preset: str = "kitty2"
    dtype: str = "bfloat16"
    tie_gap: float | None = None          # None: DEFAULT_TIE_GAP[dtype]
    verify_budget_s: float | None = None  # None: verify every completed request
    max_memory_growth_mib: float = 256
    request_timeout_s: float = 600
    seed: int = 0
    log_interval_s: float = 2
    serve_args: list[str] = field(default_factory=list)


def run(options: SoakOptions, log_path: Path) -> dict:
    """Start the server, soak it, verify, check; the report as a JSON-ready dict."""
    config = load_config(options.preset).replace(exact_prefill=True)   # see the module docstring
    config_file = config.to_yaml(log_path.with_suffix(".kitty.yaml"))
    page_size = config.page_size
    pool = KVPool.for_model(Path(options.model), options.preset, options.dtype)
    kv_requests = options.kv_requests or max(1, options.concurrency // 2)
    blocks = kv_requests * pool.blocks_held(options.max_model_len) + 1   # + vLLM's null block
    # Twice the pool, counted at full length: more than fits once the admitted ones have grown.
    burst_tokens = BURST_PROMPT_TOKENS + burst_output(options.max_output, page_size)
    burst = -(-2 * blocks // pool.blocks_held(burst_tokens))
    # Both: the block count is exact, and the byte budget keeps vLLM from reserving a fraction of
    # the machine (on the CPU, of its RAM) for a pool this small.
    args = ["--kv-cache-dtype", options.preset, "--dtype", options.dtype,
            "--max-model-len", str(options.max_model_len),
            "--max-num-seqs", str(options.concurrency + burst),
            "--num-gpu-blocks-override", str(blocks), "--kv-cache-memory-bytes", str(pool.num_bytes(blocks)),
            "--served-model-name", "soak", *options.serve_args]
    report: dict = {"options": dataclasses.asdict(options), "kv_requests": kv_requests,
                    "kv_blocks": blocks, "burst": burst,
                    "burst_output": burst_output(options.max_output, page_size), "log": str(log_path),
                    "kitty_config": str(config_file)}
    tie_gap = options.tie_gap if options.tie_gap is not None else DEFAULT_TIE_GAP[options.dtype]
    server = VllmServer(options.model, args, log_path, env={
        "VLLM_LOG_STATS_INTERVAL": str(options.log_interval_s), CONFIG_FILE_ENV: str(config_file)})
    try:
        report["phase"] = "startup"
        say(f"starting vllm serve ({log_path})")
        report["startup_s"] = server.wait_healthy(STARTUP_TIMEOUT_S)
        report["startup_lines"] = [line.split("] ", 1)[-1] for line in server.log().splitlines()
                                   if "KV cache size" in line or "Maximum concurrency" in line]
        corpus = essay_tokens(server, "soak", 64 * options.max_model_len)
        workload = build_workload(corpus, options.requests, options.max_model_len, options.max_output,
                                  burst, page_size, random.Random(options.seed))
        warm_up = SoakRequest(-1, "plain", tuple(corpus[:page_size + 1]), 4)
        if complete(server.base_url, "soak", warm_up, stream=False).status != 200:
            raise RuntimeError(f"the warm-up request failed:\n{server.log_tail()}")
        wait_idle(server, DRAIN_TIMEOUT_S)
        report["memory_before"] = memory(server)
        start_counters = counters(server)

        report["phase"] = "soak"
        say(f"soak: {len(workload)} requests, concurrency {options.concurrency}, "
            f"KV pool of {blocks} blocks ({kv_requests} requests of {options.max_model_len} tokens)")
        start = time.monotonic()
        results, report["burst_preemptions"] = soak(server, "soak", workload, options.concurrency,
                                                    options.request_timeout_s)
        report["soak_s"] = time.monotonic() - start
        report["requests"] = summarize(workload, results)
        report["idle_after_soak"] = wait_idle(server, DRAIN_TIMEOUT_S)
        report["counters"] = {k: v - start_counters[k] for k, v in counters(server).items()}
        report["staging_after_soak"] = wait_staging_released(server, 5 * options.log_interval_s + 10)
        report["memory_after"] = memory(server)

        report["phase"] = "verification"
        say("verifying: each completed request alone")
        start = time.monotonic()
        comparisons = verify(server, "soak", workload, results, tie_gap, options.verify_budget_s,
                             options.request_timeout_s)
        report["verify_s"] = time.monotonic() - start
        report["verification"] = summarize_comparisons(workload, results, comparisons, tie_gap)
        report["idle_at_end"] = wait_idle(server, DRAIN_TIMEOUT_S)
        report["staging_at_end"] = wait_staging_released(server, 5 * options.log_interval_s + 10)
        report["server_alive"] = server.proc.poll() is None and server.healthy()
    except (OSError, RuntimeError) as e:      # the server died or hung: report what happened
        report["fatal"] = f"during the {report['phase']}: {type(e).__name__}: {e}"
        report["log_tail"] = server.log_tail(40)
    finally:
        server.stop()
    report["checks"] = checks(report, options)
    return report


def summarize(workload: list[SoakRequest], results: dict[int, Completion]) -> dict:
    by_kind: dict[str, Counter] = {}
    statuses: Counter = Counter()
    errors = []
    for request in workload:
        result = results.get(request.index, Completion(error="not run"))
        statuses[str(result.status)] += 1
        kind = by_kind.setdefault(request.kind, Counter())
        kind["requests"] += 1
        kind["prompt_tokens"] += len(request.prompt)
        kind["output_tokens"] += len(result.tokens)
        if result.status != 200 or result.error:
            kind["failed"] += 1
            errors.append(f"#{request.index} {request.kind}: {result.status} {result.error}")
        elif request.kind == "abort":
            kind["cut_midway" if not result.finished else "finished_before_cut"] += 1
        else:
            kind["completed"] += 1
    return {"by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
            "http_status": dict(statuses), "errors": errors[:20], "num_errors": len(errors)}


def summarize_comparisons(workload: list[SoakRequest], results: dict[int, Completion],
                          comparisons: dict[int, Comparison], tie_gap: float) -> dict:
    kinds = {r.index: r.kind for r in workload}
    verdicts = Counter(c.verdict for c in comparisons.values())
    return {
        "tie_gap": tie_gap,
        "verified": len(comparisons),
        "completed": len(completed_requests(workload, results)),
        "verdicts": dict(verdicts),
        "max_drift": max((c.drift for c in comparisons.values()), default=0.0),
        "divergences": [{"index": i, "kind": kinds[i], **dataclasses.asdict(c)}
                        for i, c in sorted(comparisons.items()) if c.verdict != "match"],
    }


def checks(report: dict, options: SoakOptions) -> list[dict]:
    if "fatal" in report:
        return [{"check": "the soak ran to its end", "passed": False, "detail": report["fatal"]}]
    requests, counters_ = report["requests"], report["counters"]
    statuses = requests["http_status"]
    five_xx = sum(n for status, n in statuses.items() if status.startswith("5"))
    aborts = requests["by_kind"].get("abort", {})
    verification = report["verification"]
    growth = {k: (report["memory_after"][k] - report["memory_before"][k]) / MiB
              for k in ("rss_bytes", "device_bytes") if report["memory_before"][k] is not None}
    staging = report["staging_after_soak"], report["staging_at_end"]
    rows = [
        ("no 5xx", five_xx == 0, f"{five_xx} responses 5xx"),
        ("every request answered 200", requests["num_errors"] == 0,
         f"{requests['num_errors']} failed; HTTP statuses {statuses}"),
        ("server up at the end", report["server_alive"], "process alive and /health 200"),
        ("the burst preempted", report["burst_preemptions"] > 0,
         f"{report['burst_preemptions']:g} preemptions from the burst on, "
         f"{counters_['num_preemptions']:g} in all"),
        # exact_prefill turns prefix-cache lookups off (kitty_vllm.block_manager): a hit would skip the
        # window of full-precision tokens that its prompt's queries read, which is private to a request.
        ("prefix-cache lookups miss under exact_prefill",
         counters_["prefix_cache_queries"] > 0 and counters_["prefix_cache_hits"] == 0,
         f"{counters_['prefix_cache_hits']:g} of {counters_['prefix_cache_queries']:g} tokens hit"),
        ("streams cut midway", aborts.get("cut_midway", 0) > 0,
         f"{aborts.get('cut_midway', 0)} cut, {aborts.get('finished_before_cut', 0)} finished first"),
        ("greedy output equals the run alone",
         set(verification["verdicts"]) <= {"match", "near_tie"} and verification["verified"] > 0,
         f"{verification['verified']} of {verification['completed']} completed verified: "
         f"{verification['verdicts']}, near-tie gap <= {verification['tie_gap']:g}"),
        ("KV cache released", not any(report["idle_after_soak"].values())
         and not any(report["idle_at_end"].values()),
         f"after soak {report['idle_after_soak']}, at end {report['idle_at_end']}"),
        ("staging blocks released", all(s is not None and s[0] == 0 for s in staging),
         f"kitty log line (staging blocks, pages packed): after soak {staging[0]}, at end {staging[1]}"),
        ("memory flat", all(g <= options.max_memory_growth_mib for g in growth.values()),
         ", ".join(f"{k} {g:+.0f} MiB" for k, g in growth.items())
         + f" (limit {options.max_memory_growth_mib:g} MiB)"),
    ]
    return [{"check": name, "passed": bool(ok), "detail": detail} for name, ok, detail in rows]


def format_report(report: dict) -> str:
    """The report as markdown."""
    o = report["options"]
    lines = [f"## kitty soak: {o['requests']} requests, concurrency {o['concurrency']}, "
             f"--kv-cache-dtype {o['preset']}", ""]
    if "fatal" in report:
        return "\n".join([*lines, f"**The soak stopped: {report['fatal']}**", "",
                          f"Server log ({report['log']}), last lines:", "```", report["log_tail"], "```"])
    lines += [f"Model `{o['model']}` ({o['dtype']}), max_model_len {o['max_model_len']}, outputs "
              f"1..{o['max_output']}, KV pool {report['kv_blocks']} blocks ({report['kv_requests']} "
              f"requests of max_model_len), burst {report['burst']} of {report['burst_output']} output tokens. "
              f"Startup {report['startup_s']:.0f} s, "
              f"soak {report['soak_s']:.0f} s, verification {report['verify_s']:.0f} s. "
              f"Server log: {report['log']}; kitty config (exact_prefill on): {report['kitty_config']}",
              *(f"vLLM: {line}" for line in report["startup_lines"]),
              "", "| kind | requests | completed | cut midway | finished before cut | failed | "
              "prompt tokens | output tokens |", "|---|---|---|---|---|---|---|---|"]
    for kind, c in report["requests"]["by_kind"].items():
        lines.append(f"| {kind} | {c['requests']} | {c.get('completed', 0)} | {c.get('cut_midway', 0)} "
                     f"| {c.get('finished_before_cut', 0)} | {c.get('failed', 0)} | {c['prompt_tokens']} "
                     f"| {c['output_tokens']} |")
    mem = [report["memory_before"], report["memory_after"]]
    lines += ["", "| memory | before soak | after soak |", "|---|---|---|",
              f"| server RSS (MiB) | {mem[0]['rss_bytes'] / MiB:.0f} | {mem[1]['rss_bytes'] / MiB:.0f} |",
              "| device memory used (MiB) | "
              + " | ".join("n/a" if m["device_bytes"] is None else f"{m['device_bytes'] / MiB:.0f}"
                           for m in mem) + " |"]
    counters_ = report["counters"]
    verification = report["verification"]
    lines += ["", f"Counters over the soak: {', '.join(f'{k} {v:g}' for k, v in counters_.items())}; "
              f"largest logprob drift where outputs agree: {verification['max_drift']:.3g}."]
    for d in verification["divergences"]:
        lines.append(f"- {d['verdict']}: request {d['index']} ({d['kind']}) at token {d['position']}, "
                     f"top-2 gap {d['gap']}")
    lines += ["", "| check | | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'pass' if c['passed'] else '**FAIL**'} | {c['detail']} |"
              for c in report["checks"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Soak vllm serve --kv-cache-dtype kitty2 with mixed traffic, aborts, prefix hits "
                    "and a preemption burst; check outputs, errors and leaks.",
        epilog="Arguments after -- go to vllm serve (e.g. -- --enforce-eager).")
    defaults = SoakOptions(model="")
    parser.add_argument("--model", help="model directory (default: SmolLM2-135M-Instruct, converted "
                                        "offline by kitty_vllm.tools.assets)")
    parser.add_argument("--requests", type=int, default=defaults.requests)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    parser.add_argument("--max-output", type=int, default=defaults.max_output,
                        help="output lengths are drawn from 1..this")
    parser.add_argument("--kv-requests", type=int,
                        help="the KV pool holds this many requests of max-model-len tokens "
                             "(default: concurrency / 2)")
    parser.add_argument("--preset", default=defaults.preset, choices=PRESETS)
    parser.add_argument("--dtype", default=defaults.dtype, choices=sorted(ELEMENT_BYTES))
    parser.add_argument("--tie-gap", type=float, help="near-tie threshold in nats (default by dtype: "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_TIE_GAP.items()) + ")")
    parser.add_argument("--verify-budget-s", type=float,
                        help="stop verifying after this many seconds (default: verify all)")
    parser.add_argument("--max-memory-growth-mib", type=float, default=defaults.max_memory_growth_mib)
    parser.add_argument("--request-timeout-s", type=float, default=defaults.request_timeout_s)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--log-interval-s", type=float, default=defaults.log_interval_s,
                        help="VLLM_LOG_STATS_INTERVAL for the server (kitty's log line)")
    parser.add_argument("--json", type=Path, help="also write the report here as JSON")
    parser.add_argument("--log", type=Path, help="server log file (default: a temporary file)")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.model is None:
        from kitty_vllm.tools.assets import smollm2_path

        args.model = str(smollm2_path())
    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    options = SoakOptions(
        model=args.model, requests=args.requests, concurrency=args.concurrency,
        max_model_len=args.max_model_len, max_output=args.max_output, kv_requests=args.kv_requests,
        preset=args.preset, dtype=args.dtype, tie_gap=args.tie_gap, verify_budget_s=args.verify_budget_s,
        max_memory_growth_mib=args.max_memory_growth_mib, request_timeout_s=args.request_timeout_s,
        seed=args.seed, log_interval_s=args.log_interval_s, serve_args=serve_args)
    log = args.log or Path(tempfile.mkdtemp(prefix="kitty-soak-")) / "serve.log"
    # So that `timeout` (or a job scheduler) still gets a report, and the server is stopped.
    signal.signal(signal.SIGTERM, _interrupted)
    report = run(options, log)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(c["passed"] for c in report["checks"]) else 1


def _interrupted(signum, frame) -> None:
    raise RuntimeError("interrupted by SIGTERM")


if __name__ == "__main__":
    sys.exit(main())
