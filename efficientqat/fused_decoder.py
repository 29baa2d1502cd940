"""Decode steps of a whole Llama-family decoder layer as five launches: no norm or residual kernels.

With the fused q/k/v and gate/up projections (:mod:`efficientqat.fused_projections`) and the
fused decode attention (:mod:`efficientqat.fused_attention`), a decoder layer's decode step is
four packed matmuls and one attention kernel, plus what Hugging Face's layer forward does
between them in PyTorch: ``residual + attn`` and RMSNorm before gate/up, ``residual + mlp``
and (the next layer's) RMSNorm before q/k/v. Compiled, those are two elementwise kernels a
layer, ~190 of the 2035 us of a w4g128 7B step at batch 1 on an H200, launch gaps included
(session 12). :func:`fuse_decoder_layers_` gives each supported layer a forward that, for
exactly the steps the fused attention takes, hands the norms to the matmuls that read them and
the residual adds to the matmuls whose outputs they join (:mod:`efficientqat.row_ops`):

    q, k, v = qkv(RMSNorm(h))         # prologue of the q/k/v matmul
    h = h + o_proj(attention(q, k, v))  # epilogue of o_proj
    h = h + down(act(gate_up(RMSNorm(h))))

Every other call runs the original forward. The class is swapped for a subclass overriding
``forward`` only: parameters, ``state_dict()`` and exports are untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from efficientqat.fused_attention import DecodeAttention
from efficientqat.fused_mlp import FusedGatedMLP
from efficientqat.fused_projections import FusedProjection, fused_name
from efficientqat.model_utils import with_mixin
from efficientqat.qlinear import PackedLinear

SUPPORTED_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
"""Decoder layers whose forward is ``h + attn(input_layernorm(h))`` then ``h + mlp(post_attention_layernorm(h))``."""
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
"""Norms computing ``weight * dtype(h * rsqrt(mean(h^2) + variance_epsilon))``, as the kernels' prologue does."""
QKV = fused_name(("q_proj", "k_proj", "v_proj"))


class DecodeLayer:
    """Mixed in before a supported decoder layer class: the decode steps its fused attention
    takes run as matmuls with the norms and residual adds inside; any other call goes to the
    original forward."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: object,
                **kwargs: object):
        position_embeddings = kwargs.get("position_embeddings")
        target = self.self_attn.decode_target(hidden_states, position_embeddings, attention_mask, kwargs)
        if target is not None:
            return self._fused_step(hidden_states, position_embeddings, *target)
        return super().forward(hidden_states, attention_mask, *args, **kwargs)

    def _fused_step(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                    layer: object, mask: torch.Tensor | None) -> torch.Tensor:
        attn, mlp = self.self_attn, self.mlp
        qkv = getattr(attn, QKV)
        h = hidden_states[:, 0]
        q, k, v = qkv.layer(h, norm=self.input_layernorm).split(qkv.sizes, dim=-1)
        h = attn.o_proj(attn.attend(q, k, v, position_embeddings, layer, mask), residual=h)
        act = mlp.gate_up(h, silu_mul=True, norm=self.post_attention_layernorm)
        return mlp.down_proj(act, residual=h).unsqueeze(1)


def is_supported_layer(module: nn.Module) -> bool:
    """A supported layer, not fused yet, whose parts the fused step needs are in place: the fused
    decode attention with q/k/v as one packed layer, a packed ``o_proj``, the gated MLP with its
    SiLU in the gate/up kernel, and RMSNorms of the known kind."""
    if type(module).__name__ not in SUPPORTED_LAYERS or isinstance(module, DecodeLayer):
        return False
    attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
    norms = [getattr(module, name, None) for name in ("input_layernorm", "post_attention_layernorm")]
    return (isinstance(attn, DecodeAttention) and isinstance(getattr(attn, QKV, None), FusedProjection)
            and isinstance(attn.o_proj, PackedLinear) and isinstance(mlp, FusedGatedMLP)
            and all(type(norm).__name__ in RMS_NORMS and hasattr(norm, "variance_epsilon") for norm in norms))


def fuse_decoder_layers_(model: nn.Module) -> int:
    """Give every supported decoder layer the fused decode step; returns how many. Run after
    :func:`~efficientqat.fused_projections.fuse_projections_` and
    :func:`~efficientqat.fused_attention.fuse_decode_attention_`, whose parts it uses."""
    modules = [m for m in model.modules() if is_supported_layer(m)]
    for module in modules:
        module.__class__ = with_mixin(DecodeLayer, type(module))
    return len(modules)
