"""Decode steps of Llama-family attention through one fused kernel (rotary, cache write, attention).

Hugging Face's attention forward, for one new token over a static cache, runs the rotary
embedding, the cache's ``update`` (two index copies and the write-position bookkeeping) and the
attention kernel over every slot of the cache, masked ones included: several launches and ~10 us
a layer at batch 1, ~13% of a 4-bit 7B decode step on an H200 (see ``kernels.decode_attention``).
:func:`fuse_decode_attention_` gives each supported attention module a forward that, for exactly
that case, calls the q/k/v projections and ``o_proj`` as before (fused or packed, whatever they
are) and does everything between them in one kernel; every other call (prefill, training, a
dynamic cache, a sliding window shorter than the cache, a mask it cannot read, the CPU) runs the
original forward.

The module's class is swapped for a subclass that overrides ``forward`` only, so parameters,
``state_dict()`` and exports are untouched.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from efficientqat.model_utils import with_mixin

SUPPORTED_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")
"""Attention classes whose forward is: project (Qwen3: then RMS-normalise each head of q and k,
``q_norm`` / ``k_norm``), ``apply_rotary_pos_emb`` (rotate-half), cache update, attention scaled
by ``self.scaling`` with ``num_key_value_groups`` query heads per KV head, over a sliding window
if the module or (Mistral) its config names one."""


@torch.library.custom_op("efficientqat::decode_attention", mutates_args=("k_cache", "v_cache", "length"))
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                        mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """``kernels.decode_attention`` as an operator ``torch.compile`` leaves whole (it writes the
    caches and the write position in place, which the compiler is told)."""
    from efficientqat.kernels.decode_attention import decode_attention

    return decode_attention(q, k, v, cos, sin, k_cache, v_cache, length, mask, scaling)


@decode_attention_op.register_fake
def _decode_attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                            mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    return q.new_empty(q.shape)


def kernel_available(x: torch.Tensor) -> bool:
    """Triton importable and x where it runs: CUDA, or CPU tensors under ``TRITON_INTERPRET=1``
    (the tests); ``EFFICIENTQAT_KERNELS=0`` turns it off as it does the packed matmuls. The
    device is checked before triton is imported, so CPU decode steps never import it."""
    if os.environ.get("EFFICIENTQAT_KERNELS", "1") == "0":
        return False
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return False
    try:
        import efficientqat.kernels.decode_attention  # noqa: F401
    except ImportError:
        return False
    return True


def static_cache_layer(cache: object, layer_idx: int) -> object | None:
    """The cache layer of ``layer_idx`` if it is an initialised full-length static layer that
    keeps its write position on the device (transformers >= 5: ``cumulative_length``)."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    if type(layer).__name__ != "StaticLayer" or not getattr(layer, "is_initialized", False):
        return None
    if not isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
        return None
    return layer


_UNREADABLE = object()


def mask_rows(attention_mask: object, batch: int, cache_len: int) -> torch.Tensor | None | object:
    """The ``[B, L]`` row of a one-query 4-D mask (bool or additive, shared by the heads), None
    for no mask, or ``_UNREADABLE`` for anything else (per-head masks, block masks)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        return _UNREADABLE
    if attention_mask.shape[1] != 1 or attention_mask.shape[2] != 1 or attention_mask.shape[3] != cache_len:
        return _UNREADABLE
    return attention_mask[:, 0, 0, :].expand(batch, cache_len)


class DecodeAttention:
    """Mixed in before a supported attention class: its one-token static-cache steps take the
    fused kernel; any other call goes to the original forward."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, *args: object, **kwargs: object):
        target = self.decode_target(hidden_states, position_embeddings, attention_mask, kwargs)
        if target is not None:
            return self._fused_step(hidden_states, position_embeddings, *target), None
        return super().forward(hidden_states, position_embeddings, attention_mask, *args, **kwargs)

    def decode_target(self, hidden_states: torch.Tensor, position_embeddings: object, attention_mask: object,
                      kwargs: dict) -> tuple[object, torch.Tensor | None] | None:
        """``(cache layer, [B, L] mask or None)`` when this call is a step the kernel takes (one
        token, inference, an initialised static cache of x's dtype and batch, a window that
        covers it, a readable mask, the kernel available), else None."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if self.training or hidden_states.dim() != 3 or hidden_states.shape[1] != 1 or not position_embeddings:
            return None
        layer = static_cache_layer(cache, self.layer_idx)
        if (layer is None or layer.keys.dtype != hidden_states.dtype or not self._window_covers(layer.keys.shape[2])
                or not kernel_available(hidden_states)):
            return None
        batch = hidden_states.shape[0]
        mask = mask_rows(attention_mask, batch, layer.keys.shape[2])
        if mask is _UNREADABLE or layer.keys.shape[0] != batch:
            return None
        return layer, mask

    def _window_covers(self, cache_len: int) -> bool:
        """No sliding window, or one at least as long as the cache (then it never cuts anything)."""
        window = getattr(self, "sliding_window", getattr(getattr(self, "config", None), "sliding_window", None))
        return window is None or cache_len <= window

    def _fused_step(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                    layer: object, mask: torch.Tensor | None) -> torch.Tensor:
        q = self.q_proj(hidden_states)[:, 0]
        k = self.k_proj(hidden_states)[:, 0]
        v = self.v_proj(hidden_states)[:, 0]
        return self.o_proj(self.attend(q, k, v, position_embeddings, layer, mask).unsqueeze(1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               position_embeddings: tuple[torch.Tensor, torch.Tensor], layer: object,
               mask: torch.Tensor | None) -> torch.Tensor:
        """The step's attention output ``[B, heads * dim]`` (before ``o_proj``) from the projected
        ``q, k, v`` ``[B, heads * dim]``, for a target of :meth:`decode_target`."""
        batch, dim = q.shape[0], layer.keys.shape[3]
        if getattr(self, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before the rotary embedding
            q = self.q_norm(q.view(batch, -1, dim)).view(batch, -1)
            k = self.k_norm(k.view(batch, -1, dim)).view(batch, -1)
        cos, sin = (t[:, -1].expand(batch, -1) for t in position_embeddings)
        return decode_attention_op(q, k, v, cos, sin, layer.keys, layer.values, layer.cumulative_length, mask,
                                   float(self.scaling))


def is_supported_attention(module: nn.Module) -> bool:
    """One of :data:`SUPPORTED_ATTENTION`, not fused yet (a sliding window is checked per call,
    against the cache length)."""
    return (type(module).__name__ in SUPPORTED_ATTENTION and not isinstance(module, DecodeAttention)
            and all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "scaling")))


def fuse_decode_attention_(model: nn.Module) -> int:
    """Give every supported attention module the fused decode step; returns how many."""
    modules = [m for m in model.modules() if is_supported_attention(m)]
    for module in modules:
        module.__class__ = with_mixin(DecodeAttention, type(module))
    devices = {p.device for m in modules for p in m.parameters() if p.is_cuda}
    if devices:  # the kernel's arrival counters, made before any compiled step (see reserve_split_k_workspace)
        from efficientqat.kernels.tiling import reserve_split_k_workspace

        for device in devices:
            reserve_split_k_workspace(device)
    return len(modules)
