"""Compile the tensor-core decode kernel (or, with ``--half2``, the paired-fp16 M = 1 kernel; with
``--kmajor``, the M = 1 kernel over K-major codes; with ``--fragments``, the ``mma.sync`` decode
kernel over codes in fragment order) for Hopper (sm_90) on any machine, GPU or not,
and print what its machine code costs: registers per thread, instructions in the K loop
(``--half2``: in a program), the instruction mix and lane-instructions per weight.

    python3 pipelines/sass_stats.py --bits 4 --block-n 256 --block-c 16 --warps 4 --stages 3 --paired
    python3 pipelines/sass_stats.py --half2 --bits 4 --block-n 512 --block-c 4 --warps 4 --split 128
    python3 pipelines/sass_stats.py --kmajor --bits 3 --block-n 4 --block-c 1 --warps 1
    python3 pipelines/sass_stats.py --fragments --bits 2 --group 64 --block-n 16 --warps 8 --tokens 16

Timings need the GPU; these counts do not, and they bound what a tile can reach: instructions
per weight against the schedulers' issue rate, registers against occupancy, barriers and
shared-memory stores against the layout conversions Triton inserted. Triton's wheel ships
``ptxas``, ``nvdisasm`` and ``cuobjdump``; the numbers in BENCHMARKS.md came from this script.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkout_paths  # noqa: E402,F401 (efficientqat.kernels importable from a bare checkout)
from efficientqat.kernels import fragments, gemv, half2, kmajor  # noqa: E402
from efficientqat.kernels.unpack import unit_constants  # noqa: E402
from efficientqat.packing import chunk_values  # noqa: E402

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
OPCODE = re.compile(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)")
BACK_BRANCH = re.compile(r"BRA .*`\((\.L_x_\d+)\)")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def compile_for_hopper(fn, types: dict[str, str], constants: dict, warps: int, stages: int) -> tuple[str, str]:
    """Resource usage (``cuobjdump``) and SASS text of ``fn`` compiled for sm_90, with argument
    ``types`` and ``constants``; pointers, N, K and the strides that are not constants are marked
    16-divisible, as Triton specialises them at run time."""
    signature = {**types, **{name: "constexpr" for name in constants}}
    signature = {name: signature[name] for name in fn.arg_names}
    names = list(signature)
    aligned = [n for n in names if n.endswith("ptr") or (n.startswith("stride") and n not in constants) or n in ("N", "K")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(TOOLS / "nvdisasm"), "-c", str(path)], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(TOOLS / "cuobjdump"), "--dump-resource-usage", str(path)],
                               capture_output=True, text=True, check=True).stdout
    return usage, sass


def compile_tc(bits: int, dtype: str, group: int, block_n: int, block_c: int, warps: int, stages: int,
               paired: bool, wgmma: bool = False, k_major: bool = False, x_tile: bool = False,
               prefetch: int = 0, tma: bool = False) -> tuple[str, str]:
    """``_dq_gemv_tc_kernel`` for one tile (M = 16, split-K 8, fixup)."""
    codes = f"tensordesc<i32[{block_c},{block_n}]>" if tma else "*i32"
    pointers = {"x_ptr": f"*{dtype}", "qw_ptr": "*i32", "qw_desc": codes, "s_ptr": f"*{dtype}", "z_ptr": "*u8",
                "b_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "ws_ptr": "*fp32", "count_ptr": "*i32", "h_ptr": f"*{dtype}",
                "g_ptr": f"*{dtype}", "res_ptr": f"*{dtype}", "stride_h": "i32", "stride_res": "i32", "eps": "fp32"}
    # the unit stride of the codes (along N, or along K for the K-major repack) is specialised as
    # Triton does at run time for an int argument of 1
    unit_stride = "stride_qk" if k_major else "stride_qn"
    scalars = {n: "i32" for n in ("M", "N", "K", "stride_xw", "stride_qk", "stride_qn", "stride_g", "stride_ym")
               if n != unit_stride}
    field_mask, one_bits = unit_constants(bits)
    constants = dict({unit_stride: 1}, stride_gn=1, BITS=bits, GROUP=group, HAS_BIAS=False, BLOCK_M=16, BLOCK_N=block_n,
                     BLOCK_C=block_c, SPLIT_K=8,
                     DOT_PREC="tf32", FIELD_MASK=field_mask, ONE_BITS=one_bits,
                     FOLD_SCALES=group % (block_c * chunk_values(bits)) == 0, EVEN_K=True, FIXUP=True, PDL=False,
                     XPW=4, PAIR_MAGIC=gemv.PAIR_MAGIC[DTYPES[dtype]] if paired else 0,
                     PAIR_OFFSET=gemv.PAIR_OFFSET[DTYPES[dtype]], PAIRS=gemv.pairs_per_dot(block_c), W_AS_A=wgmma,
                     X_TILE=x_tile or tma, ACT=False, NORM=False, RESIDUAL=False, ROW_BLOCK=512, PREFETCH=prefetch,
                     CODES_TMA=tma)
    return compile_for_hopper(gemv._dq_gemv_tc_kernel, {**pointers, **scalars}, constants, warps, stages)


def compile_half2(bits: int, group: int, block_n: int, block_c: int, warps: int, split: int, K: int,
                  lanes: int = 1, silu_mul: bool = False) -> tuple[str, str]:
    """``_dq_gemv_half2_kernel`` at M = 1 (x unpaired, split-K reduced in the kernel where split > 1)."""
    types = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": "*fp16", "y_ptr": "*fp16",
             "ws_ptr": "*fp32", "count_ptr": "*i32", "h_ptr": "*fp16", "g_ptr": "*fp16", "res_ptr": "*fp16",
             "stride_h": "i32", "stride_res": "i32", "eps": "fp32",
             **{n: "i32" for n in ("M", "N", "K", "stride_xw", "stride_qk", "stride_g", "stride_ym", "magic")}}
    steps = K // (block_c * chunk_values(bits))
    constants = dict(stride_qn=1, stride_gn=1, BITS=bits, GROUP=group, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=block_n, BLOCK_C=block_c,
                     SPLIT_K=split, EVEN_N=True, EMULATE=False, FIXUP=split > 1, PDL=False, EARLY=False,
                     ONE_STEP=steps == split * lanes, X_PAIRED=False, ACT=silu_mul, LANES=lanes,
                     NORM=False, RESIDUAL=False, ROW_BLOCK=512)
    return compile_for_hopper(half2._dq_gemv_half2_kernel, types, constants, warps, 1)


def compile_kmajor(bits: int, group: int, block_n: int, warps: int, chunks: int) -> tuple[str, str]:
    """``kmajor._dq_gemv_kmajor_kernel`` with scales and zero points column-major (their unit group
    stride specialised, as ``store_codes_k_major`` leaves them), ``chunks`` 3-bit chunks a slot."""
    types = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": "*fp16", "y_ptr": "*fp16",
             **{n: "i32" for n in ("N", "K", "stride_qn", "stride_gn", "magic")}}
    constants = dict(stride_g=1, BITS=bits, GROUP=group, HAS_BIAS=False, BLOCK_N=block_n, THREADS=32 * warps,
                     CHUNKS=chunks, EVEN=True, PDL=False, EMULATE=False)
    return compile_for_hopper(kmajor._dq_gemv_kmajor_kernel, types, constants, warps, 1)


def compile_fragments(bits: int, group: int, block_n: int, warps: int, tokens: int, ahead: int,
                      vectors: int, x_ahead: bool = True) -> tuple[str, str]:
    """``fragments._dq_fragments_kernel`` for ``tokens`` rows of x, scales and zero points ``[G, N]``."""
    types = {"x_ptr": "*fp16", "qf_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": "*fp16", "res_ptr": "*fp16",
             "y_ptr": "*fp16", **{n: "i32" for n in ("M", "N", "K", "stride_xw", "stride_res", "stride_ym", "stride_g",
                                                     "magic")}}
    constants = dict(stride_gn=1, BITS=bits, GROUP=group, HAS_BIAS=False, RESIDUAL=False,
                     TILES=block_n // fragments.TILE_ROWS,
                     WARPS=warps, TOKEN_TILES=1 if tokens <= 8 else 2, VECS=vectors, STEP_K=fragments.step_k(bits),
                     RUN=fragments.quads_per_run(bits, group, vectors), AHEAD=ahead, X_AHEAD=x_ahead, EVEN=True, PDL=False,
                     EMULATE=False)
    return compile_for_hopper(fragments._dq_fragments_kernel, types, constants, warps, 1)


def opcodes(lines: list[str]) -> collections.Counter:
    ops = collections.Counter()
    for line in lines:
        match = OPCODE.match(line)
        if match:
            ops[match.group(1)] += 1
    return ops


def memory_ops(ops: collections.Counter) -> dict[str, int]:
    """Global loads (``LDG*``: direct and async copies) and L2 line prefetches (``CCTL.E.PF2``) of a kernel."""
    return {"global_loads": sum(n for op, n in ops.items() if op.startswith("LDG")),
            "l2_prefetches": sum(n for op, n in ops.items() if op.startswith("CCTL") and "PF" in op)}


def k_loop(sass: str) -> list[str]:
    """The longest backward-branch body that issues tensor-core instructions (``HMMA``, ``HGMMA``): the K loop."""
    lines = sass.splitlines()
    labels = {line.split(":")[0]: i for i, line in enumerate(lines) if line.startswith(".L_x_")}
    best: list[str] = []
    for i, line in enumerate(lines):
        match = BACK_BRANCH.search(line)
        start = labels.get(match.group(1)) if match else None
        if start is not None and start < i and any("MMA" in b for b in lines[start:i]) and i + 1 - start > len(best):
            best = lines[start:i + 1]
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    p.add_argument("--dtype", default="fp16", choices=tuple(DTYPES))
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--block-n", type=int, default=256)
    p.add_argument("--block-c", type=int, default=16, help="packed chunks per K step")
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--paired", action="store_true", help="codes in 16-bit pairs (gemv.PAIRED_CODES)")
    p.add_argument("--wgmma", action="store_true", help="with --paired: codes as wgmma's register operand (PAIRED_WGMMA)")
    p.add_argument("--x-tile", action="store_true", help="with --paired: x as one tile a step, split in registers (PAIRED_XTILE)")
    p.add_argument("--tma", action="store_true", help="with --paired: x as one tile, codes through TMA (PAIRED_TMA)")
    p.add_argument("--k-major", action="store_true", help="codes repacked K-major (qweight.t().contiguous().t())")
    p.add_argument("--half2", action="store_true",
                   help="the paired-fp16 M = 1 kernel instead (takes --split, --k, --lanes, --silu-mul; counts "
                        "every instruction of a program, which streams its whole K range in one pass)")
    p.add_argument("--kmajor", action="store_true",
                   help="the K-major M = 1 kernel instead (--block-n columns a program, --block-c 3-bit chunks a slot)")
    p.add_argument("--fragments", action="store_true",
                   help="the mma.sync kernel over codes in fragment order instead (--block-n columns a program, "
                        "--warps splitting K, --tokens rows of x)")
    p.add_argument("--tokens", type=int, default=1, help="--fragments: rows of x (1-16)")
    p.add_argument("--ahead", type=int, default=1, choices=(0, 1, 2), help="--fragments: steps loaded ahead")
    p.add_argument("--x-late", action="store_true",
                   help="--fragments: x read just before use, only the codes ahead (--ahead 1 or 2)")
    p.add_argument("--vectors", type=int, default=1, choices=(1, 2), help="--fragments: code vectors a lane, tile and step")
    p.add_argument("--split", type=int, default=1, help="--half2: split-K")
    p.add_argument("--k", type=int, default=4096, help="--half2: the layer's K")
    p.add_argument("--lanes", type=int, default=1, help="--half2: K lanes")
    p.add_argument("--silu-mul", action="store_true", help="--half2: with the SiLU epilogue")
    p.add_argument("--prefetch", type=int, default=0,
                   help="tensor-core kernel: steps of codes asked of L2 ahead (kernels/prefetch.py)")
    p.add_argument("--json", action="store_true", help="one JSON line instead of text")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("sass_stats.py compiles kernels: unset TRITON_INTERPRET")
    if args.kmajor:
        kmajor_stats(args)
        return
    if args.fragments:
        fragments_stats(args)
        return
    if args.half2:
        if args.tma or args.prefetch:
            raise SystemExit("--tma and --prefetch apply to the tensor-core kernel, not to --half2")
        half2_stats(args)
        return
    if args.paired and not gemv.pairs_codes(args.bits, args.group, DTYPES[args.dtype], args.block_c):
        raise SystemExit(f"paired codes need 2/4 bits and a step of --block-c {args.block_c} chunks inside --group {args.group}")
    if (args.wgmma or args.x_tile or args.tma) and not args.paired:
        raise SystemExit("--wgmma, --x-tile and --tma take --paired")
    usage, sass = compile_tc(args.bits, args.dtype, args.group, args.block_n, args.block_c, args.warps, args.stages,
                             args.paired, args.wgmma, args.k_major, args.x_tile, args.prefetch,
                             args.tma)
    registers = re.search(r"REG:(\d+)", usage).group(1)
    loop, whole = opcodes(k_loop(sass)), opcodes(sass.splitlines())
    weights = args.block_n * args.block_c * chunk_values(args.bits) / (32 * args.warps)  # per thread and step
    stats = {"registers": int(registers), "local_stores": whole["STL"],
             "barriers": sum(n for op, n in whole.items() if op.startswith("BAR")),
             "loop_instructions": sum(loop.values()), "per_weight": sum(loop.values()) / weights,
             "tensor_ops": sorted(op for op in loop if "MMA" in op),
             "loop_async_copies": sum(n for op, n in loop.items() if op.startswith("LDGSTS")), **memory_ops(whole)}
    report(stats, args.json, [
        f"registers/thread {stats['registers']}, local-memory stores {stats['local_stores']}, barriers {stats['barriers']}",
        f"K loop: {stats['loop_instructions']} instructions per warp-step, {stats['per_weight']:.2f} lane-instructions per weight",
        "mix: " + ", ".join(f"{op} {n}" for op, n in loop.most_common(16))])


def report(stats: dict, as_json: bool, lines: list[str]) -> None:
    """Print ``stats`` as one JSON line, or ``lines`` for a reader."""
    print(json.dumps(stats) if as_json else "\n".join(lines))


def half2_stats(args: argparse.Namespace) -> None:
    """``--half2``: registers and every SASS instruction of one program of the paired-fp16
    kernel, per weight it streams (its steps in one pass, so the straight-line count is the
    count each thread issues, but for the split-K reduction's branch that only the last
    program takes)."""
    steps = args.k // (args.block_c * chunk_values(args.bits))
    if steps % (args.split * args.lanes) or args.group % (args.block_c * chunk_values(args.bits)):
        raise SystemExit(f"--split x --lanes must divide the {steps} steps, and a step of --block-c {args.block_c} "
                         f"chunks must fit inside --group {args.group}")
    usage, sass = compile_half2(args.bits, args.group, args.block_n, args.block_c, args.warps, args.split, args.k,
                                args.lanes, args.silu_mul)
    whole = opcodes(sass.splitlines())
    weights = args.block_n * args.k // args.split / (32 * args.warps)  # per thread, one program
    total = sum(n for op, n in whole.items() if op != "NOP")
    stats = {"registers": int(re.search(r"REG:(\d+)", usage).group(1)), "local_stores": whole["STL"],
             "instructions": total, "per_weight": total / weights}
    report(stats, args.json, [
        f"registers/thread {stats['registers']}, local-memory stores {stats['local_stores']}",
        f"{total} instructions per thread, {stats['per_weight']:.2f} lane-instructions per weight",
        "mix: " + ", ".join(f"{op} {n}" for op, n in whole.most_common(16))])


def kmajor_stats(args: argparse.Namespace) -> None:
    """``--kmajor``: registers and the K loop of the K-major kernel per weight a thread takes in a
    step (its slot of :func:`kmajor.slot_words` words in each of ``--block-n`` columns)."""
    chunks = args.block_c if args.bits == 3 else 1
    if args.bits not in kmajor.KMAJOR_BITS or chunks not in (1, 2):
        raise SystemExit(f"--kmajor takes --bits in {kmajor.KMAJOR_BITS} and, at 3 bits, --block-c 1 or 2")
    usage, sass = compile_kmajor(args.bits, args.group, args.block_n, args.warps, chunks)
    loop = opcodes(k_loop(sass))
    weights = kmajor.slot_words(args.bits, chunks) * 32 // args.bits * args.block_n
    stats = {"registers": int(re.search(r"REG:(\d+)", usage).group(1)),
             "local_stores": opcodes(sass.splitlines())["STL"],
             "loop_instructions": sum(loop.values()), "per_weight": sum(loop.values()) / weights}
    report(stats, args.json, [
        f"registers/thread {stats['registers']}, local-memory stores {stats['local_stores']}",
        f"K loop: {stats['loop_instructions']} instructions per thread-step, {stats['per_weight']:.2f} per weight",
        "mix: " + ", ".join(f"{op} {n}" for op, n in loop.most_common(16))])


def fragments_stats(args: argparse.Namespace) -> None:
    """``--fragments``: registers and the K loop of the ``mma.sync`` kernel per weight a lane
    takes in a step (``--vectors`` units of :func:`fragments.step_k` values of K over 16 rows, in each
    of ``--block-n / 16`` tiles)."""
    if args.bits not in fragments.FRAGMENT_BITS or args.group % fragments.QUAD_K or args.block_n % fragments.TILE_ROWS \
            or not 1 <= args.tokens <= 16 or (args.x_late and args.ahead == 0):
        raise SystemExit(f"--fragments takes --bits in {fragments.FRAGMENT_BITS}, --group a multiple of "
                         f"{fragments.QUAD_K}, --block-n a multiple of {fragments.TILE_ROWS}, --tokens 1-16 and "
                         f"--x-late only with --ahead 1 or 2")
    usage, sass = compile_fragments(args.bits, args.group, args.block_n, args.warps, args.tokens, args.ahead,
                                    args.vectors, not args.x_late)
    loop = opcodes(k_loop(sass))
    weights = args.block_n * args.vectors * fragments.step_k(args.bits) // 32
    stats = {"registers": int(re.search(r"REG:(\d+)", usage).group(1)),
             "local_stores": opcodes(sass.splitlines())["STL"],
             "loop_instructions": sum(loop.values()), "per_weight": sum(loop.values()) / weights,
             "tensor_ops": sum(n for op, n in loop.items() if "MMA" in op)}
    report(stats, args.json, [
        f"registers/thread {stats['registers']}, local-memory stores {stats['local_stores']}",
        f"K loop: {stats['loop_instructions']} instructions per thread-step, {stats['per_weight']:.2f} per weight",
        "mix: " + ", ".join(f"{op} {n}" for op, n in loop.most_common(20))])


if __name__ == "__main__":
    main()
