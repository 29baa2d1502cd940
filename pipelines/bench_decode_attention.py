"""Device time of one decode step's attention: the fused kernel against Hugging Face's unfused path.

    python3 pipelines/bench_decode_attention.py --out DIR [--cases "B,L,POS;..."] [--heads 32,32]

Per case (batch B, static cache of L positions, POS tokens already cached, Llama-2-7B heads:
32 query and 32 KV heads of 128, fp16) and per launch shape of ``kernels.decode_attention``
(slices per head x positions per loop step), the median device time of one launch, replayed from
a CUDA graph over 32 layers' caches in turn (as a model reads them: not L2-resident), and the
bytes of cached keys and values it reads per microsecond. Against it, on the same input:

* ``unfused``: what the attention module does without it: rotary embedding on q and k, the static
  cache's update (write position, two index copies, position += 1), then torch's
  ``scaled_dot_product_attention`` over all L slots with the boolean mask;
* ``sdpa``: that attention call alone (the least the fused kernel replaces).

Each launch advances the write position, so during the timed replays POS grows by ~30. The table
is printed last; raw rows go to ``<out>/bench_decode_attention.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import graph_median_ms  # noqa: E402  (also makes efficientqat.kernels importable)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from efficientqat.kernels.decode_attention import decode_attention, launch_shape  # noqa: E402

LAYERS = 32
SPLITS = (1, 2, 4, 8, 16, 32)
BLOCKS = (32, 64)


class Case:
    """32 layers' caches, new-token projections and rotary rows for one (B, L, POS)."""

    def __init__(self, batch: int, length: int, pos: int, heads: int, kv_heads: int, dim: int = 128) -> None:
        opts = dict(device="cuda", dtype=torch.float16)
        self.batch, self.length, self.pos, self.heads, self.kv_heads, self.dim = batch, length, pos, heads, kv_heads, dim
        self.k_caches = [torch.randn(batch, kv_heads, length, dim, **opts) for _ in range(LAYERS)]
        self.v_caches = [torch.randn(batch, kv_heads, length, dim, **opts) for _ in range(LAYERS)]
        self.lengths = [torch.tensor(pos, device="cuda") for _ in range(LAYERS)]
        qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, **opts)
        self.q, self.k, self.v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
        angles = torch.rand(batch, dim // 2, device="cuda") * 6
        self.cos, self.sin = (torch.cat([f(angles)] * 2, -1).half() for f in (torch.cos, torch.sin))
        self.mask = torch.ones(batch, length, dtype=torch.bool, device="cuda")

    def reset(self) -> None:
        for length in self.lengths:
            length.fill_(self.pos)

    def fused(self, layer: int, splits: int, block: int) -> None:
        decode_attention(self.q, self.k, self.v, self.cos, self.sin, self.k_caches[layer], self.v_caches[layer],
                         self.lengths[layer], self.mask, self.dim**-0.5, splits, block)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(self.batch, n, 1, self.dim)

    def unfused(self, layer: int, attention_only: bool = False) -> None:
        q, k = self._heads(self.q, self.heads), self._heads(self.k, self.kv_heads)
        if not attention_only:
            cos, sin = self.cos[:, None, None], self.sin[:, None, None]
            q, k = (x * cos + torch.cat([-x[..., self.dim // 2:], x[..., : self.dim // 2]], -1) * sin for x in (q, k))
            slot = torch.arange(1, device="cuda") + self.lengths[layer]
            self.lengths[layer].add_(1)
            self.k_caches[layer].index_copy_(2, slot, k)
            self.v_caches[layer].index_copy_(2, slot, self._heads(self.v, self.kv_heads))
        F.scaled_dot_product_attention(q, self.k_caches[layer], self.v_caches[layer], attn_mask=self.mask[:, None, None],
                                       scale=self.dim**-0.5, enable_gqa=self.heads != self.kv_heads)

    def read_bytes(self) -> int:
        """Cached keys and values the fused kernel reads at the first timed position."""
        return 2 * self.batch * self.kv_heads * self.pos * self.dim * 2


def time_us(case: Case, call) -> float:
    case.reset()
    return 1e3 * graph_median_ms([lambda i=i: call(i) for i in range(LAYERS)], iters=10)


def bench_case(case: Case) -> list[dict]:
    rows = []
    label = f"B={case.batch} L={case.length} pos={case.pos} H={case.heads}/{case.kv_heads}"
    base = {"batch": case.batch, "cache_len": case.length, "pos": case.pos, "heads": case.heads,
            "kv_heads": case.kv_heads, "read_bytes": case.read_bytes()}
    for name, attention_only in (("unfused", False), ("sdpa", True)):
        us = time_us(case, lambda i, a=attention_only: case.unfused(i, a))
        rows.append({**base, "path": name, "us": us})
        print(f"{label} {name}: {us:.2f} us", flush=True)
    default = launch_shape(case.batch * case.heads, case.length, torch.device("cuda"))
    for splits in SPLITS:
        if splits > default[0] * 4 or splits < default[0] // 4:
            continue
        for block in BLOCKS:
            us = time_us(case, lambda i, s=splits, b=block: case.fused(i, s, b))
            rows.append({**base, "path": "fused", "splits": splits, "block": block, "us": us,
                         "default": (splits, block) == default})
            print(f"{label} fused splits={splits} block={block}: {us:.2f} us", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| B, L, pos, heads | unfused µs | sdpa µs | fused, default shape µs (x unfused) | fused, best shape µs | best shape (splits, block) | GB/s at best |",
             "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["batch"], r["cache_len"], r["pos"], r["heads"], r["kv_heads"]) for r in rows})
    for key in keys:
        mine = [r for r in rows if (r["batch"], r["cache_len"], r["pos"], r["heads"], r["kv_heads"]) == key]
        by_path = {r["path"]: r for r in mine if r["path"] != "fused"}
        fused = [r for r in mine if r["path"] == "fused"]
        best = min(fused, key=lambda r: r["us"])
        default = next(r for r in fused if r["default"])
        unfused = by_path["unfused"]["us"]
        lines.append(f"| {key[0]}, {key[1]}, {key[2]}, {key[3]}/{key[4]} | {unfused:.2f} | {by_path['sdpa']['us']:.2f} | "
                     f"{default['us']:.2f} ({unfused / default['us']:.2f}x) | {best['us']:.2f} | "
                     f"{best['splits']}, {best['block']} | {best['read_bytes'] / best['us'] / 1e3:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", default="1,136,70;1,4096,2000;8,136,70;8,4096,2000")
    p.add_argument("--heads", default="32,32", help="query heads, KV heads (8 for Llama-3-8B's grouped queries)")
    args = p.parse_args(argv)
    heads, kv_heads = (int(x) for x in args.heads.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.cases.split(";"):
        batch, length, pos = (int(x) for x in spec.split(","))
        case = Case(batch, length, pos, heads, kv_heads)
        rows += bench_case(case)
        del case
        torch.cuda.empty_cache()
        (args.out / "bench_decode_attention.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
