"""Colour conversion between RGB and 4:2:0 YUV (planar ``yuv420p`` and semi-planar ``nv12``).

The kernel family follows the layout of the Triton tutorials:

    kernel (``_rgb_to_yuv420_kernel`` / ``_yuv420p_to_rgb_kernel``)
      -> launcher (``_rgb_to_yuv420_triton`` / ``_yuv420p_to_rgb_triton``)
      -> torch reference (``*_reference``)
      -> public dispatching functions (``rgb_to_yuv420p``, ``rgb_to_nv12``, ``yuv420p_to_rgb``)
      -> ``benchmark()`` (GB/s against torch eager, torch.compile and a copy-bandwidth floor).

Conventions (shared exactly by the Triton kernels and the torch references)
---------------------------------------------------------------------------
* RGB in: ``[T, 3, H, W]``; uint8 codes in [0, 255], or float (fp32/fp16/bf16) in [-1, 1].
  Values are mapped to unit range ``u = x * scale + bias`` (uint8: ``x * (1/255)``; float:
  ``x * 0.5 + 0.5``) and clamped to [0, 1] in float32.
* YUV is limited ("TV") range: Y in [16, 235], U/V in [16, 240], matrix BT.601 or BT.709::

      Y = 16  + 219 * (Kr*R + Kg*G + Kb*B)
      U = 128 + 112 * (B - Y') / (1 - Kb)
      V = 128 + 112 * (R - Y') / (1 - Kr)

  Codes are rounded half-up (``floor(v + 0.5)``) after clamping to the legal range.
* Chroma siting / subsampling: U and V of a 2x2 pixel quad are computed from the mean of the
  quad's four *unit-range, clamped RGB* values (``((top_even + bottom_even) + (top_odd +
  bottom_odd)) * 0.25``), which equals the mean of the four unrounded float U/V values since the
  transform is linear. Chroma is thus centred in the quad (MPEG-1/JPEG siting); nothing is
  rounded before averaging.
* Output ``[T, H*3//2, W]`` uint8 with every frame packed exactly as PyAV's
  ``av.VideoFrame.from_ndarray(arr, format=...)`` reads it:

  - ``yuv420p``: flat per frame: Y (H*W bytes, row-major), then U (H/2 rows of W/2), then V
    (H/2 rows of W/2). The U plane therefore spans rows ``H .. H + H/4`` of the [H*3//2, W]
    array *as flat memory* (one array row holds two U rows), and V the last H/4 rows.
  - ``nv12``: Y (H rows of W), then H/2 rows of W bytes holding interleaved ``U0 V0 U1 V1 ...``.
* YUV -> RGB (``yuv420p_to_rgb``): chroma is upsampled by nearest neighbour (each quad reuses its
  U/V), inverse limited-range matrix, clamp to [0, 1], then uint8 ``floor(255*v + 0.5)`` or float
  ``2*v - 1`` cast to the requested dtype.

Dispatch: the Triton kernels run when the tensor is on CUDA, or for any device when
``TRITON_INTERPRET=1`` is set in the environment at call time (Triton's interpreter, on CPU
tensors). Otherwise, or where triton is not installed, the torch reference runs. Kernels are
``triton.jit``-decorated lazily on first use and cached per mode (compiled / interpreted),
because ``triton.jit`` decides between the two when it decorates.

Strides: RGB input and RGB output may have arbitrary strides (they are passed to the kernel; no
``.contiguous()`` copy). YUV buffers must be contiguous within each frame (the planes are packed
flat); their frame stride may be anything, so ``out`` may be a slice along T of a larger buffer.
A YUV *input* that is not frame-contiguous is copied with ``.contiguous()``.

Only Triton builtins available since Triton 3.0 (so in 3.6) are used: ``tl.program_id``,
``tl.arange``, masked ``tl.load`` / ``tl.store``, arithmetic, ``tl.minimum`` / ``tl.maximum``,
``.to`` and, to pair/interleave even and odd columns in registers, ``tl.reshape`` /
``tl.split`` / ``tl.join``.
"""


import json
import os
import sys
from typing import Optional

import torch

try:  # guarded: the module (and its torch references) must import where triton is missing
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is absent or broken
    triton = None
    _HAVE_TRITON = False

    class tl:  # noqa: N801 - stand-in so the kernel annotations below evaluate; never launched
        constexpr = object


__all__ = [
    "MATRICES",
    "rgb_to_yuv420p",
    "rgb_to_nv12",
    "yuv420p_to_rgb",
    "rgb_to_yuv420p_reference",
    "rgb_to_nv12_reference",
    "yuv420p_to_rgb_reference",
    "benchmark",
]

# (Kr, Kb) luma weights; Kg = 1 - Kr - Kb.
MATRICES = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}

_RGB_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16)
_FLOAT_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_Y_LO, _Y_HI = 16.0, 235.0
_C_LO, _C_HI = 16.0, 240.0


# --------------------------------------------------------------------------------------------
# coefficients (python floats; the kernels receive them as fp32 scalars, the references multiply
# fp32 tensors by them, so both use the same fp32 values)
# --------------------------------------------------------------------------------------------
def _check_matrix(matrix: str, fn: str) -> str:
    if not isinstance(matrix, str) or matrix.lower() not in MATRICES:
        raise ValueError(f"{fn}: got matrix={matrix!r}; accepted: {sorted(MATRICES)}")
    return matrix.lower()


def _forward_coeffs(matrix: str):
    kr, kb = MATRICES[matrix]
    kg = 1.0 - kr - kb
    ky = (219.0 * kr, 219.0 * kg, 219.0 * kb)
    ku = (-112.0 * kr / (1.0 - kb), -112.0 * kg / (1.0 - kb), 112.0)
    kv = (112.0, -112.0 * kg / (1.0 - kr), -112.0 * kb / (1.0 - kr))
    return ky, ku, kv


def _inverse_coeffs(matrix: str):
    """(y_scale, c_scale, cv_r, cu_g, cv_g, cu_b) with Y' = (Y-16)*y_scale, Pb = (U-128)*c_scale."""
    kr, kb = MATRICES[matrix]
    kg = 1.0 - kr - kb
    cv_r = 2.0 * (1.0 - kr)
    cu_b = 2.0 * (1.0 - kb)
    cu_g = -cu_b * kb / kg
    cv_g = -cv_r * kr / kg
    return 1.0 / 219.0, 1.0 / 224.0, cv_r, cu_g, cv_g, cu_b


def _unit_scale_bias(dtype: torch.dtype):
    return (1.0 / 255.0, 0.0) if dtype == torch.uint8 else (0.5, 0.5)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _even_size_error(fn: str, h: int, w: int) -> ValueError:
    he, we = h - h % 2, w - w % 2
    return ValueError(
        f"{fn}: got height={h}, width={w}; 4:2:0 chroma subsampling needs an even height and an "
        f"even width. Crop to {he}x{we} (e.g. x[..., :{he}, :{we}]) or pad to "
        f"{h + h % 2}x{w + w % 2} before converting."
    )


def _check_rgb(rgb, fn: str):
    if not isinstance(rgb, torch.Tensor):
        raise ValueError(f"{fn}: expected a torch.Tensor [T, 3, H, W], got {type(rgb).__name__}")
    if rgb.dim() != 4 or rgb.shape[1] != 3:
        raise ValueError(
            f"{fn}: expected rgb of shape [T, 3, H, W] (rank 4, 3 channels), got shape "
            f"{tuple(rgb.shape)}"
        )
    if rgb.dtype not in _RGB_DTYPES:
        raise ValueError(
            f"{fn}: got dtype {rgb.dtype}; accepted: torch.uint8 (codes in [0, 255]) or "
            f"torch.float32 / torch.float16 / torch.bfloat16 (values in [-1, 1])"
        )
    t, _, h, w = rgb.shape
    if h % 2 or w % 2:
        raise _even_size_error(fn, h, w)
    return t, h, w


def _check_yuv(yuv, fn: str):
    if not isinstance(yuv, torch.Tensor):
        raise ValueError(f"{fn}: expected a torch.Tensor [T, H*3//2, W], got {type(yuv).__name__}")
    if yuv.dim() != 3:
        raise ValueError(
            f"{fn}: expected yuv420p of shape [T, H*3//2, W] (rank 3), got shape {tuple(yuv.shape)}"
        )
    if yuv.dtype != torch.uint8:
        raise ValueError(f"{fn}: got dtype {yuv.dtype}; accepted: torch.uint8")
    t, rows, w = yuv.shape
    if rows % 3:
        raise ValueError(
            f"{fn}: got {rows} rows; a yuv420p frame has H*3//2 rows for an even H, so the row "
            f"count must be a multiple of 3"
        )
    h = rows * 2 // 3
    if w % 2:
        raise _even_size_error(fn, h, w)
    return t, h, w


def _check_out(out, shape, dtype, device, fn: str, frame_packed: bool):
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{fn}: out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"{fn}: out must have shape {tuple(shape)}, dtype {dtype}, device {device}; got shape "
            f"{tuple(out.shape)}, dtype {out.dtype}, device {out.device}"
        )
    if frame_packed and out.numel() and not (out.stride(2) == 1 and (out.shape[1] == 1 or out.stride(1) == out.shape[2])):
        raise ValueError(
            f"{fn}: out must be contiguous within each frame (strides (*, {shape[2]}, 1)), got "
            f"strides {tuple(out.stride())}; its frame stride may be anything"
        )


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------
def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _backend_for(t: torch.Tensor) -> str:
    """'triton-interpret', 'triton' or 'torch': which implementation the public functions use."""
    if not _HAVE_TRITON:
        return "torch"
    if _interpret_requested():
        return "triton-interpret"
    if t.is_cuda:
        return "triton"
    return "torch"


# --------------------------------------------------------------------------------------------
# Triton kernels (plain python functions; jitted lazily by _kernel())
#
# Tiling: program (row, col) with row = t * (H/2) + cy handles chroma row cy of frame t, i.e.
# pixel rows 2*cy and 2*cy+1, over the 2*BLOCK_C contiguous pixel columns of column tile `col`.
# Pixel data is loaded/stored as 1-D contiguous runs along W (coalesced, and vectorised to
# 8-16 bytes per thread when W is a multiple of 16 and the innermost stride is 1). Only the
# chroma path views a run as [BLOCK_C, 2] quads: tl.reshape + tl.split pairs even/odd columns
# and tl.join + tl.reshape interleaves them back; with the default layouts these are register
# renamings (no shared memory). Builtins only (no standard-library @jit helpers such as
# tl.sum, which would be fixed to compiled mode when triton is imported and break the lazily
# decorated interpreter path). All used ops exist since Triton 3.0; the kernels were compiled to
# sm_90 cubin with Triton 3.6.0 and 3.9.0 (CPU-only AOT compile).
# --------------------------------------------------------------------------------------------
def _rgb_to_yuv420_kernel(
    rgb_ptr, out_ptr,
    H, W,
    s_t, s_c, s_h, s_w,
    o_t,
    in_scale, in_bias,
    ky_r, ky_g, ky_b,
    ku_r, ku_g, ku_b,
    kv_r, kv_g, kv_b,
    NV12: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_row = tl.program_id(0)
    pid_col = tl.program_id(1)
    HC = H // 2
    WC = W // 2
    t = pid_row // HC
    cy = pid_row - t * HC
    y0 = 2 * cy

    px = pid_col * (2 * BLOCK_C) + tl.arange(0, 2 * BLOCK_C)   # pixel columns [2*BLOCK_C]
    mask_p = px < W

    in_top = rgb_ptr + t.to(tl.int64) * s_t + y0.to(tl.int64) * s_h
    in_bot = in_top + s_h
    off_p = px * s_w
    r_t = tl.load(in_top + off_p, mask=mask_p, other=0).to(tl.float32)
    r_b = tl.load(in_bot + off_p, mask=mask_p, other=0).to(tl.float32)
    g_t = tl.load(in_top + s_c + off_p, mask=mask_p, other=0).to(tl.float32)
    g_b = tl.load(in_bot + s_c + off_p, mask=mask_p, other=0).to(tl.float32)
    b_t = tl.load(in_top + 2 * s_c + off_p, mask=mask_p, other=0).to(tl.float32)
    b_b = tl.load(in_bot + 2 * s_c + off_p, mask=mask_p, other=0).to(tl.float32)

    # to unit range, clamped
    r_t = tl.minimum(tl.maximum(r_t * in_scale + in_bias, 0.0), 1.0)
    r_b = tl.minimum(tl.maximum(r_b * in_scale + in_bias, 0.0), 1.0)
    g_t = tl.minimum(tl.maximum(g_t * in_scale + in_bias, 0.0), 1.0)
    g_b = tl.minimum(tl.maximum(g_b * in_scale + in_bias, 0.0), 1.0)
    b_t = tl.minimum(tl.maximum(b_t * in_scale + in_bias, 0.0), 1.0)
    b_b = tl.minimum(tl.maximum(b_b * in_scale + in_bias, 0.0), 1.0)

    # luma of every pixel; round half up (values are >= 16, so truncation == floor)
    yv_t = ky_r * r_t + ky_g * g_t + ky_b * b_t + 16.0
    yv_b = ky_r * r_b + ky_g * g_b + ky_b * b_b + 16.0
    yc_t = (tl.minimum(tl.maximum(yv_t, 16.0), 235.0) + 0.5).to(tl.int32).to(tl.uint8)
    yc_b = (tl.minimum(tl.maximum(yv_b, 16.0), 235.0) + 0.5).to(tl.int32).to(tl.uint8)

    out_f = out_ptr + t.to(tl.int64) * o_t
    out_row = out_f + y0.to(tl.int64) * W
    tl.store(out_row + px, yc_t, mask=mask_p)
    tl.store(out_row + W + px, yc_b, mask=mask_p)

    # chroma from the 2x2 mean of the clamped unit RGB: (top + bottom), then (even + odd)
    r_e, r_o = tl.split(tl.reshape(r_t + r_b, (BLOCK_C, 2)))
    g_e, g_o = tl.split(tl.reshape(g_t + g_b, (BLOCK_C, 2)))
    b_e, b_o = tl.split(tl.reshape(b_t + b_b, (BLOCK_C, 2)))
    r_m = (r_e + r_o) * 0.25
    g_m = (g_e + g_o) * 0.25
    b_m = (b_e + b_o) * 0.25
    uv_ = ku_r * r_m + ku_g * g_m + ku_b * b_m + 128.0
    vv_ = kv_r * r_m + kv_g * g_m + kv_b * b_m + 128.0
    uc = (tl.minimum(tl.maximum(uv_, 16.0), 240.0) + 0.5).to(tl.int32).to(tl.uint8)
    vc = (tl.minimum(tl.maximum(vv_, 16.0), 240.0) + 0.5).to(tl.int32).to(tl.uint8)

    chroma = out_f + (HC * 2).to(tl.int64) * W   # first byte after the Y plane
    if NV12:
        # interleaved U0 V0 U1 V1 ...: one contiguous run of 2*BLOCK_C bytes per chroma row
        uv = tl.reshape(tl.join(uc, vc), (2 * BLOCK_C,))
        tl.store(chroma + cy.to(tl.int64) * W + px, uv, mask=mask_p)
    else:
        cx = pid_col * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = cx < WC
        u_row = chroma + cy.to(tl.int64) * WC
        tl.store(u_row + cx, uc, mask=mask_c)
        tl.store(u_row + HC * WC + cx, vc, mask=mask_c)


def _yuv420p_to_rgb_kernel(
    yuv_ptr, out_ptr,
    H, W,
    i_t,
    o_t, o_c, o_h, o_w,
    y_scale, c_scale,
    cv_r, cu_g, cv_g, cu_b,
    OUT_FLOAT: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Same tiling as the forward kernel.
    pid_row = tl.program_id(0)
    pid_col = tl.program_id(1)
    HC = H // 2
    WC = W // 2
    t = pid_row // HC
    cy = pid_row - t * HC
    y0 = 2 * cy

    px = pid_col * (2 * BLOCK_C) + tl.arange(0, 2 * BLOCK_C)
    mask_p = px < W
    cx = pid_col * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cx < WC

    in_f = yuv_ptr + t.to(tl.int64) * i_t
    in_row = in_f + y0.to(tl.int64) * W
    yt = tl.load(in_row + px, mask=mask_p, other=16).to(tl.float32)
    yb = tl.load(in_row + W + px, mask=mask_p, other=16).to(tl.float32)
    u_row = in_f + (HC * 2).to(tl.int64) * W + cy.to(tl.int64) * WC
    u = tl.load(u_row + cx, mask=mask_c, other=128).to(tl.float32)
    v = tl.load(u_row + HC * WC + cx, mask=mask_c, other=128).to(tl.float32)

    yt = (yt - 16.0) * y_scale
    yb = (yb - 16.0) * y_scale
    pb = (u - 128.0) * c_scale
    pr = (v - 128.0) * c_scale
    # nearest-neighbour chroma upsampling along W: [BLOCK_C] -> [2*BLOCK_C] (each value twice)
    pb = tl.reshape(tl.join(pb, pb), (2 * BLOCK_C,))
    pr = tl.reshape(tl.join(pr, pr), (2 * BLOCK_C,))

    r_t = tl.minimum(tl.maximum(yt + cv_r * pr, 0.0), 1.0)
    r_b = tl.minimum(tl.maximum(yb + cv_r * pr, 0.0), 1.0)
    g_t = tl.minimum(tl.maximum(yt + cu_g * pb + cv_g * pr, 0.0), 1.0)
    g_b = tl.minimum(tl.maximum(yb + cu_g * pb + cv_g * pr, 0.0), 1.0)
    b_t = tl.minimum(tl.maximum(yt + cu_b * pb, 0.0), 1.0)
    b_b = tl.minimum(tl.maximum(yb + cu_b * pb, 0.0), 1.0)

    out_top = out_ptr + t.to(tl.int64) * o_t + y0.to(tl.int64) * o_h
    out_bot = out_top + o_h
    off_p = px * o_w
    if OUT_FLOAT:
        ty = out_ptr.dtype.element_ty
        tl.store(out_top + off_p, (r_t * 2.0 - 1.0).to(ty), mask=mask_p)
        tl.store(out_bot + off_p, (r_b * 2.0 - 1.0).to(ty), mask=mask_p)
        tl.store(out_top + o_c + off_p, (g_t * 2.0 - 1.0).to(ty), mask=mask_p)
        tl.store(out_bot + o_c + off_p, (g_b * 2.0 - 1.0).to(ty), mask=mask_p)
        tl.store(out_top + 2 * o_c + off_p, (b_t * 2.0 - 1.0).to(ty), mask=mask_p)
        tl.store(out_bot + 2 * o_c + off_p, (b_b * 2.0 - 1.0).to(ty), mask=mask_p)
    else:
        tl.store(out_top + off_p, (r_t * 255.0 + 0.5).to(tl.int32).to(tl.uint8), mask=mask_p)
        tl.store(out_bot + off_p, (r_b * 255.0 + 0.5).to(tl.int32).to(tl.uint8), mask=mask_p)
        tl.store(out_top + o_c + off_p, (g_t * 255.0 + 0.5).to(tl.int32).to(tl.uint8), mask=mask_p)
        tl.store(out_bot + o_c + off_p, (g_b * 255.0 + 0.5).to(tl.int32).to(tl.uint8), mask=mask_p)
        tl.store(out_top + 2 * o_c + off_p, (b_t * 255.0 + 0.5).to(tl.int32).to(tl.uint8), mask=mask_p)
        tl.store(out_bot + 2 * o_c + off_p, (b_b * 255.0 + 0.5).to(tl.int32).to(tl.uint8), mask=mask_p)

# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
_JITTED: dict = {}


def _kernel(raw_fn, interpret: bool):
    """``triton.jit(raw_fn)``, decorated in the requested mode and cached.

    ``triton.jit`` returns an interpreter-backed function when TRITON_INTERPRET is set at
    *decoration* time, so decoration is deferred to first use and keyed by the mode that the
    environment asks for at call time.
    """
    key = (raw_fn.__name__, interpret)
    fn = _JITTED.get(key)
    if fn is None:
        prev = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            fn = triton.jit(raw_fn)
        finally:
            if prev is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = prev
        _JITTED[key] = fn
    return fn


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _default_config(wc: int):
    """(BLOCK_C, num_warps): one program covers up to 1024 pixel columns, 8 per thread."""
    block_c = min(512, max(16, _next_pow2(wc)))
    num_warps = max(1, min(4, (2 * block_c) // (32 * 8)))
    return block_c, num_warps


class _device_guard:
    """``torch.cuda.device(t.device)`` for CUDA tensors (Triton launches on the current device)."""

    def __init__(self, t: torch.Tensor):
        self._ctx = torch.cuda.device(t.device) if t.is_cuda else None

    def __enter__(self):
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc):
        if self._ctx is not None:
            return self._ctx.__exit__(*exc)
        return False


def _rgb_to_yuv420_triton(rgb, out, matrix: str, nv12: bool, block_c=None, num_warps=None):
    """Launch the forward kernel once for the whole [T, 3, H, W] block; writes into ``out``."""
    t, _, h, w = rgb.shape
    if out.numel() == 0:
        return out
    hc, wc = h // 2, w // 2
    d_block, d_warps = _default_config(wc)
    block_c = block_c or d_block
    num_warps = num_warps or d_warps
    ky, ku, kv = _forward_coeffs(matrix)
    scale, bias = _unit_scale_bias(rgb.dtype)
    kern = _kernel(_rgb_to_yuv420_kernel, _interpret_requested())
    grid = (t * hc, triton.cdiv(wc, block_c))
    with _device_guard(rgb):
        kern[grid](
            rgb, out,
            h, w,
            rgb.stride(0), rgb.stride(1), rgb.stride(2), rgb.stride(3),
            out.stride(0),
            scale, bias,
            *ky, *ku, *kv,
            NV12=bool(nv12),
            BLOCK_C=block_c,
            num_warps=num_warps,
        )
    return out


def _yuv420p_to_rgb_triton(yuv, out, matrix: str, block_c=None, num_warps=None):
    t, h, w = out.shape[0], out.shape[2], out.shape[3]
    if out.numel() == 0:
        return out
    hc, wc = h // 2, w // 2
    d_block, d_warps = _default_config(wc)
    block_c = block_c or d_block
    num_warps = num_warps or d_warps
    kern = _kernel(_yuv420p_to_rgb_kernel, _interpret_requested())
    grid = (t * hc, triton.cdiv(wc, block_c))
    with _device_guard(yuv):
        kern[grid](
            yuv, out,
            h, w,
            yuv.stride(0),
            out.stride(0), out.stride(1), out.stride(2), out.stride(3),
            *_inverse_coeffs(matrix),
            OUT_FLOAT=out.dtype != torch.uint8,
            BLOCK_C=block_c,
            num_warps=num_warps,
        )
    return out


# --------------------------------------------------------------------------------------------
# torch references (float32, round half up, clamp) -- the same operations, in the same order, as
# the kernels
# --------------------------------------------------------------------------------------------
def _to_unit(rgb: torch.Tensor) -> torch.Tensor:
    scale, bias = _unit_scale_bias(rgb.dtype)
    return (rgb.to(torch.float32) * scale + bias).clamp(0.0, 1.0)


def _code(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return torch.floor(v.clamp(lo, hi) + 0.5).to(torch.uint8)


def _reference_planes(rgb: torch.Tensor, matrix: str):
    """(Y [T,H,W], U [T,H/2,W/2], V [T,H/2,W/2]) uint8 codes."""
    ky, ku, kv = _forward_coeffs(matrix)
    x = _to_unit(rgb)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = ky[0] * r + ky[1] * g + ky[2] * b + 16.0
    s = x[:, :, 0::2, :] + x[:, :, 1::2, :]           # top + bottom
    m = (s[..., 0::2] + s[..., 1::2]) * 0.25          # (even) + (odd), then / 4
    rm, gm, bm = m[:, 0], m[:, 1], m[:, 2]
    u = ku[0] * rm + ku[1] * gm + ku[2] * bm + 128.0
    v = kv[0] * rm + kv[1] * gm + kv[2] * bm + 128.0
    return _code(y, _Y_LO, _Y_HI), _code(u, _C_LO, _C_HI), _code(v, _C_LO, _C_HI)


def _finish_reference(res: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        return res
    out.copy_(res)
    return out


def rgb_to_yuv420p_reference(rgb: torch.Tensor, matrix: str = "bt601", out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Torch reference of :func:`rgb_to_yuv420p` (same validation, same arithmetic)."""
    fn = "rgb_to_yuv420p_reference"
    t, h, w = _check_rgb(rgb, fn)
    matrix = _check_matrix(matrix, fn)
    if out is not None:
        _check_out(out, (t, h * 3 // 2, w), torch.uint8, rgb.device, fn, frame_packed=True)
    y, u, v = _reference_planes(rgb, matrix)
    res = torch.cat([y.reshape(t, -1), u.reshape(t, -1), v.reshape(t, -1)], dim=1)
    return _finish_reference(res.reshape(t, h * 3 // 2, w), out)


def rgb_to_nv12_reference(rgb: torch.Tensor, matrix: str = "bt601", out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Torch reference of :func:`rgb_to_nv12` (same validation, same arithmetic)."""
    fn = "rgb_to_nv12_reference"
    t, h, w = _check_rgb(rgb, fn)
    matrix = _check_matrix(matrix, fn)
    if out is not None:
        _check_out(out, (t, h * 3 // 2, w), torch.uint8, rgb.device, fn, frame_packed=True)
    y, u, v = _reference_planes(rgb, matrix)
    uv = torch.stack([u, v], dim=-1).reshape(t, h // 2, w)  # U0 V0 U1 V1 ...
    return _finish_reference(torch.cat([y, uv], dim=1), out)


def yuv420p_to_rgb_reference(
    yuv: torch.Tensor,
    matrix: str = "bt601",
    out_dtype: torch.dtype = torch.uint8,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Torch reference of :func:`yuv420p_to_rgb` (same validation, same arithmetic)."""
    fn = "yuv420p_to_rgb_reference"
    t, h, w = _check_yuv(yuv, fn)
    matrix = _check_matrix(matrix, fn)
    out_dtype = _check_out_dtype(out_dtype, fn)
    if out is not None:
        _check_out(out, (t, 3, h, w), out_dtype, yuv.device, fn, frame_packed=False)
    y_scale, c_scale, cv_r, cu_g, cv_g, cu_b = _inverse_coeffs(matrix)
    flat = yuv.reshape(t, -1)
    n_y, n_c = h * w, (h // 2) * (w // 2)
    y = flat[:, :n_y].reshape(t, h, w).to(torch.float32)
    u = flat[:, n_y:n_y + n_c].reshape(t, h // 2, w // 2).to(torch.float32)
    v = flat[:, n_y + n_c:].reshape(t, h // 2, w // 2).to(torch.float32)
    yf = (y - 16.0) * y_scale
    pb = ((u - 128.0) * c_scale).repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    pr = ((v - 128.0) * c_scale).repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    r = yf + cv_r * pr
    g = yf + cu_g * pb + cv_g * pr
    b = yf + cu_b * pb
    x = torch.stack([r, g, b], dim=1).clamp(0.0, 1.0)
    if out_dtype == torch.uint8:
        res = torch.floor(x * 255.0 + 0.5).to(torch.uint8)
    else:
        res = (x * 2.0 - 1.0).to(out_dtype)
    return _finish_reference(res, out)


def _check_out_dtype(out_dtype, fn: str) -> torch.dtype:
    if out_dtype not in _RGB_DTYPES:
        raise ValueError(
            f"{fn}: got out_dtype={out_dtype}; accepted: torch.uint8 (codes in [0, 255]) or "
            f"torch.float32 / torch.float16 / torch.bfloat16 (values in [-1, 1])"
        )
    return out_dtype


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def _forward(rgb, matrix, out, nv12: bool, fn: str):
    t, h, w = _check_rgb(rgb, fn)
    matrix = _check_matrix(matrix, fn)
    shape = (t, h * 3 // 2, w)
    if out is not None:
        _check_out(out, shape, torch.uint8, rgb.device, fn, frame_packed=True)
    if _backend_for(rgb) == "torch":
        ref = rgb_to_nv12_reference if nv12 else rgb_to_yuv420p_reference
        return ref(rgb, matrix, out=out)
    if out is None:
        out = torch.empty(shape, dtype=torch.uint8, device=rgb.device)
    return _rgb_to_yuv420_triton(rgb, out, matrix, nv12)


def rgb_to_yuv420p(rgb: torch.Tensor, matrix: str = "bt601", out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RGB ``[T, 3, H, W]`` -> planar 4:2:0 ``[T, H*3//2, W]`` uint8, PyAV ``yuv420p`` layout.

    ``rgb``: uint8 in [0, 255] or fp32/fp16/bf16 in [-1, 1] (clamped), any strides; H and W
    even. ``matrix``: "bt601" or "bt709", limited range. ``out``: optional preallocated uint8
    ``[T, H*3//2, W]`` buffer on the same device, contiguous within each frame; with it (and on
    CUDA) nothing is allocated, so the call can be captured in a CUDA graph. One kernel launch.
    """
    return _forward(rgb, matrix, out, nv12=False, fn="rgb_to_yuv420p")


def rgb_to_nv12(rgb: torch.Tensor, matrix: str = "bt601", out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RGB ``[T, 3, H, W]`` -> semi-planar 4:2:0 ``[T, H*3//2, W]`` uint8, PyAV ``nv12`` layout
    (Y plane, then H/2 rows of interleaved ``U V`` pairs). Arguments as :func:`rgb_to_yuv420p`."""
    return _forward(rgb, matrix, out, nv12=True, fn="rgb_to_nv12")


def yuv420p_to_rgb(
    yuv: torch.Tensor,
    matrix: str = "bt601",
    out_dtype: torch.dtype = torch.uint8,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Planar 4:2:0 ``[T, H*3//2, W]`` uint8 (PyAV ``yuv420p``) -> RGB ``[T, 3, H, W]``.

    ``out_dtype`` uint8 gives codes in [0, 255]; fp32/fp16/bf16 gives values in [-1, 1]. Chroma
    is upsampled by nearest neighbour. ``out``: optional preallocated ``[T, 3, H, W]`` tensor of
    ``out_dtype`` (any strides). One kernel launch.
    """
    fn = "yuv420p_to_rgb"
    t, h, w = _check_yuv(yuv, fn)
    matrix = _check_matrix(matrix, fn)
    out_dtype = _check_out_dtype(out_dtype, fn)
    if out is not None:
        _check_out(out, (t, 3, h, w), out_dtype, yuv.device, fn, frame_packed=False)
    if _backend_for(yuv) == "torch":
        return yuv420p_to_rgb_reference(yuv, matrix, out_dtype, out=out)
    if out is None:
        out = torch.empty((t, 3, h, w), dtype=out_dtype, device=yuv.device)
    if yuv.numel() and not (yuv.stride(2) == 1 and yuv.stride(1) == w):
        yuv = yuv.contiguous()
    return _yuv420p_to_rgb_triton(yuv, out, matrix)


# --------------------------------------------------------------------------------------------
# benchmark
# --------------------------------------------------------------------------------------------
def benchmark(
    T: int = 12,
    H: int = 480,
    W: int = 832,
    dtype: torch.dtype = torch.bfloat16,
    matrix: str = "bt601",
    sweep: bool = True,
    compile_reference: bool = True,
    json_path: Optional[str] = None,
    file=None,
    device: str = "cuda",
) -> dict:
    """Time the Triton kernels against torch on CUDA; return (and optionally write) a JSON dict.

    For each conversion: the Triton kernel (writing into a preallocated ``out``), the torch
    reference eager, ``torch.compile`` of the reference, and a memory floor = bytes read +
    written by the conversion / the device-copy bandwidth measured in this run (a torch
    ``copy_`` of a buffer of that many bytes, which moves twice that). GB/s = (bytes read +
    written) / time. ``triton_over_floor`` = Triton ms / floor ms (1.0 = at copy bandwidth).
    Timings are ``triton.testing.do_bench`` means (L2 flushed between calls); the Triton kernel
    is also timed replayed from a CUDA graph (``do_bench_cudagraph``), which removes the Python
    validation and launch overhead of the public function.
    With ``sweep`` the forward yuv420p kernel is also timed for a few (BLOCK_C, num_warps).

    ``device="cpu"`` is a smoke mode for tests only (needs TRITON_INTERPRET=1; a plain
    wall-clock timer, one repetition; the numbers mean nothing).
    """
    file = sys.stdout if file is None else file
    dev = torch.device(device)
    if not _HAVE_TRITON:
        raise RuntimeError("colour.benchmark(): needs triton")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("colour.benchmark(): needs a CUDA device (torch.cuda.is_available() is False)")
        if _interpret_requested():
            raise RuntimeError("colour.benchmark(): unset TRITON_INTERPRET to time compiled kernels")
        from triton.testing import do_bench, do_bench_cudagraph

        def ms_of(fn):
            return float(do_bench(fn, warmup=25, rep=200))

        def graph_ms_of(fn):
            return float(do_bench_cudagraph(fn, rep=100))

        device_name = torch.cuda.get_device_name(dev)
    else:
        if not _interpret_requested():
            raise RuntimeError("colour.benchmark(): on CPU only as a smoke test, with TRITON_INTERPRET=1")
        import time

        def ms_of(fn):
            fn()
            t0 = time.perf_counter()
            fn()
            return max((time.perf_counter() - t0) * 1e3, 1e-6)

        graph_ms_of = ms_of  # exercises the same code path; no graph on CPU

        device_name = f"{dev.type} (smoke mode: Triton interpreter, timings meaningless)"

    gen = torch.Generator(device=dev).manual_seed(0)
    if dtype == torch.uint8:
        rgb = torch.randint(0, 256, (T, 3, H, W), device=dev, generator=gen, dtype=torch.uint8)
    else:
        rgb = (torch.rand((T, 3, H, W), device=dev, generator=gen) * 2 - 1).to(dtype)
    yuv_out = torch.empty((T, H * 3 // 2, W), dtype=torch.uint8, device=dev)
    rgb_in_bytes = rgb.numel() * rgb.element_size()
    yuv_bytes = yuv_out.numel()

    # device copy bandwidth, measured on a buffer as large as the biggest conversion's traffic
    n_copy = rgb_in_bytes + yuv_bytes
    src = torch.empty(n_copy, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    copy_ms = ms_of(lambda: dst.copy_(src))
    copy_gbps = 2 * n_copy / (copy_ms * 1e-3) / 1e9
    del src, dst

    def compiled(fn):
        try:
            return torch.compile(fn, dynamic=False)
        except Exception as e:  # pragma: no cover - depends on the machine
            return e

    n_rot = 4

    def rotating(fn, src, out):
        """A call cycling over ``n_rot`` copies of (src, out): back-to-back replays in a CUDA
        graph (no L2 flush there) then do not find the previous call's data in L2."""
        copies = [(src.clone(), torch.empty_like(out)) for _ in range(n_rot)]
        state = [0]

        def call():
            x, o = copies[state[0] % n_rot]
            state[0] += 1
            fn(x, o)

        return call

    fwd_yuv = lambda x, o: rgb_to_yuv420p(x, matrix, out=o)  # noqa: E731
    fwd_nv12 = lambda x, o: rgb_to_nv12(x, matrix, out=o)  # noqa: E731
    yuv_in = rgb_to_yuv420p_reference(rgb, matrix)
    rgb_out = torch.empty((T, 3, H, W), dtype=dtype, device=dev)
    inv = lambda x, o: yuv420p_to_rgb(x, matrix, dtype, out=o)  # noqa: E731
    cases = {
        "rgb_to_yuv420p": dict(
            nbytes=rgb_in_bytes + yuv_bytes,
            triton=lambda: fwd_yuv(rgb, yuv_out),
            graph=rotating(fwd_yuv, rgb, yuv_out) if graph_ms_of else None,
            ref=lambda: rgb_to_yuv420p_reference(rgb, matrix),
            ref_fn=rgb_to_yuv420p_reference, ref_args=(rgb, matrix),
        ),
        "rgb_to_nv12": dict(
            nbytes=rgb_in_bytes + yuv_bytes,
            triton=lambda: fwd_nv12(rgb, yuv_out),
            graph=rotating(fwd_nv12, rgb, yuv_out) if graph_ms_of else None,
            ref=lambda: rgb_to_nv12_reference(rgb, matrix),
            ref_fn=rgb_to_nv12_reference, ref_args=(rgb, matrix),
        ),
        f"yuv420p_to_rgb_{str(dtype).replace('torch.', '')}": dict(
            nbytes=yuv_bytes + rgb_in_bytes,
            triton=lambda: inv(yuv_in, rgb_out),
            graph=rotating(inv, yuv_in, rgb_out) if graph_ms_of else None,
            ref=lambda: yuv420p_to_rgb_reference(yuv_in, matrix, dtype),
            ref_fn=yuv420p_to_rgb_reference, ref_args=(yuv_in, matrix, dtype),
        ),
    }

    result = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": [T, 3, H, W],
        "dtype": str(dtype).replace("torch.", ""),
        "matrix": matrix,
        "copy": {"bytes": 2 * n_copy, "ms": copy_ms, "gbps": copy_gbps},
        "cases": {},
    }

    def line(name, ms, nbytes, extra=""):
        gbps = nbytes / (ms * 1e-3) / 1e9
        print(f"  {name:<22} {ms:9.4f} ms  {gbps:8.1f} GB/s {extra}", file=file)
        return {"ms": ms, "gbps": gbps}

    print(
        f"colour benchmark: [{T}, 3, {H}, {W}] {result['dtype']} {matrix} on {result['device']}"
        f" (copy bandwidth {copy_gbps:.1f} GB/s)",
        file=file,
    )
    for name, c in cases.items():
        nbytes = c["nbytes"]
        entry = {"bytes": nbytes}
        # correctness first: the kernel must agree with the reference (<= 1 code / 1 ulp)
        got = c["triton"]().clone()
        want = c["ref"]()
        entry["max_abs_diff_vs_reference"] = float((got.float() - want.float()).abs().max().item())
        print(f"{name}: max |triton - reference| = {entry['max_abs_diff_vs_reference']:g}", file=file)
        floor_ms = nbytes / (copy_gbps * 1e9) * 1e3
        entry["floor"] = line("memory floor", floor_ms, nbytes)
        entry["triton"] = line("triton", ms_of(c["triton"]), nbytes)
        if graph_ms_of is not None:
            try:  # replayed from a CUDA graph: kernel time without Python / launch overhead
                entry["triton_cudagraph"] = line("triton (CUDA graph)", graph_ms_of(c["graph"]), nbytes)
            except Exception as e:  # pragma: no cover - depends on the machine
                entry["triton_cudagraph"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        entry["torch_eager"] = line("torch eager (ref)", ms_of(c["ref"]), nbytes)
        if compile_reference:
            fn = compiled(c["ref_fn"])
            try:
                if isinstance(fn, Exception):
                    raise fn
                args = c["ref_args"]
                fn(*args)  # compile outside the timing
                entry["torch_compile"] = line("torch.compile (ref)", ms_of(lambda: fn(*args)), nbytes)
            except Exception as e:  # pragma: no cover - depends on the machine
                entry["torch_compile"] = {"error": f"{type(e).__name__}: {e}"[:500]}
                print(f"  torch.compile (ref)    failed: {entry['torch_compile']['error']}", file=file)
        entry["triton_over_floor"] = entry["triton"]["ms"] / floor_ms
        print(f"  triton / floor         {entry['triton_over_floor']:9.3f}x", file=file)
        result["cases"][name] = entry

    if sweep:
        nbytes = rgb_in_bytes + yuv_bytes
        rows = []
        print("rgb_to_yuv420p config sweep (BLOCK_C, num_warps):", file=file)
        for block_c in (64, 128, 256, 512, 1024):
            for num_warps in (1, 2, 4, 8):
                per_thread = block_c * 2 // (32 * num_warps)  # pixels per thread per row
                if per_thread < 1 or per_thread > 16:
                    continue
                try:
                    ms = ms_of(lambda: _rgb_to_yuv420_triton(rgb, yuv_out, matrix, False, block_c, num_warps))
                    r = line(f"BLOCK_C={block_c} w={num_warps}", ms, nbytes)
                    rows.append({"block_c": block_c, "num_warps": num_warps, **r})
                except Exception as e:  # pragma: no cover
                    rows.append({"block_c": block_c, "num_warps": num_warps, "error": str(e)[:300]})
        result["sweep_rgb_to_yuv420p"] = rows
        result["default_config"] = dict(zip(("block_c", "num_warps"), _default_config(W // 2)))

    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {json_path}", file=file)
    return result


def _main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Benchmark the Triton colour-conversion kernels (CUDA).")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--T", type=int, default=12)
    p.add_argument("--H", type=int, default=480)
    p.add_argument("--W", type=int, default=832)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "uint8"])
    p.add_argument("--matrix", default="bt601", choices=sorted(MATRICES))
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args(argv)
    benchmark(
        a.T, a.H, a.W, getattr(torch, a.dtype), a.matrix,
        sweep=not a.no_sweep, compile_reference=not a.no_compile, json_path=a.json,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
