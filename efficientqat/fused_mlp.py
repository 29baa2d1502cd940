"""A gated MLP's gate and up projections as one packed matmul that writes ``silu(gate) * up``.

A Llama-style MLP computes ``down(silu(gate(x)) * up(x))``. With gate and up fused into one
matmul (:mod:`efficientqat.fused_projections`), a decode step still launches an elementwise
kernel between that matmul and ``down``: on an H200, 32 launches of ~1.2 µs plus as many launch
gaps in a 7B w4g128 step, ~50 of its 2290 µs (session 9 profile). Here the fused layer stores its
output columns as alternating blocks of :data:`ACT_BLOCK` gate and :data:`ACT_BLOCK` up columns,
so that every output tile of the matmul holds matching gate / up pairs and the decode kernel
writes ``silu(gate) * up`` itself, half as many columns (``kernels.tiling.silu_mul_interleaved``).
Where no kernel applies (CPU, bf16 at M = 1, prefill-sized M) or the tuner timed the unfused
path faster, the same order is undone in PyTorch (:func:`silu_mul_interleaved`).

For inference (``load_quantized``): the module's ``state_dict()`` reads the original
``gate_proj`` / ``up_proj`` / ``down_proj`` tensors, so saving and exporting write the usual layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from efficientqat.packing import pack_qzeros, unpack_qzeros
from efficientqat.qlinear import PackedLinear

ACT_BLOCK = 16
"""Gate (then up) columns per block of the fused layer; the kernels' epilogue assumes 16."""
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
"""Hugging Face MLP classes whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``."""


def interleave_order(intermediate: int) -> torch.Tensor:
    """Column ``j`` of the fused layer is column ``order[j]`` of ``cat([gate, up])``."""
    gate = torch.arange(intermediate).view(-1, ACT_BLOCK)
    return torch.stack([gate, gate + intermediate], dim=1).reshape(-1)


def silu_mul_interleaved(y: torch.Tensor) -> torch.Tensor:
    """``[..., 2 I]`` in the interleaved column order -> ``silu(gate) * up``, ``[..., I]``."""
    pairs = y.unflatten(-1, (-1, 2, ACT_BLOCK))
    return (F.silu(pairs[..., 0, :]) * pairs[..., 1, :]).flatten(-2)


def is_gated_silu_mlp(module: nn.Module) -> bool:
    """A known gated MLP with SiLU whose three projections are packed in one format and whose
    intermediate size is whole blocks: what :class:`FusedGatedMLP` can stand in for."""
    activation = type(getattr(module, "act_fn", None)).__name__
    if type(module).__name__ not in GATED_MLPS or activation not in ("SiLU", "SiLUActivation"):
        return False
    gate, up, down = (getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj"))
    if not all(isinstance(layer, PackedLinear) for layer in (gate, up, down)):
        return False
    return (gate.spec == up.spec and gate.in_features == up.in_features and gate.out_features == up.out_features
            and gate.out_features % ACT_BLOCK == 0 and gate.bias is None and up.bias is None
            and gate.scales.dtype == up.scales.dtype and gate.qweight.device == up.qweight.device)


class FusedGatedMLP(nn.Module):
    """``down_proj(silu(gate) * up)`` with gate / up as one interleaved packed layer, ``gate_up``."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        gate, up = mlp.gate_proj, mlp.up_proj
        self.intermediate = gate.out_features
        order = interleave_order(self.intermediate).to(gate.qweight.device)
        fused = PackedLinear(gate.in_features, 2 * self.intermediate, gate.spec, False, device="meta")
        fused.qweight = torch.cat([gate.qweight, up.qweight], dim=1)[:, order].contiguous()
        zeros = torch.cat([gate.int_zeros(), up.int_zeros()])[order]
        fused.qzeros = pack_qzeros(zeros, gate.spec.bits)
        fused.scales = nn.Parameter(torch.cat([gate.scales.data, up.scales.data], dim=1)[:, order].contiguous(),
                                    requires_grad=False)
        fused.g_idx = gate.g_idx
        self.gate_up = fused
        self.down_proj = mlp.down_proj
        self._register_state_dict_hook(_unfused_state_dict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up(x, silu_mul=True))

    def extra_repr(self) -> str:
        return f"intermediate={self.intermediate}, gate/up interleaved in blocks of {ACT_BLOCK}"


def _unfused_state_dict(module: FusedGatedMLP, state: dict, prefix: str, _meta: object) -> None:
    """``<mlp>.gate_up.<tensor>`` -> ``<mlp>.gate_proj.<tensor>`` and ``<mlp>.up_proj.<tensor>``
    in the original column order (copies: safetensors refuses shared storage)."""
    inverse = torch.argsort(interleave_order(module.intermediate))
    bits = module.gate_up.spec.bits
    for key in [k for k in state if k.startswith(prefix + "gate_up.")]:
        tensor = state.pop(key)
        leaf = key[len(prefix + "gate_up."):]
        if leaf == "g_idx":
            parts = [tensor, tensor]
        elif leaf == "qzeros":
            zeros = unpack_qzeros(tensor, bits)[inverse.to(tensor.device)]
            parts = [pack_qzeros(half, bits) for half in zeros.split(module.intermediate)]
        else:
            parts = tensor[:, inverse.to(tensor.device)].split(module.intermediate, dim=1)
        for name, part in zip(("gate_proj", "up_proj"), parts):
            state[f"{prefix}{name}.{leaf}"] = part.contiguous().clone()


def fuse_gated_mlps_(model: nn.Module) -> int:
    """Replace every gated SiLU MLP of packed layers by a :class:`FusedGatedMLP`; returns how many."""
    names = [name for name, module in model.named_modules() if is_gated_silu_mlp(module)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FusedGatedMLP(getattr(parent, child)))
    return len(names)
