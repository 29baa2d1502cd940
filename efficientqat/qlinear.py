"""Quantized linear layers: the fake-quant layer Block-AP trains, and the packed layer it ships.

``FakeQuantLinear`` keeps a float weight plus learnable step sizes and zero points and
quantize-dequantizes on every forward (gradients to all three by the STE).
``PackedLinear`` holds the integer codes packed GPTQ-v2 style (see :mod:`efficientqat.packing`),
frozen zero points and step sizes that E2E-QP may train. Its forward uses the fused Triton
dequant-matmul on CUDA when available and dequantize-then-matmul in PyTorch otherwise.
"""

from __future__ import annotations

import functools
from typing import Callable, Collection

import torch
import torch.nn.functional as F
from torch import nn

from efficientqat.errors import ConfigError
from efficientqat.packing import (
    chunk_values,
    group_index,
    pack_qweight,
    pack_qzeros,
    unpack_qweight,
    unpack_qzeros,
)
from efficientqat.quantizer import QuantSpec, fake_quantize, init_scale_zero, quantize_to_int
from efficientqat.row_ops import RowOps


def check_packable(in_features: int, out_features: int, spec: QuantSpec, name: str = "layer") -> None:
    """Raise a ConfigError naming the layer if its shape cannot be quantized/packed with ``spec``."""
    try:
        spec.group_len(in_features)
    except ConfigError as err:
        raise ConfigError(f"{name} ({out_features}x{in_features}): {err}") from None
    per_chunk = chunk_values(spec.bits)
    for what, size in (("in_features", in_features), ("out_features", out_features)):
        if size % per_chunk:
            raise ConfigError(
                f"{name} ({out_features}x{in_features}): {what}={size} is not a multiple of {per_chunk}, "
                f"which {spec.bits}-bit packing requires"
            )


@functools.lru_cache(maxsize=1)
def _compiled_fake_quantize() -> Callable[..., torch.Tensor]:
    """fake_quantize fused by torch.compile: one kernel instead of ~10 elementwise passes each way.

    Compiled once per process and shared by all layers (guards are on shapes and the spec, so
    every block of a model reuses the same few compiled kernels).
    """
    return torch.compile(fake_quantize, dynamic=False)


class FakeQuantLinear(nn.Module):
    """Linear layer trained with quantize-dequantize weights (Block-AP)."""

    def __init__(
        self, linear: nn.Linear, spec: QuantSpec, dtype: torch.dtype = torch.float32, compiled: bool = False
    ) -> None:
        super().__init__()
        self.compiled = compiled
        check_packable(linear.in_features, linear.out_features, spec)
        self.spec = spec
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().to(dtype).clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype).clone())
        scale, zero = init_scale_zero(self.weight, spec)
        self.scale = nn.Parameter(scale)
        self.zero = nn.Parameter(zero)

    def quantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        fn = _compiled_fake_quantize() if self.compiled else fake_quantize
        return fn(self.weight, self.scale, self.zero, self.spec, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        bias = self.bias
        return F.linear(x.to(dtype), self.quantized_weight(dtype), None if bias is None else bias.to(dtype))

    def to_packed(self, compute_dtype: torch.dtype = torch.float16) -> "PackedLinear":
        """Round the weights onto the grid and pack them (the end of a block's training)."""
        codes, scale, zero = quantize_to_int(self.weight, self.scale, self.zero, self.spec)
        return PackedLinear.from_codes(codes, scale, zero, self.bias, self.spec, compute_dtype)


class PackedLinear(nn.Module):
    """Linear layer over packed integer weights with per-group step sizes and zero points."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        bias: bool,
        compute_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_packable(in_features, out_features, spec)
        self.spec = spec
        self.in_features, self.out_features = in_features, out_features
        bits, g = spec.bits, spec.n_groups(in_features)
        self.register_buffer(
            "qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, device=device)
        )
        self.register_buffer("qzeros", torch.zeros(g, out_features * bits // 32, dtype=torch.int32, device=device))
        self.scales = nn.Parameter(
            torch.ones(g, out_features, dtype=torch.float16, device=device), requires_grad=False
        )
        self.register_buffer("g_idx", group_index(in_features, spec.group_len(in_features)).to(device))
        # the codes again in mma fragment order, an opt-in for decoding (store_codes_fragments); never saved
        self.register_buffer("fragment_codes", None, persistent=False)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=compute_dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bias: torch.Tensor | None,
        spec: QuantSpec,
        compute_dtype: torch.dtype = torch.float16,
    ) -> "PackedLinear":
        """Build from integer codes ``[N, K]``, step sizes ``[N, G]`` and integer zero points ``[N, G]``."""
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, spec, bias is not None, compute_dtype, device=codes.device)
        layer.qweight.copy_(pack_qweight(codes, spec.bits))
        layer.qzeros.copy_(pack_qzeros(zero.clamp(0, spec.qmax), spec.bits))
        layer.scales.data.copy_(scale.t().to(torch.float16))
        if bias is not None:
            layer.bias.copy_(bias.detach().to(compute_dtype))
        return layer

    def int_codes(self) -> torch.Tensor:
        """Integer codes ``[N, K]``."""
        return unpack_qweight(self.qweight, self.spec.bits)

    def int_zeros(self) -> torch.Tensor:
        """Integer zero points ``[N, G]``."""
        return unpack_qzeros(self.qzeros, self.spec.bits)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weight ``[N, K]`` = (q - z) * s; differentiable with respect to ``scales``."""
        g = self.spec.group_len(self.in_features)
        codes = self.int_codes().reshape(self.out_features, -1, g).float()
        zeros = self.int_zeros().float().unsqueeze(-1)
        w = (codes - zeros) * self.scales.t().float().unsqueeze(-1)
        w = w.reshape(self.out_features, self.in_features)
        return w if dtype is None else w.to(dtype)

    def kernel_zeros(self) -> torch.Tensor:
        """Zero points unpacked once to uint8 ``[G, N]`` for the Triton kernels (a load-time
        repack, cached on the module and outside the state dict; rebuilt if qzeros changes).
        A compiled graph takes the cache as it stands where it is on qzeros' device (the compiler
        cannot trace the data-pointer check; zero points are frozen at inference), so build it
        before compiling: :func:`prepare_kernel_zeros_`."""
        cached = getattr(self, "_kernel_zeros_cache", None)
        if torch.compiler.is_compiling():
            if cached is not None and cached[0][2] == self.qzeros.device:
                return cached[1]
        elif cached is not None and cached[0] == self._zeros_stamp():
            return cached[1]
        return self._build_kernel_zeros()

    def _zeros_stamp(self) -> tuple:
        return self.qzeros.data_ptr(), self.qzeros._version, self.qzeros.device

    @torch.compiler.disable
    def _build_kernel_zeros(self) -> torch.Tensor:
        """Unpack the zero points and reserve the device's split-K workspace, always eagerly: a
        compiled step that met an unbuilt cache traced this and torch 2.11's compiler crashed the
        process (segmentation fault while converting the frame, H200, session 14)."""
        from efficientqat.kernels import unpack_zeros
        from efficientqat.kernels.tiling import reserve_split_k_workspace

        reserve_split_k_workspace(self.qzeros.device)
        zeros = unpack_zeros(self.qzeros, self.spec.bits, self.out_features)
        if not self.scales.is_contiguous():  # column-major beside K-major codes (store_codes_k_major)
            zeros = torch.empty_like(self.scales, dtype=zeros.dtype).copy_(zeros)
        self._kernel_zeros_cache = (self._zeros_stamp(), zeros)
        return zeros

    def _use_kernel(self, x: torch.Tensor) -> bool:
        """Triton path: CUDA, fp16/bf16 activations, triton importable, shapes the kernels take.
        ``EFFICIENTQAT_KERNELS=0`` forces the PyTorch dequantize-then-matmul path (baseline)."""
        import os

        if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16):
            return False
        if os.environ.get("EFFICIENTQAT_KERNELS", "1") == "0":
            return False
        try:
            from efficientqat.kernels import is_supported
        except ImportError:  # no triton on this machine
            return False
        g = self.spec.group_len(self.in_features)
        return is_supported(self.in_features, self.out_features, self.spec.bits, g)

    def forward(self, x: torch.Tensor, silu_mul: bool = False, norm: nn.Module | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W^T + bias``; with ``silu_mul`` (a gate/up layer of :mod:`efficientqat.fused_mlp`)
        ``silu(gate) * up`` of it, half as many features. ``norm`` (an RMSNorm module): the layer
        reads ``norm(x)``; ``residual``: added to the output. At decode sizes the kernels do
        both (:mod:`efficientqat.row_ops`), sparing a decoder layer its elementwise launches."""
        ops = RowOps.of(norm, residual)
        if self._use_kernel(x):
            from efficientqat.kernels import dequant_linear

            g = self.spec.group_len(self.in_features)
            return dequant_linear(x, self.qweight, self.scales, self.kernel_zeros(), self.bias, self.spec.bits, g,
                                  silu_mul=silu_mul, ops=ops, fragments=self.fragment_codes)
        x = ops.before(x)
        w = self.dequantize_weight(x.dtype)
        y = F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        if silu_mul:
            from efficientqat.fused_mlp import silu_mul_interleaved

            y = silu_mul_interleaved(y)
        return ops.after(y)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.name}"


def prepare_kernel_zeros_(model: nn.Module) -> nn.Module:
    """Build the kernel zero points of every packed layer on a GPU now, eagerly, so that a
    compiled decode step finds them built (:meth:`PackedLinear.kernel_zeros`); a no-op where
    Triton is missing (those layers run the PyTorch path)."""
    try:
        import efficientqat.kernels  # noqa: F401 - the kernels' package, imported only where triton is
    except ImportError:
        return model
    for module in model.modules():
        if isinstance(module, PackedLinear) and module.qzeros.is_cuda:
            module.kernel_zeros()
    return model


def store_codes_k_major(model: nn.Module, bits: Collection[int] = (2, 4)) -> nn.Module:
    """Store the packed layers of ``bits`` with their codes K-major, in place: the same ``qweight
    [K b / 32, N]`` with transposed storage (``qweight.t().contiguous().t()``, each output column's
    words contiguous), and their scales and kernel zero points column-major beside them (``[G, N]``
    with strides ``(1, G)``: a column's groups contiguous).

    The M = 1 decode kernel over whole columns (``kernels/kmajor.py``: no split-K, no atomics)
    then applies, and reads each column's codes, scales and zero points as contiguous runs; every
    other kernel and the PyTorch path read either layout through strides. On an H200 (session 20,
    BENCHMARKS.md) it took 11.9 against 12.9 µs at 8192^2 w4g128 and 10.2 against 10.5 at w2g64,
    but 12.4 against 11.9 at w3g128, hence the default ``bits``; the other kernels are tuned for
    N-major layers (M = 16: 25.7 against 25.3 µs), so this is an opt-in for batch-1 decoding.
    A checkpoint saved from the model is N-major as always (its state dict is made contiguous
    when saved)."""
    for module in model.modules():
        if (isinstance(module, PackedLinear) and module.spec.bits in bits
                and not module.qweight.t().is_contiguous()):
            module.qweight = module.qweight.t().contiguous().t()
            module.scales.data = module.scales.data.t().contiguous().t()
            module.__dict__.pop("_kernel_zeros_cache", None)  # rebuilt in the scales' layout
    return model


def store_codes_fragments(model: nn.Module, bits: Collection[int] = (2, 3, 4)) -> nn.Module:
    """Give the packed layers of ``bits`` (2, 3 or 4) whose shapes allow it a second copy of
    their codes in ``mma`` fragment order (``fragment_codes``, a buffer outside the state dict:
    ``kernels/fragments.fragment_codes``), in place. The tuner then also offers those layers the
    ``mma.sync`` decode kernel (``kernels/fragments.py``) at M <= 16 for fp16 x and calls without a
    fused norm or SiLU epilogue (the kernel adds a residual itself), under keys of their own.
    Shapes it takes (``fragments.takes``): N a multiple of 16, groups of 64k, K a multiple of 64
    (4-bit), 128 (2-bit) or 256 (3-bit).

    On an H200 (session 26, BENCHMARKS.md; ``bench_kernels.py --fragments``) tuned 8192^2 layers
    took, against the N-major codes alone (sessions 25 and 26): w4g128 11.6 / 11.9 / 16.0 µs at
    M = 1 / 4 / 16 against 13.0 / 22.9 / 25.2; w3g128 11.4 / 11.9 / 16.2 against 12.0 / 23.9 /
    41.5; w2g64 11.2 / 11.8 / 15.8 against 10.9 / 21.1 / 35.6 (at M = 1 the tuner may keep the
    N-major kernel). The codes are held twice (every other kernel, the backward and prefill read
    ``qweight``): 0.5 bytes a weight more at 4 bits, hence an opt-in for decoding. A no-op where
    Triton is missing."""
    try:
        from efficientqat.kernels.fragments import fragment_codes, takes
    except ImportError:
        return model
    for module in model.modules():
        if (isinstance(module, PackedLinear) and module.spec.bits in bits
                and takes(module.spec.bits, module.spec.group_len(module.in_features), module.out_features,
                          module.in_features)):
            module.fragment_codes = fragment_codes(module.qweight, module.spec.bits)
    return model
