"""One packed matmul for sibling projections that read the same input (q/k/v, gate/up).

At batch 1 a decode step is a chain of small matmuls, one kernel launch each, and the smallest
(a 4096 x 4096 projection at 4 bits is 8 MB, read in a few microseconds) pay a fixed launch and
ramp-up cost comparable to their reading time. q, k and v read the same activations, as do gate
and up: one launch over their weights concatenated along the output dimension replaces three
(two), and the larger matrix fills the GPU better (the merged layers of vLLM and TensorRT-LLM).

The model's own forward code is untouched: each original projection is replaced by a
:class:`ProjectionSlice` that returns its slice of the shared output. The first sibling called
with an input runs the fused matmul and holds the other slices until their owners ask for them
with the same input tensor (the attention and MLP code call the siblings back to back); the last
one releases them, so no activation outlives the layer's forward. Under ``torch.compile`` the
bookkeeping is traced away: the graph holds one matmul and its split.

For inference only (``load_quantized``): ``state_dict()`` of a fused model still reads the
unfused per-projection tensors, so saving and exporting write the usual layout.
"""

from __future__ import annotations

import torch
from torch import nn

from efficientqat.fused_mlp import fuse_gated_mlps_
from efficientqat.qlinear import PackedLinear

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_CONCAT_DIM = {"qweight": 1, "qzeros": 1, "scales": 1, "bias": 0}


class FusedProjection(nn.Module):
    """The concatenated packed layer of some sibling projections, and the split of its output."""

    def __init__(self, names: tuple[str, ...], layers: list[PackedLinear]) -> None:
        super().__init__()
        first = layers[0]
        self.names = names
        self.sizes = [layer.out_features for layer in layers]
        fused = PackedLinear(first.in_features, sum(self.sizes), first.spec, first.bias is not None, device="meta")
        fused.qweight = torch.cat([layer.qweight for layer in layers], dim=1)
        fused.qzeros = torch.cat([layer.qzeros for layer in layers], dim=1)
        fused.scales = nn.Parameter(torch.cat([layer.scales.data for layer in layers], dim=1), requires_grad=False)
        fused.g_idx = first.g_idx
        if first.bias is not None:
            fused.bias = torch.cat([layer.bias for layer in layers])
        self.layer = fused
        self._pending: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None
        self._left = 0
        self._register_state_dict_hook(_unfused_state_dict)

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Slice ``index`` of the fused output for ``x``: computed on the first sibling's call,
        held for the others (same tensor object) and dropped once every slice was taken. The
        held pair is read once into a local, so a thread that replaces it between the check and
        the read (two threads in one model) cannot hand another input's slice to this call."""
        pending = self._pending
        if pending is None or pending[0] is not x:
            pending = (x, self.layer(x).split(self.sizes, dim=-1))
            self._pending, self._left = pending, len(self.sizes)
        self._left -= 1
        if self._left <= 0:
            self._pending = None
        return pending[1][index]

    def extra_repr(self) -> str:
        return f"names={self.names}, sizes={self.sizes}"


class ProjectionSlice(nn.Module):
    """Stands where one fused projection was: its slice of the shared output."""

    def __init__(self, owner: FusedProjection, index: int) -> None:
        super().__init__()
        self.__dict__["owner"] = owner  # not a child: the parent holds the fused layer once
        self.index = index
        self.in_features = owner.layer.in_features
        self.out_features = owner.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.owner.output(x, self.index)

    def extra_repr(self) -> str:
        return f"{self.owner.names[self.index]} of the fused {'/'.join(self.owner.names)}"


def _unfused_state_dict(module: FusedProjection, state: dict, prefix: str, _meta: object) -> None:
    """Rewrite ``<parent>.fused_x_y.layer.<tensor>`` into ``<parent>.<x>.<tensor>`` and so on,
    split back along the dimension it was concatenated on (``g_idx`` is shared). Parts are
    copies: safetensors refuses tensors that share storage."""
    parent = prefix[: -len(fused_name(module.names)) - 1]
    layer = module.layer
    words = [size * layer.spec.bits // 32 for size in module.sizes]
    for key in [k for k in state if k.startswith(prefix)]:
        tensor = state.pop(key)
        leaf = key[len(prefix) + len("layer."):]
        if leaf == "g_idx":
            parts = [tensor] * len(module.names)
        else:
            parts = tensor.split(words if leaf == "qzeros" else module.sizes, dim=_CONCAT_DIM[leaf])
        for name, part in zip(module.names, parts):
            state[f"{parent}{name}.{leaf}"] = part.clone()


def fused_name(names: tuple[str, ...]) -> str:
    """Attribute name of the fused layer on the parent: ``fused_q_k_v``, ``fused_gate_up``."""
    return "fused_" + "_".join(name.removesuffix("_proj") for name in names)


def _fusable(layers: list[nn.Module]) -> bool:
    """Same packed format, input size, bias presence and tensor dtypes: one launch can serve them."""
    if not all(isinstance(layer, PackedLinear) for layer in layers):
        return False
    first = layers[0]
    return all(
        layer.spec == first.spec
        and layer.in_features == first.in_features
        and (layer.bias is None) == (first.bias is None)
        and layer.scales.dtype == first.scales.dtype
        and layer.qweight.device == first.qweight.device
        for layer in layers
    )


def fuse_projections_(model: nn.Module) -> int:
    """Fuse every group of :data:`SIBLINGS` that one parent module holds as packed layers of one
    format; returns how many groups were fused. Originals are released as each group is built.
    A known gated SiLU MLP gets its gate/up group as :class:`~efficientqat.fused_mlp.FusedGatedMLP`,
    whose matmul also applies the activation."""
    fused = fuse_gated_mlps_(model)
    for parent in list(model.modules()):
        for names in SIBLINGS:
            layers = [getattr(parent, name, None) for name in names]
            if not _fusable(layers):
                continue
            owner = FusedProjection(names, layers)
            setattr(parent, fused_name(names), owner)
            for index, name in enumerate(names):
                setattr(parent, name, ProjectionSlice(owner, index))
            fused += 1
    return fused
