"""What the kitty attention kernel compiles to on a GPU architecture, from any machine (no GPU needed).

Runs ``decode_attention`` (or ``prefill_attention``, ``--prefill``) on small CPU tensors of the chosen
shape with its kernel launch intercepted (the Triton kernel's, or with ``--gluon`` the Gluon page
kernel's that decode runs on GPUs, kitty_vllm.kernels.decode_gluon), compiles that launch for
``sm_<arch>`` exactly as Triton's JIT would (the same arguments, the same specialization of pointer
alignment and integer divisibility), with Triton's own ptxas, and reads the cubin back with the nvdisasm
and cuobjdump that ship in Triton's wheel. Prints registers, spills and shared memory, then every loop of the machine code (a backward
branch) with its instruction mix, and the page loop's instructions per token and KV head, summed over
the program's warps.

That count is what a decode step issues: an H100 issues about 132 x 4 x 1.75e9 warp instructions per
second, so a kernel that must stream a page's bytes at a given bandwidth has a matching instruction
budget per token (benchmarks/RESULTS.md). Kernel changes can be weighed here before any device time.

    python benchmarks/kernel_sass.py --preset kitty2 --head-dim 128 --heads 32 8 [--gluon]

Uses Triton 3.6's binder (``triton.runtime.jit.create_function_from_signature``), as its JIT does.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("kernel_sass compiles for a GPU: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.backends.nvidia  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from kitty_vllm.config import PRESETS, KittyConfig  # noqa: E402
from kitty_vllm.kernels import attention, decode_gluon  # noqa: E402
from kitty_vllm.layout import stage_layout  # noqa: E402

TOOLS = Path(triton.backends.nvidia.__file__).parent / "bin"
# Instruction classes of the loop table: SASS opcode prefixes.
CLASSES = {"tensor": ("HMMA", "HGMMA"), "exp": ("MUFU",), "global": ("LDG", "STG", "LDGSTS"),
           "shared": ("LDS", "STS", "LDSM", "STSM"), "sync": ("BAR", "DEPBAR", "LDGDEPBAR"),
           "shuffle": ("SHFL",), "move": ("MOV", "IMAD.MOV"), "spill": ("LDL", "STL")}


@dataclass
class Loop:
    first: int              # index of the loop's first instruction
    last: int               # index of its backward branch
    opcodes: list[str]

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def contains(self, other: Loop) -> bool:
        return self is not other and self.first <= other.first and other.last <= self.last

    def mix(self) -> dict[str, int]:
        counts = collections.Counter()
        for op in self.opcodes:
            name = next((c for c, prefixes in CLASSES.items() if op.startswith(prefixes)), "other")
            counts[name] += 1
        return {c: counts[c] for c in (*CLASSES, "other")}

    def bf16_tensor_ops(self) -> int:
        return sum(op.startswith(CLASSES["tensor"]) and op.endswith(".BF16") for op in self.opcodes)


def intercepted_launch(config: KittyConfig, head_dim: int, num_heads: int, num_kv_heads: int,
                       batch: int, pages: int, new_tokens: int = 0, gluon: bool = False) -> tuple[tuple, dict]:
    """The (args, kwargs) that decode_attention (``new_tokens`` 0: ``batch`` requests of ``pages`` packed
    pages each) or prefill_attention (``new_tokens`` of one request after ``pages`` packed pages, as
    ``exact_prefill`` runs it) passes to _attention_kernel, or with ``gluon`` that decode_attention
    passes to decode_gluon.page_decode_kernel as on a GPU, on CPU tensors (nothing runs)."""
    layout = stage_layout(config, head_dim, num_kv_heads, 2)
    context = pages * config.page_size
    if new_tokens:
        batch, pages = 1, -(-(context + new_tokens) // config.page_size)
    packed = torch.zeros(batch * pages, num_kv_heads, layout.page.page_bytes, dtype=torch.uint8)
    stage = torch.zeros(batch * layout.blocks_per_request, 2, layout.tokens_per_block, num_kv_heads, head_dim,
                        dtype=torch.bfloat16)
    page_table = torch.arange(batch * pages, dtype=torch.int32).view(batch, pages)
    stage_table = torch.arange(len(stage), dtype=torch.int32).view(batch, -1)
    query = torch.zeros(max(batch, new_tokens), num_heads, head_dim, dtype=torch.bfloat16)
    if new_tokens:
        key = torch.zeros(new_tokens, num_kv_heads, head_dim, dtype=torch.bfloat16)
        blocks = attention.prefill_blocks([(0, 0, new_tokens, context)], config.page_size, num_heads, num_kv_heads)
        call = functools.partial(attention.prefill_attention, query, key, key, packed, stage, page_table,
                                 stage_table, blocks, config, layout, head_dim ** -0.5)
    else:
        seq_lens = torch.full((batch,), context, dtype=torch.int32)
        call = functools.partial(attention.decode_attention, query, packed, stage, page_table, stage_table,
                                 seq_lens, config, layout, head_dim ** -0.5)
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((args, kwargs))

    kernels = (attention._attention_kernel, attention._merge_splits_kernel, decode_gluon.page_decode_kernel,
               decode_gluon.supported)
    attention._attention_kernel = attention._merge_splits_kernel = decode_gluon.page_decode_kernel = Recorder()
    decode_gluon.supported = lambda *args: gluon
    try:
        call()
    finally:
        (attention._attention_kernel, attention._merge_splits_kernel, decode_gluon.page_decode_kernel,
         decode_gluon.supported) = kernels
    return launches[0]


def compile_launch(args: tuple, kwargs: dict, arch: int, gluon: bool = False) -> tuple[bytes, int]:
    """The cubin of _attention_kernel (or decode_gluon.page_decode_kernel) for these launch arguments
    on sm_<arch>, and the bytes of shared memory it is launched with."""
    fn, source = (decode_gluon.page_decode_kernel, GluonASTSource) if gluon else (attention._attention_kernel,
                                                                                 ASTSource)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(source(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return compiled.asm["cubin"], compiled.metadata.shared


def resources(cubin: Path) -> dict[str, int]:
    """REG, STACK, SHARED and LOCAL of the kernel (cuobjdump --dump-resource-usage)."""
    text = subprocess.run([TOOLS / "cuobjdump", "--dump-resource-usage", cubin], check=True, capture_output=True,
                          text=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def loops(cubin: Path) -> list[Loop]:
    """Every loop of the machine code: the instructions from a backward branch's target to the branch."""
    text = subprocess.run([TOOLS / "nvdisasm", "-c", cubin], check=True, capture_output=True, text=True).stdout
    labels, opcodes, branches = {}, [], []
    for line in text.splitlines():
        if label := re.match(r"^(\.L_x_\d+):", line):
            labels[label.group(1)] = len(opcodes)
        elif instruction := re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)(.*?);", line):
            opcode, operands = instruction.groups()
            if opcode.startswith("BRA") and (target := re.search(r"\.L_x_\d+", operands)):
                branches.append((len(opcodes), target.group(0)))
            opcodes.append(opcode)
    return [Loop(labels[target], index, opcodes[labels[target]:index + 1])
            for index, target in branches if labels[target] < index]


def page_loops(found: list[Loop]) -> tuple[Loop, list[Loop]] | None:
    """The page loop (the outermost loop with bfloat16 tensor-core ops, mma or, for a warp group on
    Hopper, wgmma, that holds such loops: the full-precision sinks' and ring's loops hold none) and its
    tile loops."""
    packed = [loop for loop in found if loop.bf16_tensor_ops()]
    outer = [loop for loop in packed if not any(other.contains(loop) for other in packed)
             and any(loop.contains(other) for other in packed)]
    if len(outer) != 1:
        return None
    return outer[0], [loop for loop in packed if outer[0].contains(loop)]


def page_loop_cost(found: list[Loop], constants: dict, num_warps: int) -> float | None:
    """Warp instructions per token and KV head of the decode page loop, its tile loop (if any) counted
    PAGE_SIZE / TILE times."""
    if (page_and_tiles := page_loops(found)) is None:
        return None
    page, inner = page_and_tiles
    tiles = constants["PAGE_SIZE"] // constants["TILE"]
    per_page = page.size + sum(loop.size * (tiles - 1) for loop in inner)
    return per_page * num_warps / constants["PAGE_SIZE"]


def analyze(preset: str = "kitty2", head_dim: int = 128, num_heads: int = 32, num_kv_heads: int = 8,
            batch: int = 64, pages: int = 64, arch: int = 90, new_tokens: int = 0, gluon: bool = False) -> dict:
    config = KittyConfig.from_preset(preset)
    args, kwargs = intercepted_launch(config, head_dim, num_heads, num_kv_heads, batch, pages, new_tokens, gluon)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "attention.cubin"
        binary, shared = compile_launch(args, kwargs, arch, gluon)
        cubin.write_bytes(binary)
        usage, found = {**resources(cubin), "launch SHARED": shared}, loops(cubin)
    constants = {k: v for k, v in kwargs.items() if k.isupper()}
    return {"resources": usage, "loops": found, "constants": constants,
            "page_loop_per_token": page_loop_cost(found, constants, kwargs["num_warps"]),
            "num_warps": kwargs["num_warps"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="kitty2", choices=PRESETS)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("QUERY", "KV"))
    parser.add_argument("--batch", type=int, default=64, help="decode requests (small batches split their pages)")
    parser.add_argument("--pages", type=int, default=64, help="packed pages of each request before the step")
    parser.add_argument("--prefill", type=int, default=0, metavar="TOKENS",
                        help="compile the prefill launch of one request's TOKENS new tokens instead of decode")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--gluon", action="store_true",
                        help="compile the Gluon page kernel that decode runs on GPUs (kitty_vllm.kernels.decode_gluon)")
    args = parser.parse_args(argv)
    if args.gluon and args.prefill:
        parser.error("--gluon compiles the decode page kernel; it has no prefill")
    result = analyze(args.preset, args.head_dim, *args.heads, args.batch, args.pages, args.arch, args.prefill,
                     args.gluon)
    c = result["constants"]
    if args.gluon:
        launch = f"Gluon decode page kernel ({c['STAGES']} copy stages)"
    elif args.prefill:
        launch = f"prefill kernel ({c['ROWS'] // c['GROUP_ROWS']} positions x {c['GROUP_ROWS']} heads per program)"
    else:
        launch = "decode kernel, " + ("split-K" if c["SPLIT"] else "one program per request")
    rows = "" if args.gluon else f", {c['ROWS']} rows"
    print(f"{launch}, {args.preset}, head_dim {args.head_dim}, {args.heads[0]}/{args.heads[1]} heads, "
          f"sm_{args.arch}: {result['num_warps']} warps{rows}, tile {c['TILE']} of page {c['PAGE_SIZE']}")
    print(" ".join(f"{k} {v}" for k, v in result["resources"].items()))
    page_and_tiles = page_loops(result["loops"])
    page, tiles = page_and_tiles if page_and_tiles else (None, [])
    header = ["instructions", *CLASSES, "other"]
    print("\n| loop | " + " | ".join(header) + " |\n|---|" + "---|" * len(header))
    for n, loop in enumerate(result["loops"]):
        role = " (page)" if loop is page else " (tile)" if loop in tiles else ""
        print(f"| {n}{role} | {loop.size} | " + " | ".join(str(v) for v in loop.mix().values()) + " |")
    cost = result["page_loop_per_token"]
    if cost is not None:
        print(f"\npage loop: {cost:.1f} warp instructions per cached token and KV head"
              + (", for one program's positions" if args.prefill else ""))


if __name__ == "__main__":
    main()
