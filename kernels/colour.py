"""Colour conversion between RGB and 4:2:0 YUV (planar ``yuv420p`` and semi-planar ``nv12``).

The file reads like a Triton tutorial, top to bottom:

    kernel (``_rgb_to_yuv420_kernel`` / ``_yuv420p_to_rgb_kernel``, ``@triton.jit``)
      -> launcher (``_rgb_to_yuv420_triton`` / ``_yuv420p_to_rgb_triton``)
      -> torch reference (``*_reference``)
      -> public dispatching functions (``rgb_to_yuv420p``, ``rgb_to_nv12``, ``yuv420p_to_rgb``).

The benchmark (GB/s against torch eager, torch.compile and a copy-bandwidth floor) is
``bench/bench_colour.py``.

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

Dispatch: the kernels are decorated once, at definition, with ``@triton.jit``, which picks
compiled or interpreted mode from ``TRITON_INTERPRET`` at that moment, i.e. when this module is
imported (``TRITON_INTERPRET=1 python ...``, as Triton intends; changing the variable later has
no effect). Interpreted kernels run for tensors on any device (Triton's interpreter, on CPU
tensors); compiled ones for CUDA tensors, while CPU tensors go to the torch reference. Where
triton is not installed the torch reference always runs.

Strides: RGB input and RGB output may have arbitrary strides (they are passed to the kernel; no
``.contiguous()`` copy). YUV buffers must be contiguous within each frame (the planes are packed
flat); their frame stride may be anything, so ``out`` may be a slice along T of a larger buffer.
A YUV *input* that is not frame-contiguous is copied with ``.contiguous()``.

Only Triton builtins available since Triton 3.0 (so in 3.6) are used: ``tl.program_id``,
``tl.arange``, masked ``tl.load`` / ``tl.store``, arithmetic, ``tl.minimum`` / ``tl.maximum``,
``.to`` and, to pair/interleave even and odd columns in registers, ``tl.reshape`` /
``tl.split`` / ``tl.join``.
"""


import contextlib
from typing import Optional

import torch

try:  # guarded: the module (and its torch references) must import where triton is missing
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is absent or broken
    _HAVE_TRITON = False

    class triton:  # noqa: N801 - stand-ins so the kernel definitions below evaluate; never launched
        @staticmethod
        def jit(fn):
            return fn

    class tl:  # noqa: N801
        constexpr = object


__all__ = [
    "MATRICES",
    "rgb_to_yuv420p",
    "rgb_to_nv12",
    "yuv420p_to_rgb",
    "rgb_to_yuv420p_reference",
    "rgb_to_nv12_reference",
    "yuv420p_to_rgb_reference",
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
# Triton kernels
#
# Tiling: program (row, col) with row = t * (H/2) + cy handles chroma row cy of frame t, i.e.
# pixel rows 2*cy and 2*cy+1, over the 2*BLOCK_C contiguous pixel columns of column tile `col`.
# Pixel data is loaded/stored as 1-D contiguous runs along W (coalesced, and vectorised to
# 8-16 bytes per thread when W is a multiple of 16 and the innermost stride is 1). Only the
# chroma path views a run as [BLOCK_C, 2] quads: tl.reshape + tl.split pairs even/odd columns
# and tl.join + tl.reshape interleaves them back; with the default layouts these are register
# renamings (no shared memory). Builtins only (no standard-library @jit helpers such as tl.sum).
# All used ops exist since Triton 3.0; the kernels were compiled to sm_90 cubin with Triton 3.6.0
# and 3.9.0 (CPU-only AOT compile).
# --------------------------------------------------------------------------------------------
@triton.jit
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


@triton.jit
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


# Whether ``triton.jit`` above made interpreted kernels (TRITON_INTERPRET=1 at import).
_INTERPRET = _HAVE_TRITON and not isinstance(_rgb_to_yuv420_kernel, triton.JITFunction)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _default_config(wc: int):
    """(BLOCK_C, num_warps): one program covers up to 1024 pixel columns, 8 per thread."""
    block_c = min(512, max(16, _next_pow2(wc)))
    num_warps = max(1, min(4, (2 * block_c) // (32 * 8)))
    return block_c, num_warps


def _device_guard(t: torch.Tensor):
    """``torch.cuda.device(t.device)`` for CUDA tensors (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


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
    grid = (t * hc, triton.cdiv(wc, block_c))
    with _device_guard(rgb):
        _rgb_to_yuv420_kernel[grid](
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
    grid = (t * hc, triton.cdiv(wc, block_c))
    with _device_guard(yuv):
        _yuv420p_to_rgb_kernel[grid](
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


def _check_out_dtype(out_dtype, fn: str) -> torch.dtype:
    if out_dtype not in _RGB_DTYPES:
        raise ValueError(
            f"{fn}: got out_dtype={out_dtype}; accepted: torch.uint8 (codes in [0, 255]) or "
            f"torch.float32 / torch.float16 / torch.bfloat16 (values in [-1, 1])"
        )
    return out_dtype


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------
def _backend_for(t: torch.Tensor) -> str:
    """'triton-interpret', 'triton' or 'torch': which implementation the public functions use."""
    if _INTERPRET:
        return "triton-interpret"
    if _HAVE_TRITON and t.is_cuda:
        return "triton"
    return "torch"


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
