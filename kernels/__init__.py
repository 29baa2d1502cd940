"""Fused Triton dequant-matmul kernels for packed 2/3/4/8-bit weights (GPTQ-v2 layout).

Public entry points:

* :func:`dequant_linear` - ``x @ W^T + bias`` from packed codes, differentiable in x and scales;
* :func:`unpack_zeros` - the uint8 zero-point table the kernels read (build once per layer);
* :func:`check_supported` / :func:`is_supported` - the shape rules (K, N, group multiples of 32).

Files: ``unpack`` (in-kernel decode), ``gemv`` (M = 1 on CUDA cores; M <= 16 on tensor cores;
all split-K), ``half2`` (M <= 8 on paired fp16, offered to M = 4), ``kmajor`` (M = 1 over codes stored K-major,
whole columns a program), ``gemm`` (M > 16), ``dequant`` (decode to a
workspace + cuBLAS), ``backward`` (input and scale gradients), ``tiling`` (shared write-back and
launch helpers), ``prologue`` (a decoder layer's RMSNorm and residual add inside the decode
kernels), ``decode_attention`` (one decode step's rotary, cache write and attention),
``autograd`` (dispatch by M and the autograd Function), ``candidates`` (the tiles each kernel
may take), ``tuning`` (timing them, the json config cache).
"""

# With the repository root on sys.path (``python -m efficientqat.blockap`` run from it, or
# PYTHONPATH=$PWD), this folder is also importable as a top-level ``kernels``, the name of the
# Hugging Face hub-kernels package, and ``import transformers`` imports it to look for a version.
# Loaded under that name it stays an empty package: a second copy of the modules would register
# the ``efficientqat::dequant_matmul`` operator again (compiled models then launch the copy, with
# its own tuning memo, cache writer and split-K workspaces).
if __name__ == "efficientqat.kernels":
    from .autograd import DequantMatmulFn, check_supported, dequant_linear, is_supported, unpack_zeros
    from .prologue import RowOps

    __all__ = ["DequantMatmulFn", "RowOps", "check_supported", "dequant_linear", "is_supported", "unpack_zeros"]
