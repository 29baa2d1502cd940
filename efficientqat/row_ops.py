"""A matmul's row work besides the product: RMSNorm of its input, a residual added to its output.

A decoder layer normalises the residual stream before q/k/v and before gate/up, and adds the
outputs of o_proj and down_proj back to it. :class:`RowOps` hands both to a packed layer, whose
decode kernels do them in place of separate launches (``kernels.prologue``); every other path
(training, prefill, the CPU) runs :meth:`RowOps.before` and :meth:`RowOps.after` in PyTorch,
with the rounding of Hugging Face's ``LlamaRMSNorm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's ``LlamaRMSNorm`` (float32 statistics, the product rounded to h's dtype
    first), in h's dtype as the kernels take it."""
    v = h.float()
    v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * v.to(h.dtype)).to(h.dtype)


@dataclass(frozen=True, eq=False)
class RowOps:
    """What a matmul does to its rows besides the product: RMSNorm its input first
    (``norm_weight``, ``eps``), add ``residual`` (``[M, N]``) to its output."""

    norm_weight: torch.Tensor | None = None
    eps: float = 0.0
    residual: torch.Tensor | None = None

    @classmethod
    def of(cls, norm: torch.nn.Module | None = None, residual: torch.Tensor | None = None) -> "RowOps":
        """From an RMSNorm module (``weight`` and ``variance_epsilon``, as Llama's, Mistral's and
        Qwen's have) and / or a residual."""
        if norm is None:
            return NO_ROW_OPS if residual is None else cls(residual=residual)
        return cls(norm.weight, float(norm.variance_epsilon), residual)

    @property
    def active(self) -> bool:
        return self.norm_weight is not None or self.residual is not None

    def check(self, x: torch.Tensor, n: int) -> None:
        """Raise ValueError unless the norm weight fits ``x [..., K]`` and the residual ``[..., n]``."""
        if self.norm_weight is not None and self.norm_weight.shape != (x.shape[-1],):
            raise ValueError(f"the RMSNorm weight must have shape ({x.shape[-1]},), not {tuple(self.norm_weight.shape)}")
        if self.residual is not None and self.residual.shape != (*x.shape[:-1], n):
            raise ValueError(f"the residual must have shape {(*x.shape[:-1], n)}, not {tuple(self.residual.shape)}")

    def before(self, x: torch.Tensor) -> torch.Tensor:
        """x as the matmul must read it (PyTorch path)."""
        return x if self.norm_weight is None else rms_norm(x, self.norm_weight, self.eps)

    def after(self, y: torch.Tensor) -> torch.Tensor:
        """The matmul's output with the residual added (PyTorch path)."""
        return y if self.residual is None else y + self.residual


NO_ROW_OPS = RowOps()
