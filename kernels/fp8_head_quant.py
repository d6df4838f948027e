"""FP8 (e4m3) quantisation of [B, L, H, D] attention tensors with one power-of-two scale per (batch, head).

What FlashAttention-3's FP8 forward wants: e4m3 q/k/v and float32 descales of shape [B, H] (the kernel multiplies
q.k by q_descale * k_descale and the output by v_descale). Read top to bottom:

    kernels   `_amax_kernel` (partial max |x| per chunk of tokens and head), `_descale_kernel` (those partials ->
              one descale per head, optionally never below an old one), `_quant_kernel` (x * scale, clamped to
              +-448, cast; optionally only where a head's scale changed)
    launchers `head_amax_partials`, `descales_from_partials`, `quantize_into`, and `quantize` (all three)
    torch references `*_reference`, the same arithmetic in torch (any device, and what runs under Dynamo)
    dispatch  Triton for CUDA tensors (or any tensor when the module was imported with TRITON_INTERPRET=1);
              the torch reference on the CPU and while Dynamo traces (inductor fuses it there).

Scales are powers of two: descale = 2^e with e the smallest integer such that 448 * 2^e >= amax * 2^headroom_log2
(found from amax's float32 bits, so the kernels and the references agree bit for bit; e is clamped to [-100, 100],
so an all-zero head gets a finite descale and quantises to zeros). Consequences:
  * x * (1 / descale) is exact, so the only rounding is e4m3's own (round to nearest even), and a stored e4m3 value
    times descale is exactly what the attention kernel sees;
  * a head's largest value lands in (224, 448] / 2^headroom_log2: at most one binade of e4m3's range is left
    unused beyond the asked headroom. e4m3's relative precision (2^-4) does not depend on the scale; only values
    below 2^-6 (scaled) fall into the subnormals (absolute error <= 2^-10 * descale), which costs nothing
    measurable for attention inputs (see reactor_graph/models/fp8_kv_cache.py for the headroom choice).
Values beyond 448 (scaled) saturate to +-448 (the cast of an out-of-range value to float8_e4m3fn would be NaN).

Where the output is not an e4m3 tensor (float32 or bf16, for Triton's interpreter, whose float8 cast is not
trustworthy) the kernel rounds to e4m3 in float arithmetic and stores those e4m3 values in the wider dtype.

Only Triton builtins present in Triton 3.0+ (so in 3.6): program_id, arange, full, masked load/store, reduce, abs,
minimum/maximum, where, bitcasts through `.to(..., bitcast=True)`, integer shifts.
"""
from __future__ import annotations

import contextlib

import torch

from reactor_graph.kernels.triton_or_stub import HAVE_TRITON as _HAVE_TRITON, tl, triton  # stand-ins without Triton

__all__ = ["E4M3", "E4M3_MAX", "MAX_EXP", "head_amax_partials", "descales_from_partials", "quantize_into",
           "quantize", "head_amax_reference", "descale_for_amax_reference", "quantize_reference",
           "quantize_into_reference", "backend_for"]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MAX_EXP = 100  # |log2 descale| <= 100: finite scales both ways in float32
_BLOCK_L = 64  # tokens per program: 64 x 128 channels = 8192 elements


# ------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


@triton.jit
def _amax_kernel(x_ptr, part_ptr, L, H, sxb, sxl, sxh, n_chunks,
                 D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """part[b*H + h, c] = max |x[b, c*BLOCK_L : (c+1)*BLOCK_L, h, :]|."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = c * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < L) & (cols[None, :] < D)
    ptr = x_ptr + b * sxb + h * sxh + rows[:, None].to(tl.int64) * sxl + cols[None, :]
    x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    # tl.reduce with a combine of this module rather than tl.max (a jit function of triton.language, which a copy
    # of this module imported under TRITON_INTERPRET=1 in an otherwise compiled process cannot call)
    m = tl.reduce(tl.reduce(tl.abs(x), 1, _max2), 0, _max2)
    tl.store(part_ptr + bh.to(tl.int64) * n_chunks + c, m)


@triton.jit
def _descale_kernel(part_ptr, old_ptr, out_ptr, n_chunks, G,
                    HEADROOM_LOG2: tl.constexpr, GROW: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = the power-of-two descale of the amax over head i's group (G consecutive heads: 1 per head, B*H per
    tensor), at least old[i] with GROW."""
    i = tl.program_id(0)
    first = (i // G).to(tl.int64) * G * n_chunks
    n = G * n_chunks
    offs = tl.arange(0, BLOCK)
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for s in range(0, n, BLOCK):
        acc = tl.maximum(acc, tl.load(part_ptr + first + s + offs, mask=s + offs < n, other=0.0))
    amax = tl.reduce(acc, 0, _max2)
    # amax = (1 + m) 2^ea; 448 = 1.75 * 2^8, so amax / 448 <= 2^(ea - 8) exactly when its mantissa is <= 0.75
    bits = amax.to(tl.int32, bitcast=True)
    ea = ((bits >> 23) & 0xFF) - 127
    e = ea - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32) + HEADROOM_LOG2
    e = tl.minimum(tl.maximum(e, -100), 100)  # MAX_EXP
    d = ((e + 127) << 23).to(tl.float32, bitcast=True)
    if GROW:
        d = tl.maximum(d, tl.load(old_ptr + i))
    tl.store(out_ptr + i, d)


@triton.jit
def _round_e4m3(y):
    """y (float32, |y| <= 448) rounded to the nearest e4m3 value, ties to even, in float arithmetic."""
    a = tl.abs(y)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 a) for a normal float
    e = tl.maximum(e, -6)  # e4m3's subnormals share the step of its smallest binade, 2^-9
    up = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e): the step 2^(e - 3) becomes 1
    down = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3)
    r = ((a * up + 8388608.0) - 8388608.0) * down  # adding 2^23 rounds to an integer, ties to even
    return tl.where(y < 0, -r, r)


@triton.jit
def _quant_kernel(x_ptr, out_ptr, descale_ptr, old_ptr, L, H, sxb, sxl, sxh, sob, sol, soh, always_from,
                  D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                  HAS_OLD: tl.constexpr, SOFT: tl.constexpr):
    """out[b, l, h, :] = e4m3(clamp(x[b, l, h, :] / descale[b, h], +-448)); with HAS_OLD, rows l < always_from only
    where descale[b, h] != old[b, h] (the other rows hold that value already and are neither read nor written)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    d = tl.load(descale_ptr + bh)
    rows = c * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < L) & (cols[None, :] < D)
    if HAS_OLD:
        changed = (tl.load(old_ptr + bh) != d).to(tl.int32)
        mask = mask & (rows[:, None] + changed * L >= always_from)  # always_from <= L: every row if changed
    r64 = rows[:, None].to(tl.int64)
    x = tl.load(x_ptr + b * sxb + h * sxh + r64 * sxl + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = ((254 << 23) - d.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)  # 1 / d, exactly
    y = tl.minimum(tl.maximum(x * scale, -448.0), 448.0)
    if SOFT:
        y = _round_e4m3(y)
    optr = out_ptr + b * sob + h * soh + r64 * sol + cols[None, :]
    tl.store(optr, y.to(out_ptr.dtype.element_ty), mask=mask)


# Whether triton.jit above made interpreted kernels (TRITON_INTERPRET=1 when this module was imported).
_INTERPRET = _HAVE_TRITON and not isinstance(_amax_kernel, triton.JITFunction)


# ---------------------------------------------------------------------------------------------- launchers


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _block_l(length: int) -> int:
    return min(_BLOCK_L, max(16, _next_pow2(length)))


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check(x: torch.Tensor, what: str = "x") -> None:
    if x.dim() != 4:
        raise ValueError(f"{what}: expected [B, L, H, D], got shape {list(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"{what}: the channels must be contiguous (stride(-1) == 1), got {x.stride()}")


def _group(per: str, heads: int) -> int:
    if per == "head":
        return 1
    if per == "tensor":
        return heads
    raise ValueError(f"fp8 scale granularity {per!r}: head or tensor")


def head_amax_partials_triton(x: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D] -> partial amax [B*H, chunks] float32 (one Triton launch)."""
    _check(x)
    b, length, h, d = x.shape
    bl = _block_l(length)
    chunks = max(1, triton.cdiv(length, bl))
    part = torch.empty(b * h, chunks, dtype=torch.float32, device=x.device)
    if length == 0:
        return part.zero_()
    with _device_guard(x):
        _amax_kernel[(chunks, b * h)](x, part, length, h, x.stride(0), x.stride(1), x.stride(2), chunks,
                                      D=d, BLOCK_L=bl, BLOCK_D=_next_pow2(d), num_warps=4)
    return part


def descales_from_partials_triton(part: torch.Tensor, heads: int, per: str = "head", headroom_log2: int = 0,
                                  old: torch.Tensor | None = None) -> torch.Tensor:
    """partials [B*H, chunks] -> descale [B*H] float32 (one launch); with `old` [B*H], never below it. With
    per='tensor' a group is `heads` consecutive rows (one batch entry's heads: a tensor of [B=1] or one of k/v)."""
    n, chunks = part.shape
    g = _group(per, heads)
    out = torch.empty(n, dtype=torch.float32, device=part.device)
    block = min(1024, _next_pow2(g * chunks))
    with _device_guard(part):
        _descale_kernel[(n,)](part, old if old is not None else out, out, chunks, g, HEADROOM_LOG2=headroom_log2,
                              GROW=old is not None, BLOCK=block, num_warps=4)
    return out


def quantize_into_triton(x, out, descale, old=None, always_from: int = 0):
    _check(x)
    _check(out, "out")
    b, length, h, d = x.shape
    if length == 0:
        return out
    bl = _block_l(length)
    soft = out.dtype != E4M3
    with _device_guard(x):
        _quant_kernel[(triton.cdiv(length, bl), b * h)](
            x, out, descale, old if old is not None else descale, length, h, x.stride(0), x.stride(1), x.stride(2),
            out.stride(0), out.stride(1), out.stride(2), always_from,
            D=d, BLOCK_L=bl, BLOCK_D=_next_pow2(d), HAS_OLD=old is not None, SOFT=soft, num_warps=4)
    return out


# --------------------------------------------------------------------------------------------- references


def head_amax_reference(x: torch.Tensor, per: str = "head") -> torch.Tensor:
    """max |x| per (batch, head) [B, H] float32 (per='tensor': per batch entry, over its heads, broadcast)."""
    _check(x)
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=(1, 3)).float()  # exact: a max of x's values
    if per == "tensor":
        amax = amax.amax(dim=1, keepdim=True).expand_as(amax)
    elif per != "head":
        _group(per, 1)
    return amax


def descale_for_amax_reference(amax: torch.Tensor, headroom_log2: int = 0) -> torch.Tensor:
    """The power-of-two descale of an amax (float32 tensor, any shape): bit for bit what `_descale_kernel` gives."""
    bits = amax.float().contiguous().view(torch.int32)
    ea = ((bits >> 23) & 0xFF) - 127
    e = ea - 8 + ((bits & 0x7FFFFF) > 0x600000).to(torch.int32) + headroom_log2
    e = e.clamp(-MAX_EXP, MAX_EXP)
    return ((e + 127) << 23).to(torch.int32).view(torch.float32)


def quantize_reference(x: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """x [B, L, H, D], descale [B, H] (powers of two) -> e4m3(clamp(x / descale, +-448)), as `dtype` (e4m3, or a
    wider float holding the e4m3 values)."""
    scale = descale.float().reciprocal()[:, None, :, None]  # exact for powers of two
    q = (x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q if dtype == E4M3 else q.to(dtype)


def quantize_into_reference(x, out, descale, old=None, always_from: int = 0):
    """`quantize_into` in torch: with `old`, rows < always_from are rewritten only for heads whose descale changed
    (a select: rewriting them with an unchanged descale would give the same values anyway)."""
    q = quantize_reference(x, descale, out.dtype)
    if old is None:
        return out.copy_(q)
    length = x.shape[1]
    keep = (descale == old)[:, None, :, None] & (torch.arange(length, device=x.device) < always_from)[None, :, None, None]
    if out.dtype == E4M3:  # where() has no float8 kernel everywhere: select the bytes
        out.view(torch.uint8).copy_(torch.where(keep, out.view(torch.uint8), q.view(torch.uint8)))
    else:
        out.copy_(torch.where(keep, out, q))
    return out


# ----------------------------------------------------------------------------------------------- dispatch


def backend_for(t: torch.Tensor) -> str:
    """'triton-interpret', 'triton' or 'torch': what the public functions below run for `t`."""
    if torch.compiler.is_compiling():
        return "torch"
    if _INTERPRET:
        return "triton-interpret"
    if _HAVE_TRITON and t.is_cuda:
        return "triton"
    return "torch"


def head_amax_partials(x: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D] -> partial amax [B*H, chunks] float32 (torch: one chunk)."""
    if backend_for(x) == "torch":
        _check(x)
        return head_amax_reference(x).reshape(-1, 1)
    return head_amax_partials_triton(x)


def descales_from_partials(part: torch.Tensor, heads: int, per: str = "head", headroom_log2: int = 0,
                           old: torch.Tensor | None = None) -> torch.Tensor:
    """Partial amaxes [B*H, chunks] -> descale [B*H] float32 of the group's amax (per head, or per `heads` rows
    with per='tensor'), times 2^headroom_log2, and never below `old` [B*H] where it is given."""
    if backend_for(part) == "torch":
        g = _group(per, heads)
        amax = part.amax(dim=1).view(-1, g).amax(dim=1, keepdim=True).expand(-1, g).reshape(-1)
        d = descale_for_amax_reference(amax, headroom_log2)
        return d if old is None else torch.maximum(d, old)
    return descales_from_partials_triton(part, heads, per, headroom_log2, old)


def quantize_into(x: torch.Tensor, out: torch.Tensor, descale: torch.Tensor, old: torch.Tensor | None = None,
                  always_from: int = 0) -> torch.Tensor:
    """Quantise x [B, L, H, D] (any strides, unit channel stride) into `out` (same shape, e4m3 or a wider float
    holding e4m3 values; any strides) with descale [B, H] float32 contiguous, powers of two (what
    `descales_from_partials` gives: the kernel inverts them exactly by their bits). With old [B, H]: rows < always_from
    are written only for heads whose descale differs from old (re-scaling a cache whose scale grew). One launch,
    no allocation (capture-friendly)."""
    backend = backend_for(x)
    # the interpreter's float8 cast is not trustworthy: into an e4m3 tensor it takes the reference's cast
    if backend == "torch" or (backend == "triton-interpret" and out.dtype == E4M3):
        return quantize_into_reference(x, out, descale.view(x.shape[0], x.shape[2]),
                                       None if old is None else old.view(x.shape[0], x.shape[2]), always_from)
    return quantize_into_triton(x, out, descale, old, always_from)


def quantize(x: torch.Tensor, per: str = "head", headroom_log2: int = 0,
             dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] -> (x8 [B, L, H, D] contiguous, descale [B, H] float32 contiguous), x ~= x8 * descale.
    Three launches (partial amax, descale, cast): x is read twice and x8 written once."""
    _check(x)
    b, length, h, d = x.shape
    descale = descales_from_partials(head_amax_partials(x), h, per, headroom_log2).view(b, h)
    out = torch.empty(b, length, h, d, dtype=dtype, device=x.device)
    return quantize_into(x, out, descale), descale
