"""The FP8 (e4m3) copy of a `KVCache` that the FP8 self-attention (`attention: fa3_fp8`) reads.

Why a copy: quantising the whole cache on every attention call re-reads and re-writes ~100 MB of keys and values
per layer and pass (30 layers x 5 passes a block at Self-Forcing's 21-frame window), more time than FP8 saves in
the kernel. But the earlier blocks' keys/values do not change while a block is denoised; only the block's own
(staged) ones do. So the earlier blocks are quantised once, when the block is written into the cache, and each
denoising pass quantises only the block's own tokens (and q).

Layout: `kv8` [layers, 2, B, max_tokens, heads, head_dim] e4m3, beside the bf16 `KVCache.kv` (same slots; rolled
with it, `KVCache.roll_`), and `descale` [layers, 2, B, heads] float32: ONE scale per (layer, k/v, batch, head)
for every slot, since FlashAttention-3 takes one k and one v descale per (batch, head) for the whole key range.
The bf16 cache stays the source of truth: the re-cache pass, the roll, the SDPA/bf16 kernels and the reference
paths read it, and a scale change re-quantises from it (one rounding, never e4m3 -> e4m3). Invariant, after every
cache write: kv8[l, :, :, :valid] == quantize(kv[l, :, :, :valid], descale[l]) bit for bit, `valid` the slots
written so far (`refresh_` re-establishes it from the bf16 cache for all slots).

Scale policy (device arithmetic only: no `.item()`, no host branch on values, so it is captured in CUDA graphs)
  * a scale is a power of two with headroom: descale = 2^e, the smallest with 448 * 2^e >= amax * 2^HEADROOM_LOG2
    (kernels/fp8_head_quant.py); the values then use e4m3 up to 448 / 2^HEADROOM_LOG2 .. 448 / 2^(HEADROOM_LOG2+1);
  * a cache write at slot 0 (a session's first block, the re-cache pass) sets it from the written range's amax;
  * a later write keeps it unless the written block's amax needs more: the descale only grows (running max);
    a growth re-quantises that head's earlier slots from the bf16 cache in the same launch as the block's own
    quantisation (once per block, only the heads that grew: powers of two make growth rare, every growth at
    least doubles the scale);
  * a denoising pass quantises the block's own k/v with the layer's current scale; values beyond it saturate at
    +-448. The first block of a session (slot 0: nothing cached before it) uses its own amax each pass instead.
  The headroom is for those denoising passes: their keys/values come from noisy latents at other timesteps than
  the clean ones the scale was set from, and must not saturate. It costs nothing measurable otherwise: e4m3's
  relative precision does not depend on the scale; only values 2^-6 below the top of the range and further
  (subnormals) lose digits: with power-of-two scales the e4m3 value of a normal is the same at any headroom.
  Measured (bench/fp8_kv_headroom.py, CPU, the torch reference, Wan 1.3B widths with 2 layers, random weights,
  10 blocks of Self-Forcing's rolling stream against float SDPA): the denoising passes' k/v amax reached 1.30x
  (k) and 1.28x (v) the running clean amax; latent error 0.046% mean, 0.073% max at headroom 2^0, 2^2 and 2^4
  alike, nothing saturated (the first, per-call version: 0.046% / 0.076%). 2^0 would leave as little as 1x
  (power-of-two rounding), so HEADROOM_LOG2 = 2: values up to 4x (at least) the clean amax stay unsaturated,
  margin for trained weights whose timestep modulation may spread the noisy passes further.
"""
from __future__ import annotations

import torch

from reactor_graph.kernels import fp8_head_quant as Q

__all__ = ["HEADROOM_LOG2", "Fp8KVCache"]

HEADROOM_LOG2 = 2


class Fp8KVCache:
    """The e4m3 copy of `cache.kv` (see the module docstring). `per`: 'head' (one scale per batch and head) or
    'tensor' (one per layer, k/v and batch entry, broadcast over heads). `dtype`: e4m3, or a wider float holding
    e4m3 values (Triton's interpreter: its float8 cast is not trustworthy)."""

    def __init__(self, cache, per: str = "head", headroom_log2: int = HEADROOM_LOG2,
                 dtype: torch.dtype = Q.E4M3):
        if per not in ("head", "tensor"):
            raise ValueError(f"fp8 scale granularity {per!r}: head or tensor")
        self.cache = cache
        self.per = per
        self.headroom_log2 = int(headroom_log2)
        layers, two, b, t, h, d = cache.kv.shape
        self.heads = h
        self.kv8 = torch.zeros(layers, two, b, t, h, d, dtype=dtype, device=cache.kv.device)
        self.descale = torch.ones(layers, two, b, h, dtype=torch.float32, device=cache.kv.device)
        # set by forward_block when a kernel that does not read this copy writes the bf16 cache (a Python flag:
        # it is acted on where the FP8 kernel next runs, by a refresh)
        self.stale = False

    def nbytes(self) -> int:
        return self.kv8.numel() * self.kv8.element_size() + self.descale.numel() * 4

    @torch.no_grad()
    def reset_(self) -> None:
        self.kv8.zero_()
        self.descale.fill_(1.0)
        self.stale = False

    # -- writes

    def _layer_flat(self, layer: int):
        """Layer `layer`'s bf16 cache, FP8 copy and descale with keys and values side by side as a batch of 2B:
        [2B, T, H, D], [2B, T, H, D], [2B*H] (views: one launch covers both)."""
        return self.cache.kv[layer].flatten(0, 1), self.kv8[layer].flatten(0, 1), self.descale[layer].view(-1)

    @torch.no_grad()
    def write_(self, layer: int, start: int, end: int) -> None:
        """After the bf16 cache's slots [start, end) of `layer` were written: fold their amax into the scale and
        quantise them, re-quantising [0, start) of the heads whose scale grew. At start 0 the scale is set afresh
        from [0, end). Three launches."""
        kv, kv8, descale = self._layer_flat(layer)
        part = Q.head_amax_partials(kv[:, start:end])
        if start == 0:
            new = Q.descales_from_partials(part, self.heads, self.per, self.headroom_log2)
            Q.quantize_into(kv[:, :end], kv8[:, :end], new)
        else:
            new = Q.descales_from_partials(part, self.heads, self.per, self.headroom_log2, old=descale)
            Q.quantize_into(kv[:, :end], kv8[:, :end], new, old=descale, always_from=start)
        descale.copy_(new)

    @torch.no_grad()
    def stage_(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int, end: int) -> None:
        """A denoising pass: the block's own k/v [B, L, H, D] into slots [start, end) of the copy, with the
        layer's scale (saturating), or at start 0 with their own. Not the bf16 cache: nothing reads its slot
        before the block's write pass rewrites it."""
        for i, x in enumerate((k, v)):
            dst = self.kv8[layer, i, :, start:end]
            descale = self.descale[layer, i]
            if start == 0:
                part = Q.head_amax_partials(x)
                descale.copy_(Q.descales_from_partials(part, self.heads, self.per, self.headroom_log2)
                              .view_as(descale))
            Q.quantize_into(x, dst, descale)

    @torch.no_grad()
    def refresh_(self) -> None:
        """Quantise the whole bf16 cache afresh (every slot, each layer's scale from its amax): after the bf16
        cache was written by other means (a copy from another cache, a kernel that does not keep this copy)."""
        for layer in range(self.kv8.shape[0]):
            self.write_(layer, 0, self.kv8.shape[3])
        self.stale = False

    # -- reads

    def keys_values(self, layer: int, end: int):
        """(k8, k_descale, v8, v_descale) of slots [0, end): [B, end, H, D] views and [B, H] float32."""
        return (self.kv8[layer, 0, :, :end], self.descale[layer, 0], self.kv8[layer, 1, :, :end],
                self.descale[layer, 1])

    def dequantized(self, layer: int, end: int, dtype: torch.dtype = torch.float32):
        """The keys and values the FP8 kernel sees, [B, end, H, D] each (checks and the torch reference)."""
        k8, kd, v8, vd = self.keys_values(layer, end)
        return ((k8.float() * kd[:, None, :, None]).to(dtype), (v8.float() * vd[:, None, :, None]).to(dtype))
