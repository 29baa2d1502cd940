"""Entry points: shape checks, M-based dispatch with tuned configs, and the autograd Function.

``dequant_linear(x, qweight, scales, zeros, bias, bits, group)`` is what ``PackedLinear`` calls.
M = 1 goes to the CUDA-core split-K kernel (the tensor-core one measured 30 against 16 us at
8192^2 w4g128 on an H200), M <= 16 to the tensor-core split-K kernels, both with the
paired-fp16 kernel (``half2.py``) as a challenger for fp16 x and M <= 4 (and at M = 1, for codes
stored K-major, the whole-column kernel of ``kmajor.py``; for layers that also hold their codes in
``mma`` fragment order, the ``mma.sync`` kernel of ``fragments.py`` at every M <= 16), larger M to the tiled
GEMM or to decode + cuBLAS (``dequant.py``): whichever the tuner measured faster for the shape.
When ``scales`` (or x) require grad, the call goes through :class:`DequantMatmulFn`, whose
backward returns the input gradient and the scale gradient and nothing for codes, zero points
or bias.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from efficientqat.fused_mlp import silu_mul_interleaved

from . import candidates, tuning
from .backward import grad_input, grad_scales
from .dequant import dense_forward, dense_grad_input, dense_grad_scales
from .gemm import gemm_forward
from .fragments import gemv_fragments_forward
from .gemv import gemv1_forward, gemv_tc_forward
from .half2 import gemv_half2_forward
from .kmajor import gemv_kmajor_forward, takes
from .prologue import NO_ROW_OPS, RowOps
from .tiling import group_strides, k_major_codes

log = logging.getLogger(__name__)

SMALL_M = 16
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_supported(K: int, N: int, bits: int, group: int) -> None:
    """Raise ValueError unless the kernels handle this layer (tiles are whole words and groups)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"Triton dequant-matmul supports bits in {SUPPORTED_BITS}, not {bits}")
    if K % 32 or N % 32:
        raise ValueError(
            f"Triton dequant-matmul needs in_features (K={K}) and out_features (N={N}) to be multiples of 32"
        )
    if group % 32 or K % group:
        raise ValueError(
            f"Triton dequant-matmul needs the group length ({group}) to be a multiple of 32 dividing K={K} "
            "(group_size 32/64/128/... or -1 per channel)"
        )


def is_supported(K: int, N: int, bits: int, group: int) -> bool:
    try:
        check_supported(K, N, bits, group)
    except ValueError:
        return False
    return True


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Packed qzeros ``[G, N*b/32]`` -> uint8 ``[G, N]`` (built once per layer and cached: the
    kernels then read one byte per zero point, with the same row stride as the scales)."""
    from efficientqat.packing import unpack_last_dim

    z = unpack_last_dim(qzeros, bits)[:, :out_features]
    return z.to(torch.uint8).contiguous()


def _key(kernel: str, x: torch.Tensor, M: int, N: int, K: int, bits: int, group: int, qweight: torch.Tensor) -> str:
    """The tuned-config key of a launch; layers with K-major codes (:func:`tiling.k_major_codes`)
    have keys of their own (so do launches offered fragment-order codes: the caller's suffix)."""
    return tuning.make_key(kernel + ("_kmajor" if k_major_codes(qweight) else ""), x.device, m=tuning.m_bucket(M),
                           n=N, k=K, bits=bits, group=group, dtype=str(x.dtype).replace("torch.", ""))


def _pick(default, others: dict[int, Callable]):
    """Launcher for a config: ``others[cfg.variant]`` where it has one (the dense decode + cuBLAS
    path, the paired-fp16 kernel, the K-major M = 1 kernel), else ``default``."""
    return lambda *args, cfg, **options: others.get(cfg.variant, default)(*args, cfg, **options)


def decode_candidates(x: torch.Tensor, M: int, N: int, K: int, bits: int, group: int,
                      k_major: bool = False) -> list[tuning.Config]:
    """M <= 16: the CUDA-core kernel's tiles at M = 1, else the tensor-core kernel's; for fp16 x
    the paired-fp16 kernel's after them. Every split-K tile also comes as its twin that reduces
    split-K in the kernel (:func:`candidates.with_launch_variants`); where decode launches chain
    (:func:`tuning.chains_decode_launches`), the tuner times them as they launch, under
    programmatic dependent launch (:func:`tuning.chained_twins`).

    At M = 1 with paired-fp16 tiles on offer, only the float32 kernel's first tile stays: it never
    won an fp16 key on the H200 (sessions 6-10, every tuned cache), and its tiles with their twins
    were a third to nearly half of what a key timed (35 of 78 on a 7B gate/up layer); a 3-bit 7B
    model's first start did not fit in 9 minutes.
    That one tile is the tuner's reference output and the fallback should the paired kernel's
    inline PTX not build. ``k_major`` (M = 1, fp16 x, a layer ``kmajor.takes``): the K-major
    kernel's tiles last."""
    sms = tuning.sm_count(x.device)
    paired = candidates.half2_candidates(M, N, K, bits, group, sms) if x.dtype == torch.float16 else []
    own = candidates.gemv1_candidates(N, K, bits, group, sms)[:1 if paired else None] if M == 1 else \
        candidates.gemv_tc_candidates(N, K, bits, group, x.dtype)
    whole = candidates.kmajor_candidates(N, K, bits, group) if k_major and M == 1 and x.dtype == torch.float16 else []
    return candidates.with_launch_variants(own) + candidates.with_launch_variants(paired) + whole


def forward_2d(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               bias: torch.Tensor | None, bits: int, group: int, silu_mul: bool = False,
               ops: RowOps = NO_ROW_OPS, fragments: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K]`` contiguous -> ``[M, N]``; no autograd. ``silu_mul``: ``silu(gate) * up`` of an
    interleaved gate/up layer (``efficientqat.fused_mlp``), ``[M, N / 2]``: in the paired-fp16
    kernel's epilogue where it applies, else after the matmul in PyTorch. ``ops``: RMSNorm x
    first and / or add a residual to y (:mod:`.prologue`): inside the decode kernels (M <= 16),
    a normalising launch tuned under its own key (the prologue is part of its cost), else in
    PyTorch around the matmul. ``fragments``: the same codes in ``mma`` fragment order
    (:func:`.fragments.fragment_codes`), whose kernel's tiles join the candidates at M <= 16 for
    fp16 x without a norm in ``ops`` (it adds a residual), under keys of their own."""
    M, K = x.shape
    N = qweight.shape[1]
    if silu_mul:
        return _forward_silu_mul(x, qweight, scales, zeros, bias, bits, group, ops, fragments)
    weights = (qweight, scales, zeros)
    if M <= SMALL_M:
        offer = fragments is not None and ops.norm_weight is None and x.dtype == torch.float16
        weights += (fragments,) if offer else ()
        cands, fn, name = lambda: decode_candidates(x, M, N, K, bits, group,
                                                    not ops.active and takes(qweight, bits, group)) + \
            (candidates.fragments_candidates(N, K, bits) if offer else []), \
            _pick(gemv1_forward if M == 1 else gemv_tc_forward,
                  {tuning.HALF2: gemv_half2_forward, tuning.KMAJOR: gemv_kmajor_forward}), \
            ("gemv1" if M == 1 else "gemv_tc") + ("_fragments" if offer else "")
        options = {"ops": ops} if ops.active else {}
        if ops.norm_weight is not None:
            name += "_norm"
        elif ops.active and k_major_codes(qweight):  # the K-major kernel takes no row ops: another choice
            name += "_residual"
    else:
        cands, fn, name = lambda: candidates.gemm_candidates(M, N, K, group), \
            _pick(gemm_forward, {tuning.DENSE: dense_forward}), "gemm"
        options = {}
        x = ops.before(x)

    def run(cfg: tuning.Config, weights: tuple[torch.Tensor, ...] = weights) -> torch.Tensor:
        if cfg.variant == tuning.FRAGMENTS:  # weights: codes, scales, zero points, the codes in fragment order
            return gemv_fragments_forward(x, weights[3], weights[1], weights[2], bias, bits, group, cfg,
                                          residual=ops.residual)
        return fn(x, *weights[:3], bias, bits, group, cfg=cfg, **options)

    cfg = tuning.choose(_key(name, x, M, N, K, bits, group, qweight), cands, run,
                        chain=M <= SMALL_M and tuning.chains_decode_launches(x.device),
                        copies=_on_copies(run, *weights))
    y = run(cfg)
    return y if options else ops.after(y)


def _on_copies(run: Callable[..., torch.Tensor], *weights: torch.Tensor
               ) -> Callable[[], list[Callable[[tuning.Config], torch.Tensor]]]:
    """For the tuner's chained timing (built only when it tunes): ``run`` bound to each of
    :func:`tuning.weight_copies` of the layer's ``weights``."""
    return lambda: [lambda cfg, w=w: run(cfg, w) for w in tuning.weight_copies(*weights)]


def _forward_silu_mul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      bias: torch.Tensor | None, bits: int, group: int, ops: RowOps,
                      fragments: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`forward_2d` with ``silu_mul``. At decode sizes the tiles whose kernel writes the
    epilogue and that sum in one program (in-kernel split-K reduction, or none): the paired-fp16
    kernel's (fp16, M <= ``tuning.HALF2_MAX_M``) and the tensor-core kernel's (M >= 2), tuned under
    their own key against the unfused path (the plain tuned matmul, then PyTorch's two elementwise
    launches: :data:`tuning.UNFUSED_CONFIG`). On an H200 the paired kernel with the epilogue won
    the 7B gate/up layer at M = 1 but took 68 us a call at M = 8 and 3 bits (session 11); at batch
    8 the unfused path's silu and mul launches cost ~5 us a layer (session 12 profile). With
    ``ops``' RMSNorm in the prologue, under a key of its own. ``fragments`` (codes in fragment
    order) reach the unfused path's matmul, whose tuner offers their kernel where it applies."""
    M, K = x.shape
    N = qweight.shape[1]
    name = "gemv_silu_mul_norm" if ops.norm_weight is not None else "gemv_silu_mul"
    key = _key(name + ("_fragments" if fragments is not None else ""), x, M, N, K, bits, group, qweight)
    layer = (qweight, scales, zeros) + ((fragments,) if fragments is not None else ())

    def unfused(weights: tuple[torch.Tensor, ...] = layer) -> torch.Tensor:
        frags = weights[3] if len(weights) > 3 else None  # rotated with the codes, as the tuner times them
        return silu_mul_interleaved(forward_2d(x, *weights[:3], bias, bits, group, ops=ops, fragments=frags))

    def writes_epilogue(cfg: tuning.Config) -> bool:
        kernel_has_it = cfg.variant == tuning.HALF2 or M > 1  # the M = 1 CUDA-core kernel has none
        return kernel_has_it and (cfg.fixup or cfg.split_k == 1)

    def cands() -> list[tuning.Config]:
        unfused()  # tunes the plain key first (on a miss, as here), so its challenger times a tuned launch
        return [c for c in decode_candidates(x, M, N, K, bits, group) if writes_epilogue(c)] + [tuning.UNFUSED_CONFIG]

    def run(cfg: tuning.Config, weights: tuple[torch.Tensor, ...] = layer) -> torch.Tensor:
        if cfg.variant == tuning.UNFUSED:
            return unfused(weights)
        kernel = gemv_half2_forward if cfg.variant == tuning.HALF2 else gemv_tc_forward
        return kernel(x, *weights[:3], bias, bits, group, cfg=cfg, silu_mul=True, ops=ops)

    has_kernel = M > 1 or x.dtype == torch.float16 and bits in tuning.HALF2_BITS
    if M <= SMALL_M and has_kernel and key not in _EPILOGUE_FAILED:
        try:
            return run(tuning.choose(key, cands, run, chain=tuning.chains_decode_launches(x.device),
                                     copies=_on_copies(run, *layer)))
        except Exception as err:  # an optional fusion: a compiler that cannot build it costs speed, not the run
            log.warning("the SiLU epilogue does not run here (%s: %s); silu(gate) * up runs after the matmul",
                        type(err).__name__, str(err).splitlines()[-1] if str(err) else "")
            _EPILOGUE_FAILED.add(key)
    return unfused()


_EPILOGUE_FAILED: set[str] = set()
"""Keys whose SiLU-epilogue launch raised (a Triton that cannot compile it): they take the
unfused path from then on, so the failure is paid and logged once."""


def backward_input_2d(dy: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      bits: int, group: int, K: int) -> torch.Tensor:
    M, N = dy.shape
    fn = _pick(grad_input, {tuning.DENSE: dense_grad_input})
    args = (dy, qweight, scales, zeros, bits, group, K)
    cfg = tuning.choose(_key("grad_input", dy, M, N, K, bits, group, qweight),
                        lambda: candidates.grad_input_candidates(M, N, K, group), lambda c: fn(*args, cfg=c))
    return fn(*args, cfg=cfg)


def backward_scales_2d(x: torch.Tensor, dy: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
                       bits: int, group: int) -> torch.Tensor:
    M, K = x.shape
    N = dy.shape[1]
    fn = _pick(grad_scales, {tuning.DENSE: dense_grad_scales})
    args = (x, dy, qweight, zeros, bits, group)
    cfg = tuning.choose(_key("grad_scales", x, M, N, K, bits, group, qweight),
                        lambda: candidates.grad_scales_candidates(M, N, K, group), lambda c: fn(*args, cfg=c))
    return fn(*args, cfg=cfg)


class DequantMatmulFn(torch.autograd.Function):
    """``y = x @ ((q - z) * s)^T + bias`` with gradients to ``x`` and ``s`` only."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, scales: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
                bias: torch.Tensor | None, bits: int, group: int) -> torch.Tensor:
        ctx.save_for_backward(x2d, scales, qweight, zeros)
        ctx.bits, ctx.group = bits, group
        return forward_2d(x2d, qweight, scales, zeros, bias, bits, group)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2d, scales, qweight, zeros = ctx.saved_tensors
        dy = dy.contiguous()
        dx = ds = None
        if ctx.needs_input_grad[0]:
            dx = backward_input_2d(dy, qweight, scales, zeros, ctx.bits, ctx.group, x2d.shape[1])
        if ctx.needs_input_grad[1]:
            ds = backward_scales_2d(x2d, dy, qweight, zeros, ctx.bits, ctx.group).to(scales.dtype)
        return dx, ds, None, None, None, None, None


def dequant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bias: torch.Tensor | None, bits: int, group: int, silu_mul: bool = False,
                   ops: RowOps = NO_ROW_OPS, fragments: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K]`` -> ``[..., N]`` = ``x @ W^T + bias`` with W decoded from packed codes.

    ``qweight``: int32 ``[K*b/32, N]`` (GPTQ layout; any strides: every kernel takes both, so the
    codes may be stored K-major, ``qweight.t().contiguous().t()``); ``scales``: ``[G, N]`` (any float dtype,
    may require grad); ``zeros``: uint8 ``[G, N]`` from :func:`unpack_zeros`, in the scales' layout
    (both N-major, or both column-major: :func:`.tiling.group_strides`); ``group``: the
    group length in columns (K for per-channel); ``silu_mul``: return ``silu(gate) * up``,
    ``[..., N / 2]``, of a gate/up layer in ``efficientqat.fused_mlp``'s interleaved order;
    ``ops``: ``RMSNorm(x)`` as the input and / or a residual ``[..., N]`` added to the output
    (:mod:`.prologue`: inside the decode kernels at inference); ``fragments``: the codes also in
    ``mma`` fragment order (:func:`.fragments.fragment_codes`), offered to the tuner at inference
    for M <= 16.
    """
    K = x.shape[-1]
    N = qweight.shape[1]
    check_supported(K, N, bits, group)
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"Triton dequant-matmul supports activations in {SUPPORTED_DTYPES}, not {x.dtype}")
    if qweight.shape[0] * 32 != K * bits or scales.shape != (K // group, N) or zeros.shape != scales.shape:
        raise ValueError("qweight/scales/zeros shapes do not match the input size, bits and group")
    if silu_mul and ops.residual is not None:
        raise ValueError("a residual cannot be added to silu(gate) * up: it joins a layer's output")
    ops.check(x, N)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, K).contiguous()
    if ops.residual is not None:
        ops = RowOps(ops.norm_weight, ops.eps, ops.residual.reshape(-1, N).contiguous())
    group_strides(scales, zeros)  # raises unless both share one layout, N-major or column-major
    if bias is not None:
        bias = bias.contiguous()
    if x2d.shape[0] == 0 or torch.is_grad_enabled() and (x2d.requires_grad or scales.requires_grad):
        if x2d.shape[0] == 0:
            y = x2d.new_zeros((0, N))
            if bias is not None:
                y = y + bias.to(x.dtype)
        else:
            y = DequantMatmulFn.apply(ops.before(x2d), scales, qweight, zeros, bias, bits, group)
        y = ops.after(silu_mul_interleaved(y) if silu_mul else y)
    elif torch.compiler.is_compiling():
        y = dequant_matmul(x2d, qweight, scales, zeros, bias, bits, group, silu_mul, ops.norm_weight, ops.eps,
                           ops.residual, fragments)
    else:
        y = forward_2d(x2d, qweight, scales, zeros, bias, bits, group, silu_mul, ops, fragments)
    return y.reshape(*lead, y.shape[-1])


@torch.library.custom_op("efficientqat::dequant_matmul", mutates_args=())
def dequant_matmul(x2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bias: torch.Tensor | None, bits: int, group: int, silu_mul: bool = False,
                   norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                   residual: torch.Tensor | None = None, fragments: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`forward_2d` as an opaque operator for ``torch.compile``: the compiler fuses the
    elementwise work around it (norms, rotary, residuals: most of a decode step's kernels, unless
    the norm and residual come in as ``norm_weight`` / ``residual``, see :mod:`.prologue`) and
    leaves the launch, with its tuned config, to us. Inference only (no autograd formula)."""
    return forward_2d(x2d, qweight, scales, zeros, bias, bits, group, silu_mul, RowOps(norm_weight, eps, residual),
                      fragments)


@dequant_matmul.register_fake
def _dequant_matmul_shape(x2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          bias: torch.Tensor | None, bits: int, group: int, silu_mul: bool = False,
                          norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                          residual: torch.Tensor | None = None, fragments: torch.Tensor | None = None) -> torch.Tensor:
    return x2d.new_empty((x2d.shape[0], qweight.shape[1] // 2 if silu_mul else qweight.shape[1]))
