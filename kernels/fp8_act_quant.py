"""FP8 (e4m3) activation quantisation fused into the op that produces the activation, for the Wan DiT's FP8
linear layers (reactor_graph/models/fp8_linear.py).

Why fused: an FP8 matmul needs its input in e4m3 with a scale. Quantising as a separate pass (read the bf16
activation, find each row's amax, write e4m3) cost +33 ms a Self-Forcing block against the 28 ms the FP8
matmuls saved (bench/RESULTS.md, issue 22). Here the quantisation is the epilogue of the kernel that makes the
activation anyway, so the activation is written once, as e4m3 (half the bytes of bf16):

    norm_quant        LayerNorm (no affine, or affine) of the float32 residual stream [B, L, D], optionally the
                      per-frame adaLN modulation h * (1 + scale) + shift of Wan's `_modulate`, then per-row e4m3.
                      Replaces the LayerNorm/modulate kernel before the q/k/v, cross-attention q and FFN inputs.
    act_quant         per-row e4m3 of a bf16 matrix [M, N], optionally + bias and tanh-GELU first: the FFN's hidden
                      activation after its first (FP8, bias-free) matmul, and the attention outputs before the o
                      projections.

The file reads top to bottom: kernels (`@triton.jit`) -> launchers (`_*_triton`) -> torch references
(`*_reference`) -> public functions (`modulate_quant`, `layernorm_quant`, `gelu_quant`, `quantize_rows`), which
pick the Triton kernel for CUDA tensors (or for any tensor when the module was imported with TRITON_INTERPRET=1)
and the reference otherwise.

Quantisation (shared exactly by kernels and references)
    Per row (one token): amax = max |h| over the row (at least 1e-12, so a zero row gets a finite scale),
    q = e4m3(clamp(h * (448 / amax), -448, 448)) rounded to nearest even, scale = amax / 448 (float32 [rows, 1]);
    448 / amax is the correctly rounded float32 quotient on every path (`div_rn` in the kernels), so a product
    that lands on an e4m3 tie -- frequent with bf16 inputs -- rounds the same way in kernel and reference.
    h ~= q * scale: the layout `torch._scaled_mm` takes as scale_a for row-wise scaling. The clamp keeps the
    product's float rounding (448 / amax is not exact) from reaching e4m3fn's NaN past 464.

Interpreter
    Triton's interpreter casts float32 to float8 wrongly, so an interpreted kernel writes float32 values that are
    already rounded to e4m3 (`_e4m3_round`: exact integer rounding on the float's bits, no float8 type involved)
    and the launcher casts them to e4m3 in torch (exact: they are representable). On a GPU the kernel stores real
    e4m3 (the hardware's round-to-nearest-even conversion). A launcher given `emulate=True` on a GPU does what the
    interpreter does, so the rounding code is checked against the hardware there too.

Row reductions: the norm kernel holds a row of D <= 16384 in registers (D = 1536 for the 1.3B model); the act
kernel walks rows of any width (8960, the FFN's) in column chunks of BLOCK_N, twice: amax, then quantise (the
second pass re-reads the row, which is still in L1/L2), so nothing spills at 8960 wide.

Only core builtins and this file's own `@triton.jit` helpers are called (reductions by `tl.reduce` with a combine
function here, not `tl.sum` / `tl.max`): the standard library's helpers are decorated when triton is imported, so in
a copy of this module imported later with TRITON_INTERPRET=1 (the tests) they would be compiled-mode functions.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from reactor_graph.kernels.triton_or_stub import HAVE_TRITON as _HAVE_TRITON, tl, triton  # stand-ins without Triton

__all__ = ["FP8", "FP8_MAX", "AMAX_FLOOR", "modulate_quant", "layernorm_quant", "gelu_quant", "quantize_rows",
           "norm_quant", "act_quant", "norm_quant_reference", "act_quant_reference", "quantize_rows_reference",
           "backend_for"]

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-12
_MAX_NORM_D = 16384


# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _e4m3_round(v):
    """v (float32, already in [-448, 448]) -> the nearest e4m3 value, ties to even, as float32.

    e4m3 has 3 mantissa bits: within the binade [2^e, 2^(e+1)) its step is 2^(e-3); below 2^-6 (subnormals)
    the step stays 2^-9. Both powers of two are built from the exponent bits, so v / step is exact and the
    rounding to an integer is the float32 add-and-subtract of 1.5 * 2^23 (exact for |v / step| < 16)."""
    bits = v.to(tl.int32, bitcast=True)
    a = tl.abs(v)
    e = (bits >> 23) & 0xFF  # biased exponent
    e = tl.maximum(e, 121)  # 2^-6 = biased 121: the subnormal range shares its step
    step = ((e - 3) << 23).to(tl.float32, bitcast=True)
    inv_step = ((257 - e) << 23).to(tl.float32, bitcast=True)
    r = ((a * inv_step + 12582912.0) - 12582912.0) * step
    # v's sign bit onto |result| (so -tiny rounds to -0, as the hardware's conversion)
    return (r.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _store_e4m3(q_ptrs, h, inv, mask, EMULATE: tl.constexpr):
    v = tl.minimum(tl.maximum(h * inv, -448.0), 448.0)
    if EMULATE:
        v = _e4m3_round(v)
    tl.store(q_ptrs, v.to(q_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _gelu_tanh(v):
    # tanh(u) = 1 - 2 / (exp(2u) + 1): exp overflowing to inf gives 1, underflowing to 0 gives -1
    u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
    t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
    return 0.5 * v * (1.0 + t)


@triton.jit
def _norm_quant_kernel(
    x_ptr, q_ptr, s_ptr, w_ptr, b_ptr, sh_ptr, sc_ptr,
    L, D, tokens_per_frame,
    sx_b, sx_l, sx_d,
    ssh_b, ssh_f, ssh_d,
    ssc_b, ssc_f, ssc_d,
    eps,
    HAS_AFFINE: tl.constexpr, HAS_MOD: tl.constexpr, EMULATE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per token (row of [B*L, D]); the whole row in registers
    row = tl.program_id(0)
    b = row // L
    l = row - b * L
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + b.to(tl.int64) * sx_b + l.to(tl.int64) * sx_l + cols * sx_d, mask=mask, other=0.0)
    x = x.to(tl.float32)
    mean = tl.reduce(x, 0, _add) / D
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.reduce(xc * xc, 0, _add) / D
    h = xc * (1.0 / tl.sqrt(var + eps))
    if HAS_AFFINE:
        h = h * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        h = h + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_MOD:
        f = l // tokens_per_frame
        sh = tl.load(sh_ptr + b.to(tl.int64) * ssh_b + f * ssh_f + cols * ssh_d, mask=mask, other=0.0)
        sc = tl.load(sc_ptr + b.to(tl.int64) * ssc_b + f * ssc_f + cols * ssc_d, mask=mask, other=0.0)
        h = h * (1.0 + sc.to(tl.float32)) + sh.to(tl.float32)
    h = tl.where(mask, h, 0.0)
    amax = tl.maximum(tl.reduce(tl.abs(h), 0, _max), 1e-12)
    _store_e4m3(q_ptr + row.to(tl.int64) * D + cols, h, tl.math.div_rn(448.0, amax), mask, EMULATE)
    tl.store(s_ptr + row, amax / 448.0)


@triton.jit
def _act_quant_kernel(
    y_ptr, bias_ptr, q_ptr, s_ptr,
    N, sy_m, sy_n,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, EMULATE: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    # one program per row; two passes over column chunks (amax, then quantise) so any width fits
    row = tl.program_id(0)
    y_row = y_ptr + row.to(tl.int64) * sy_m
    q_row = q_ptr + row.to(tl.int64) * N
    run = tl.full([BLOCK_N], 0.0, tl.float32)
    for c in range(CHUNKS):  # a constexpr trip count (Triton 3.6's interpreter cannot loop to a runtime N)
        cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = cols < N
        v = tl.load(y_row + cols * sy_n, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v = v + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            v = _gelu_tanh(v)
        run = tl.maximum(run, tl.where(mask, tl.abs(v), 0.0))
    amax = tl.maximum(tl.reduce(run, 0, _max), 1e-12)
    inv = tl.math.div_rn(448.0, amax)
    for c in range(CHUNKS):
        cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = cols < N
        v = tl.load(y_row + cols * sy_n, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v = v + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            v = _gelu_tanh(v)
        _store_e4m3(q_row + cols, v, inv, mask, EMULATE)
    tl.store(s_ptr + row, amax / 448.0)


# Whether `triton.jit` above made interpreted kernels (TRITON_INTERPRET=1 at import).
_INTERPRET = _HAVE_TRITON and not isinstance(_norm_quant_kernel, triton.JITFunction)


# -------------------------------------------------------------------------------------------- launchers


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _outputs(shape, device, emulate: bool):
    """q (e4m3; float32 holding e4m3 values when emulating) and scale [rows..., 1] float32."""
    q = torch.empty(shape, dtype=torch.float32 if emulate else FP8, device=device)
    s = torch.empty((*shape[:-1], 1), dtype=torch.float32, device=device)
    return q, s


def _frame_view(t: torch.Tensor, b: int, frames: int, d: int) -> torch.Tensor:
    """shift/scale [B, F, 1, D] (a slice of the modulation) or [B, F, D] -> a [B, F, D] view (no copy)."""
    if t.dim() == 4:
        t = t.squeeze(2)
    if t.dim() != 3 or t.shape[-1] != d or t.shape[1] != frames or t.shape[0] not in (1, b):
        raise ValueError(f"modulation of shape {list(t.shape)} does not fit [B={b}, F={frames}, 1, D={d}]")
    return t.expand(b, frames, d)


def _norm_quant_triton(x, weight, bias, shift, scale, frames: int, eps: float, emulate: bool | None = None):
    emulate = _INTERPRET if emulate is None else emulate
    b, n, d = x.shape
    if d > _MAX_NORM_D:
        raise ValueError(f"norm_quant holds a row in registers: D={d} > {_MAX_NORM_D}")
    q, s = _outputs(x.shape, x.device, emulate)
    has_mod = shift is not None
    if has_mod:
        shift, scale = _frame_view(shift, b, frames, d), _frame_view(scale, b, frames, d)
    sh = shift if has_mod else x
    sc = scale if has_mod else x
    block = _next_pow2(d)
    warps = max(1, min(16, block // 256))
    with _device_guard(x):
        _norm_quant_kernel[(b * n,)](
            x, q, s, weight if weight is not None else x, bias if bias is not None else x, sh, sc,
            n, d, n // frames,
            *x.stride(), *(sh.stride() if has_mod else (0, 0, 0)), *(sc.stride() if has_mod else (0, 0, 0)),
            float(eps),
            HAS_AFFINE=weight is not None, HAS_MOD=has_mod, EMULATE=emulate, BLOCK_D=block, num_warps=warps)
    return (q.to(FP8) if emulate else q), s


def _act_quant_triton(y, bias, gelu: bool, emulate: bool | None = None, block_n: int = 1024):
    emulate = _INTERPRET if emulate is None else emulate
    n = y.shape[-1]
    y2 = y.reshape(-1, n)  # a view for the usual [M, N] / [B, L, N] layouts
    q, s = _outputs(y.shape, y.device, emulate)
    block = min(block_n, _next_pow2(n))
    with _device_guard(y):
        _act_quant_kernel[(y2.shape[0],)](
            y2, bias if bias is not None else y2, q, s, n, *y2.stride(),
            HAS_BIAS=bias is not None, GELU=gelu, EMULATE=emulate, BLOCK_N=block, CHUNKS=-(-n // block),
            num_warps=4)
    return (q.to(FP8) if emulate else q), s


# ------------------------------------------------------------------------------------------- references


def quantize_rows_reference(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h [..., K] (any float dtype) -> (e4m3 [..., K], float32 scale [..., 1]) with h ~= q * scale."""
    h = h.float()
    amax = h.abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_FLOOR)
    # a tensor numerator: `448 / amax` with a Python float is reciprocal(amax) * 448 in torch, 1 ulp off at times,
    # which moves values sitting on an e4m3 tie (common for bf16 inputs) to the other side
    inv = torch.full_like(amax, FP8_MAX) / amax
    q = (h * inv).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, amax / FP8_MAX


def _modulate_reference(h, shift, scale, frames: int):
    b, n, d = h.shape
    shift, scale = _frame_view(shift, b, frames, d), _frame_view(scale, b, frames, d)
    h = h.view(b, frames, n // frames, d) * (1 + scale[:, :, None].float()) + shift[:, :, None].float()
    return h.view(b, n, d)


def norm_quant_reference(x, weight=None, bias=None, shift=None, scale=None, frames: int = 1, eps: float = 1e-6):
    """What `norm_quant` computes, in torch: LayerNorm in float32 (WanLayerNorm), the modulation, e4m3 rows."""
    w = None if weight is None else weight.float()
    bb = None if bias is None else bias.float()
    h = F.layer_norm(x.float(), (x.shape[-1],), w, bb, eps)
    if shift is not None:
        h = _modulate_reference(h, shift, scale, frames)
    return quantize_rows_reference(h)


def act_quant_reference(y, bias=None, gelu: bool = False):
    """What `act_quant` computes, in torch: (y + bias), tanh-GELU, e4m3 rows, all in float32."""
    v = y.float()
    if bias is not None:
        v = v + bias.float()
    if gelu:
        v = F.gelu(v, approximate="tanh")
    return quantize_rows_reference(v)


# ------------------------------------------------------------------------------------- public functions


def backend_for(t: torch.Tensor) -> str:
    """'triton-interpret', 'triton' or 'torch': which implementation the public functions use for `t`."""
    if _INTERPRET:
        return "triton-interpret"
    if _HAVE_TRITON and t.is_cuda:
        return "triton"
    return "torch"


def _check_norm(x, weight, bias, shift, scale, frames):
    if x.dim() != 3:
        raise ValueError(f"expected x [B, L, D], got shape {list(x.shape)}")
    if (shift is None) != (scale is None):
        raise ValueError("shift and scale come together")
    if (weight is None) != (bias is None):
        raise ValueError("an affine LayerNorm needs both weight and bias")
    if frames < 1 or x.shape[1] % frames:
        raise ValueError(f"{x.shape[1]} tokens do not split into {frames} frames")


def norm_quant(x, weight=None, bias=None, shift=None, scale=None, frames: int = 1, eps: float = 1e-6):
    """x [B, L, D] (float32, the residual stream) -> LayerNorm (affine with weight/bias [D]) -> optional
    per-frame modulation (shift/scale [B, F, 1, D], frame-major tokens) -> (e4m3 [B, L, D], scale [B, L, 1])."""
    _check_norm(x, weight, bias, shift, scale, frames)
    if backend_for(x) == "torch":
        return norm_quant_reference(x, weight, bias, shift, scale, frames, eps)
    return _norm_quant_triton(x, weight, bias, shift, scale, frames, eps)


def modulate_quant(x, shift, scale, frames: int, eps: float = 1e-6):
    """Wan's `_modulate(WanLayerNorm(x), shift, scale, frames)` quantised per token: (e4m3 [B, L, D],
    scale [B, L, 1])."""
    return norm_quant(x, shift=shift, scale=scale, frames=frames, eps=eps)


def layernorm_quant(x, weight=None, bias=None, eps: float = 1e-6):
    """LayerNorm (optionally affine: the cross-attention's norm3) quantised per token."""
    return norm_quant(x, weight, bias, eps=eps)


def act_quant(y, bias=None, gelu: bool = False):
    """y [..., N] -> (y + bias), tanh-GELU if `gelu`, quantised per row: (e4m3 [..., N], scale [..., 1])."""
    if bias is not None and bias.shape != (y.shape[-1],):
        raise ValueError(f"bias of shape {list(bias.shape)} does not fit rows of {y.shape[-1]}")
    if backend_for(y) == "torch":
        return act_quant_reference(y, bias, gelu)
    return _act_quant_triton(y, bias, gelu)


def gelu_quant(y, bias=None):
    """The FFN's hidden activation: tanh-GELU(y + bias) quantised per row (y: the first matmul's output)."""
    return act_quant(y, bias, gelu=True)


def quantize_rows(x):
    """x [..., K] quantised per row (an attention output before its o projection)."""
    return act_quant(x)
