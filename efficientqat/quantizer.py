"""Asymmetric uniform group-wise weight quantizer with learnable step size and zero point.

The math follows the EfficientQAT paper: a weight matrix W (out x in) is split into groups of
``group_size`` consecutive input columns; each (row, group) gets a step size s and a zero
point z initialised from the group's min/max. Rounding uses the straight-through estimator,
so W, s and z all receive gradients:

    q   = clamp(round(W / s) + round(z), 0, 2^b - 1)
    W^  = (q - round(z)) * s

With the STE, dW^/dW = 1 inside the grid and 0 where q was clamped; dW^/ds = q - z - W/s
inside the grid and q - z outside; dW^/dz = 0 inside the grid and -s outside.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from efficientqat.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_MIN = 1e-4
SCALE_MAX = 1e4


@dataclass(frozen=True)
class QuantSpec:
    """Bit width and group size of one quantization setting (group_size -1 = per channel)."""

    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"quant.wbits={self.bits} is not supported; choose one of {SUPPORTED_BITS}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ConfigError(f"quant.group_size={self.group_size} must be a positive integer or -1 (per channel)")

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def group_len(self, in_features: int) -> int:
        """Columns per group for a layer with ``in_features`` inputs; checks divisibility."""
        if self.group_size == -1:
            return in_features
        if in_features % self.group_size:
            raise ConfigError(
                f"quant.group_size={self.group_size} does not divide a layer's input size {in_features}; "
                "choose a group size that divides every quantized layer's in_features, or -1 (per channel)"
            )
        return self.group_size

    def n_groups(self, in_features: int) -> int:
        return in_features // self.group_len(in_features)

    @property
    def name(self) -> str:
        return f"w{self.bits}g{self.group_size if self.group_size > 0 else 'ch'}"

    @classmethod
    def from_name(cls, name: str) -> QuantSpec:
        """Inverse of :attr:`name` ("w4g128", "w2g64", "w8gch"): how benchmarks and sweeps
        take a setting on their command line."""
        match = re.fullmatch(r"w(\d+)g(\d+|ch)", name.strip())
        if match is None:
            raise ConfigError(f"quantization setting '{name}' is not of the form wBITSgGROUP "
                              "(e.g. w4g128, w2g64, or w4gch for per channel)")
        group = match.group(2)
        return cls(int(match.group(1)), -1 if group == "ch" else int(group))


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass."""
    return (x.round() - x).detach() + x


def clamp_ste(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Clamp in the forward pass, identity in the backward pass (keeps s and z trainable at the bounds)."""
    return (x.clamp(lo, hi) - x).detach() + x


def _grouped(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    out_features, in_features = weight.shape
    g = spec.group_len(in_features)
    return weight.reshape(out_features, in_features // g, g)


def init_scale_zero(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Step size and zero point (both ``out x n_groups``, float32) from each group's min and max."""
    wg = _grouped(weight.detach().float(), spec)
    wmin, wmax = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = ((wmax - wmin) / spec.qmax).clamp(SCALE_MIN, SCALE_MAX)
    zero = (-wmin / scale).clamp(-SCALE_MAX, SCALE_MAX).round()
    return scale, zero


def integer_zero(zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The zero point as it is stored: rounded and clamped to the integer grid."""
    return zero.round().clamp(0, spec.qmax)


def fake_quantize(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    spec: QuantSpec,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``weight`` with STE gradients to weight, scale and zero (see module doc).

    ``out_dtype`` casts the result (the matmul's dtype) inside the same fused kernel when compiled.
    """
    wg = _grouped(weight, spec)
    s = clamp_ste(scale, SCALE_MIN, SCALE_MAX).unsqueeze(-1)
    z = clamp_ste(round_ste(zero), 0, spec.qmax).unsqueeze(-1)
    q = torch.clamp(round_ste(wg / s) + z, 0, spec.qmax)
    out = ((q - z) * s).reshape(weight.shape)
    return out if out_dtype is None else out.to(out_dtype)


def quantize_to_int(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    spec: QuantSpec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Snap ``weight`` onto its grid: integer codes (out x in), float32 step sizes, integer zero points.

    Uses exactly the forward arithmetic of :func:`fake_quantize`, so the codes are the ones
    training saw; storing the step size in fp16 afterwards moves each weight by at most
    ``|q - z| * s * 2^-11``.
    """
    with torch.no_grad():
        wg = _grouped(weight.float(), spec)
        s = scale.float().clamp(SCALE_MIN, SCALE_MAX)
        z = integer_zero(zero.float(), spec)
        q = torch.clamp(torch.round(wg / s.unsqueeze(-1)) + z.unsqueeze(-1), 0, spec.qmax)
        return q.reshape(weight.shape).to(torch.int32), s, z.to(torch.int32)
