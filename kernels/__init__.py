"""Fused Triton dequant-matmul kernels for packed 2/3/4/8-bit weights (GPTQ-v2 layout).

Public entry points:

* :func:`dequant_linear` - ``x @ W^T + bias`` from packed codes, differentiable in x and scales;
* :func:`unpack_zeros` - the uint8 zero-point table the kernels read (build once per layer);
* :func:`check_supported` / :func:`is_supported` - the shape rules (K, N, group multiples of 32).

Files: ``unpack`` (in-kernel decode), ``gemv`` (M <= 16, split-K), ``gemm`` (larger M),
``backward`` (input and scale gradients), ``autograd`` (dispatch and the autograd Function),
``tuning`` (config choice and the on-disk cache).
"""

from .autograd import DequantMatmulFn, check_supported, dequant_linear, is_supported, unpack_zeros

__all__ = ["DequantMatmulFn", "check_supported", "dequant_linear", "is_supported", "unpack_zeros"]
