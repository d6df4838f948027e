"""The Wan DiT's self-attention kernels: PyTorch SDPA, FlashAttention-3 in bf16, FlashAttention-3 in FP8.

Every kernel here is a callable `(q, k, v) -> o` on [B, L, H, D] tensors (the layout the projections and the
KV cache already have, so nothing is transposed or copied for FA3), without a mask: the block-causal cache
needs none (a block attends to all of cache[:end]).

Choices (the `attention` param of the `wan_causal_dit` node)
    sdpa                    PyTorch's SDPA, its own backend choice (cuDNN's kernel on Hopper)
    cudnn, flash, efficient, math   SDPA restricted to that backend (the node enters `sdpa_kernel`)
    fa3                     FlashAttention-3 forward (the optional `fa3_fwd` wheel: `pip install
                            'reactor-graph[fa3]'`), bf16, Hopper (sm90) only; exact as SDPA is
    fa3_fp8                 FA3 on FP8 e4m3 q/k/v with per-head scales computed on the device; in the DiT its k/v
                            are read from an e4m3 copy of the KV cache (models/fp8_kv_cache.py: earlier blocks
                            quantised once, when written; each pass only the block's own k/v) and q is quantised
                            per call by a fused kernel (kernels/fp8_head_quant.py, power-of-two scales)
    auto                    fa3 where it can run (fa3_fwd installed, sm90), else sdpa: the exact kernel that is
                            fastest (H200, captured rolling stream: fa3 370 ms a block, sdpa 416, bench/RESULTS.md).
                            fa3_fp8 is faster still but not exact, so it is asked for by name

FP8 quantisation per call (`quantize_fp8`: the first version, what `Fa3Fp8Attention` does on plain q/k/v and
`fp8_reference_attention` models; the DiT path uses the fused kernel and the cache copy above)
    Per (batch, head) -- FA3's descale granularity, q_descale/k_descale/v_descale are [B, H_k] float32 -- or per
    tensor: amax = max |x| over the tokens and channels, scale = 448 / amax (e4m3's largest finite value is 448),
    x8 = e4m3(x * scale), descale = 1 / scale; the kernel multiplies q.k by q_descale * k_descale and the
    output by v_descale. All of it is device arithmetic: no `.item()`, no host sync, so it is captured in the
    CUDA graph with the kernel and the scales follow each block's values. The scale is rounded to x's dtype
    before it is applied and the descale is its exact reciprocal, so the product with the rounded scale is what
    is inverted (x * scale may exceed 448 by that rounding, < 1%; e4m3 rounds it to 448, it saturates only past
    464). Round trip: |x - x8 * descale| <= max(2^-4 |x|, 2^-10 descale) for every element (3 mantissa bits; the
    second term is the subnormal range below 2^-6), plus x's own rounding of the scaled product.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["CHOICES", "SDPA_BACKENDS", "FP8_MAX", "fa3_unavailable", "resolve_attention", "make_attention",
           "sdpa_attention", "Fa3Attention", "Fa3Fp8Attention", "Fp8ReferenceAttention", "fp8_scales", "quantize_fp8",
           "dequantize_fp8", "fp8_reference_attention"]

CHOICES = ("auto", "sdpa", "cudnn", "flash", "efficient", "math", "fa3", "fa3_fp8")
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# amax is clamped from below so an all-zero head gets a finite scale (448 / 1e-12 fits float32); its values
# quantise to 0 whatever the scale
_AMAX_FLOOR = 1e-12

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# `auto` takes FA3 where it runs: the engine's captured FA3 stream was measured against SDPA on an H200 (1.12x, latent
# rel L2 8e-4: bench/RESULTS.md, issue 22). False would make auto SDPA everywhere again.
AUTO_TAKES_FA3 = True


# ------------------------------------------------------------------------------------------- choosing


def fa3_unavailable(device: torch.device | str) -> str | None:
    """Why FlashAttention-3 cannot run on `device`, or None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"FlashAttention-3 needs a CUDA device; this one is {device}"
    if not torch.cuda.is_available():
        return "FlashAttention-3 needs CUDA; torch sees no CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"the fa3_fwd wheel is built for Hopper (sm90); this GPU is sm{major}{minor}"
    try:
        import fa3_fwd_interface  # noqa: F401
    except Exception as exc:  # ImportError, or the extension failing to load against this torch
        return f"fa3_fwd is not importable ({type(exc).__name__}: {exc}); install it: pip install 'reactor-graph[fa3]'"
    return None


def resolve_attention(choice: str, device: torch.device | str) -> str:
    """The kernel `choice` runs on `device`: auto -> fa3 where it can run, else sdpa. Raises ValueError for
    fa3/fa3_fp8 where FA3 cannot run (asked for explicitly, it must not fall back silently)."""
    if choice not in CHOICES:
        raise ValueError(f"attention {choice!r} is not one of {', '.join(CHOICES)}")
    if choice == "auto":
        return "fa3" if AUTO_TAKES_FA3 and fa3_unavailable(device) is None else "sdpa"
    if choice in ("fa3", "fa3_fp8"):
        why = fa3_unavailable(device)
        if why is not None:
            raise ValueError(f"attention: {choice}: {why}")
    return choice


def make_attention(resolved: str, fp8_per: str = "head") -> Attention:
    """The callable for a resolved choice (see `resolve_attention`). SDPA backends are selected by the caller's
    `sdpa_kernel` context, so every SDPA choice is the same callable."""
    if resolved == "fa3":
        return Fa3Attention()
    if resolved == "fa3_fp8":
        return Fa3Fp8Attention(per=fp8_per)
    if resolved == "sdpa" or resolved in SDPA_BACKENDS:
        return sdpa_attention
    raise ValueError(f"attention {resolved!r} is not resolved (auto?) or unknown")


# ------------------------------------------------------------------------------------------- kernels


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA on [B, L, H, D] tensors (transposed views in, a transposed view out: no copies for flash/cuDNN)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class Fa3Attention:
    """FlashAttention-3 forward, bf16. No host sync: num_splits is fixed at 1 (no split heuristic on the host)
    and nothing is read back, so the call is captured in CUDA graphs.

    Run plainly it calls the extension's op (`torch.ops.fa3_fwd.fwd`) itself: fa3_fwd_interface's Python wrapper
    also builds empty placeholder tensors from host lists (`torch.tensor([], device=...)`) on every call, a
    host-to-device copy that has no place in a captured graph. Traced by Dynamo (`compile: whole`) it calls the
    wrapper's custom op, whose fake implementation lets the trace through."""

    name = "fa3"

    def __init__(self):
        import fa3_fwd_interface

        self._op = torch.ops.fa3_fwd.fwd
        self._traced = fa3_fwd_interface._flash_attn_forward

    def __call__(self, q, k, v, q_descale=None, k_descale=None, v_descale=None):
        scale = q.shape[-1] ** -0.5
        # the kernel wants unit stride in the channels (views of the cache and the projections have it)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        if torch.compiler.is_compiling():
            out, *_ = self._traced(q, k, v, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
                                   softmax_scale=scale, causal=False, num_splits=1)
            return out
        # the op's positional schema (fa3_fwd 0.0.3): q, k, v, k_new, v_new, qv, out, cu_seqlens_q/k/k_new,
        # seqused_q/k, max_seqlen_q/k, page_table, kv_batch_idx, leftpad_k, rotary_cos/sin, seqlens_rotary,
        # q/k/v_descale, softmax_scale, causal, window left/right, attention_chunk, softcap, rotary_interleaved,
        # scheduler_metadata, num_splits, pack_gqa, sm_margin
        out, *_ = self._op(q, k, v, None, None, None, None, None, None, None, None, None, None, None, None, None,
                           None, None, None, None, q_descale, k_descale, v_descale, scale, False, -1, -1, 0, 0.0,
                           True, None, 1, None, 0)
        return out


class Fa3Fp8Attention(Fa3Attention):
    """FlashAttention-3 on e4m3 q/k/v, bf16 out.

    In the DiT (`attend_cache`) k/v come from the cache's e4m3 copy (models/fp8_kv_cache.py: the earlier blocks
    quantised once, when written; the block's own k/v each pass) and q is quantised per call by the fused kernel
    (kernels/fp8_head_quant.py: three launches, power-of-two scale per head). Called on plain (q, k, v) it
    quantises all three per call with `quantize_fp8` (the first version, kept as a reference)."""

    name = "fa3_fp8"
    reads_fp8_cache = True  # KVCache.fp8_for

    def __init__(self, per: str = "head"):
        super().__init__()
        if per not in ("head", "tensor"):
            raise ValueError(f"fp8 scale granularity {per!r}: head or tensor")
        self.per = per

    def __call__(self, q, k, v):
        q8, qd = quantize_fp8(q, self.per)
        k8, kd = quantize_fp8(k, self.per)
        v8, vd = quantize_fp8(v, self.per)
        return super().__call__(q8, k8, v8, qd, kd, vd).to(q.dtype)

    def attend_cache(self, q, fp8, layer: int, end: int):
        """q [B, L, H, D] against slots [0, end) of layer `layer` of the e4m3 cache copy `fp8` (Fp8KVCache)."""
        from reactor_graph.kernels.fp8_head_quant import quantize

        q8, qd = quantize(q, self.per)
        k8, kd, v8, vd = fp8.keys_values(layer, end)
        return Fa3Attention.__call__(self, q8, k8, v8, qd, kd, vd).to(q.dtype)


class Fp8ReferenceAttention:
    """What fa3_fp8 computes, in torch on any device: the same e4m3 inputs (q quantised per call as fa3_fp8 does
    it, k/v from the cache's e4m3 copy), dequantised, through SDPA in float32. FA3 additionally rounds P to e4m3
    before P.V, which this does not model. On plain (q, k, v): `fp8_reference_attention`."""

    name = "fp8_ref"
    reads_fp8_cache = True

    def __init__(self, per: str = "head"):
        if per not in ("head", "tensor"):
            raise ValueError(f"fp8 scale granularity {per!r}: head or tensor")
        self.per = per

    def __call__(self, q, k, v):
        return fp8_reference_attention(q, k, v, self.per)

    def attend_cache(self, q, fp8, layer: int, end: int):
        from reactor_graph.kernels.fp8_head_quant import quantize

        q8, qd = quantize(q, self.per)
        k, v = fp8.dequantized(layer, end)
        return sdpa_attention(dequantize_fp8(q8, qd), k, v).to(q.dtype)


# ------------------------------------------------------------------------------------- quantisation


def fp8_scales(x: torch.Tensor, per: str = "head") -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] -> amax [B, H] float32 (max |x| per batch and head, or over the whole tensor broadcast to
    [B, H] with per='tensor') and scale [B, H] in x's dtype (448 / amax, rounded to x's dtype, the factor that is
    applied)."""
    if x.dim() != 4:
        raise ValueError(f"expected [B, L, H, D], got shape {list(x.shape)}")
    if per not in ("head", "tensor"):
        raise ValueError(f"fp8 scale granularity {per!r}: head or tensor")
    b, _, h, _ = x.shape
    # one reduction, no |x| temporary; amax of x's values is exact in x's dtype
    dims = (1, 3) if per == "head" else (0, 1, 2, 3)
    amax = torch.linalg.vector_norm(x, ord=math.inf, dim=dims).float()
    if per == "tensor":
        amax = amax.reshape(1, 1).expand(b, h)
    scale = (FP8_MAX / amax.clamp_min(_AMAX_FLOOR)).to(x.dtype)
    return amax, scale


def quantize_fp8(x: torch.Tensor, per: str = "head") -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] -> (x8 e4m3 [B, L, H, D] contiguous, descale [B, H] float32 contiguous) with
    x ~= x8 * descale (descale broadcast over L and D). Device ops only."""
    _, scale = fp8_scales(x, per)
    x8 = (x * scale[:, None, :, None]).to(FP8)
    descale = scale.float().reciprocal().contiguous()
    return x8, descale


def dequantize_fp8(x8: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of `quantize_fp8` (for checks and the reference path): x8 * descale in `dtype`."""
    return (x8.to(torch.float32) * descale[:, None, :, None]).to(dtype)


def fp8_reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, per: str = "head") -> torch.Tensor:
    """What fa3_fp8 computes, in plain torch on any device: attention of the dequantised q/k/v (float32
    softmax), in q's dtype. FA3 additionally rounds P to e4m3 before P.V, which this does not model."""
    dq = [dequantize_fp8(*quantize_fp8(t, per)) for t in (q, k, v)]
    return sdpa_attention(*dq).to(q.dtype)
