"""Study: the fragment-order decode kernel (``kernels/fragments.py``) of several git revisions, timed
side by side in one process.

    python3 pipelines/fragments_ab.py --revs 0dd7fc4,tree --quants w4g128 --tokens 16,1 --tiles 32:8:1:2,16:8:1:2

A change to a decode kernel moves a launch by a few percent, about what separates two processes on
one GPU (their cuBLAS times differ by 1-3%). So each revision's ``kernels/fragments.py`` (``tree``:
the working tree's) is imported beside the others as a module of ``efficientqat.kernels``; its
relative imports take the working tree's helpers, so a revision written against helpers that have
since changed fails to import, named. Every tile (``cols:warps:ahead:vectors[:x_ahead]``) runs every
revision twice, in alternating order, chained over rotated copies as the tuner times
(:func:`read_floor.chained_us`, PDL where the GPU has it), beside cuBLAS fp16 on the same rotation;
each launch is checked against float64 first. Rows go to ``--out`` (JSON); the table is printed last.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkout_paths  # noqa: E402,F401 (efficientqat.kernels importable from a bare checkout)
from bench_kernels import make_layer  # noqa: E402
from read_floor import ROTATION_BYTES, chained_us, int_list  # noqa: E402

from efficientqat.kernels import fragments, tuning  # noqa: E402
from efficientqat.quantizer import QuantSpec  # noqa: E402

KERNEL = "kernels/fragments.py"
TREE = "tree"
"""The ``--revs`` name of the working tree's kernel."""


def load_revision(rev: str, root: Path = Path(__file__).resolve().parents[1]) -> ModuleType:
    """``kernels/fragments.py`` as git revision ``rev`` of the checkout at ``root`` holds it, or as the
    file ``rev`` names where it ends in ``.py`` (a copy for a machine without the git history);
    ``tree``: the working tree's module. Imported as ``efficientqat.kernels._fragments_<rev>``."""
    if rev == TREE:
        return fragments
    name = "efficientqat.kernels._fragments_" + re.sub(r"\W", "_", rev)
    if rev.endswith(".py"):
        if not Path(rev).is_file():
            raise SystemExit(f"--revs: no file {rev!r}")
        path = Path(rev)
    else:
        shown = subprocess.run(["git", "show", f"{rev}:{KERNEL}"], cwd=root, capture_output=True, text=True)
        if shown.returncode:
            raise SystemExit(f"--revs: git has no {KERNEL} at revision {rev!r}: {shown.stderr.strip()}")
        path = Path(tempfile.mkdtemp()) / f"{name.rsplit('.', 1)[1]}.py"
        path.write_text(shown.stdout)  # Triton reads a kernel's source from its file
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise SystemExit(f"--revs: {KERNEL} of {rev!r} does not import against this tree's helpers: {exc}") from exc
    return module


def parse_tiles(text: str) -> list[tuple[int, int, int, int, int]]:
    """``--tiles``: ``cols:warps:ahead:vectors[:x_ahead]`` tiles joined by commas, steps ahead 0, 1 or 2
    (the kernel's ``AHEAD``), ``x_ahead`` 1 (default: x requested ahead with the codes) or 0 (x just
    before use; steps ahead 1 or 2) and the rest positive; anything else exits naming it."""
    tiles = []
    for tile in text.split(","):
        fields = tile.split(":")
        fields += ["1"] * (len(fields) == 4)
        if (len(fields) != 5 or not all(f.isdigit() for f in fields) or int(fields[2]) > 2 or int(fields[4]) > 1
                or 0 in (int(fields[0]), int(fields[1]), int(fields[3])) or int(fields[2]) == int(fields[4]) == 0):
            raise SystemExit(f"--tiles takes cols:warps:ahead:vectors[:x_ahead] tiles, ahead 0, 1 or 2, x_ahead 1 "
                             f"or 0 (with ahead 1 or 2) and the rest positive integers, not {tile!r}")
        tiles.append(tuple(int(f) for f in fields))
    return tiles


def launch(module: ModuleType, x: torch.Tensor, own: tuple[torch.Tensor, ...], spec: QuantSpec,
           tile: tuple[int, int, int, int, int]) -> torch.Tensor:
    """One launch of ``module``'s fragment-order kernel at ``tile`` on ``own = (codes in fragment
    order, scales, zeros)``; x read apart (``x_ahead`` 0) exits for a revision whose kernel predates it."""
    block_n, warps, ahead, vectors, x_ahead = tile
    if not x_ahead and "X_AHEAD" not in module._dq_fragments_kernel.arg_names:
        raise SystemExit(f"{module.__name__}: this revision's kernel always reads x ahead; tile {tile} asks otherwise")
    cfg = tuning.Config(1, block_n, ahead, 1, warps, 1, tuning.FRAGMENTS, pdl=tuning.pdl_supported(x.device),
                        vectors=vectors, x_ahead=bool(x_ahead))
    return module.gemv_fragments_forward(x, *own, None, spec.bits, spec.group_size, cfg)


def time_case(revs: dict[str, ModuleType], n: int, k: int, quant: str, m: int,
              tiles: list[tuple[int, int, int, int, int]], repeats: int) -> list[dict]:
    """One row a tile: cuBLAS's µs and, per revision, its two µs (forward and reversed order) and error."""
    spec = QuantSpec.from_name(quant)
    layer = make_layer(n, k, spec, "cuda")
    own = (fragments.fragment_codes(layer.qweight, spec.bits), layer.scales, layer.kernel_zeros())
    copies = tuning.weight_copies(*own, total=ROTATION_BYTES)
    dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(2)]
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ref = x.double() @ layer.dequantize_weight().double().t()
    cublas = chained_us(lambda w: torch.matmul(x, w.t()), dense, repeats)
    rows = []
    for tile in tiles:
        calls = {rev: functools.partial(launch, module, x, spec=spec, tile=tile) for rev, module in revs.items()}
        row = {"quant": quant, "m": m, "tile": list(tile), "cublas_us": cublas, "us": {}, "rel_error": {}}
        for rev, call in calls.items():
            row["rel_error"][rev] = ((call(own).double() - ref).norm() / ref.norm()).item()
            if row["rel_error"][rev] > 3e-3:
                raise SystemExit(f"{rev} at {quant} M = {m}, tile {tile}: relative error {row['rel_error'][rev]:.1e}")
        for order in (list(calls), list(calls)[::-1]):
            for rev in order:
                row["us"].setdefault(rev, []).append(chained_us(lambda w, call=calls[rev]: call(own=w), copies, repeats))
        rows.append(row)
        print(f"{quant} M={m} {tile}: cuBLAS {cublas:.2f} | "
              + " | ".join(f"{rev} {us[0]:.2f} / {us[1]:.2f}" for rev, us in row["us"].items()), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Per tile: cuBLAS, then each revision's two µs (forward / reversed order) and its best ratio to cuBLAS."""
    revs = list(rows[0]["us"])
    lines = ["| quant | M | tile (cols, warps, ahead, vectors, x ahead) | cuBLAS us | " + " | ".join(revs) + " |",
             "|---" * (4 + len(revs)) + "|"]
    for row in rows:
        cells = [f"{us[0]:.2f} / {us[1]:.2f} ({row['cublas_us'] / min(us):.2f}x)" for us in row["us"].values()]
        lines.append(f"| {row['quant']} | {row['m']} | {', '.join(map(str, row['tile']))} | {row['cublas_us']:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--revs", default=f"HEAD,{TREE}",
                   help=f"git revisions, copies of the kernel file (*.py) or {TREE!r}, joined by commas")
    p.add_argument("--shape", default="8192,8192", help="N,K")
    p.add_argument("--quants", default="w4g128")
    p.add_argument("--tokens", default="1,16", help="M values")
    p.add_argument("--tiles", default="16:8:1:2,32:8:1:2")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    tiles = parse_tiles(args.tiles)
    revs = {rev: load_revision(rev) for rev in args.revs.split(",")}
    if not torch.cuda.is_available():
        raise SystemExit(f"{p.prog} times kernels: it needs a CUDA GPU")
    shape = int_list("--shape", args.shape)
    if len(shape) != 2:
        raise SystemExit(f"--shape takes N,K, not {args.shape!r}")
    n, k = shape
    rows = []
    for quant in args.quants.split(","):
        for m in int_list("--tokens", args.tokens):
            rows += time_case(revs, n, k, quant, m, tiles, args.repeats)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print(f"device {torch.cuda.get_device_name()}, {n}x{k}")
    print(table(rows))


if __name__ == "__main__":
    main()
