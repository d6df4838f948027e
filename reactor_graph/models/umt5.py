"""UMT5 text *encoder* (google/umt5-xxl, Wan2.1's text encoder) in plain torch.

Why our own: building Hugging Face's UMT5EncoderModel means importing `transformers`, which pulls in
torch.distributed.fsdp, sympy and torch._dynamo: about 5 s of every start on the GPU machine, most of the
Self-Forcing graph's time to its first frame. The encoder itself is small.

Parameter names are those of Hugging Face's UMT5EncoderModel, so its files load as they are:

    shared.weight                                                   token embedding [vocab, D]
    encoder.block.N.layer.0.layer_norm.weight                       RMS norm before attention [D]
    encoder.block.N.layer.0.SelfAttention.{q,k,v}.weight            [H * d_kv, D]
    encoder.block.N.layer.0.SelfAttention.o.weight                  [D, H * d_kv]
    encoder.block.N.layer.0.SelfAttention.relative_attention_bias.weight   [num_buckets, H], one table per layer
    encoder.block.N.layer.1.layer_norm.weight                       RMS norm before the FFN [D]
    encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1}.weight       [d_ff, D] (wi_0 goes through the GELU)
    encoder.block.N.layer.1.DenseReluDense.wo.weight                [D, d_ff]
    encoder.final_layer_norm.weight                                 [D]

(HF's `encoder.embed_tokens.weight` is the same tensor as `shared.weight`; `from_hf_state_dict` drops it.)

The maths (as HF's modeling_umt5.py and Wan's wan/modules/t5.py compute it)
    * pre-norm residual blocks: x + attn(norm(x)), then x + ffn(norm(x)); a final norm; no dropout (inference).
    * RMS norm: x / sqrt(mean(x^2) + eps) * weight, no mean subtraction, no bias; the statistics and the
      division in float32, the result rounded to the weight's dtype before the weight multiplies it.
    * attention: q.k WITHOUT the 1/sqrt(d_kv) factor (T5 folds it into q's init), plus the layer's relative
      position bias; padding keys masked. UMT5 differs from T5 in having a bias table in every layer (T5 shares
      layer 0's).
    * relative positions are bucketed bidirectionally: half the buckets for keys after the query, half for
      keys before; in each half, distances below half of it are exact, the rest log-spaced up to max_distance,
      beyond which they share the last bucket.
    * FFN: wo(gelu_tanh(wi_0 x) * wi_1 x) (HF's "gated-gelu" means the tanh approximation, "gelu_new").
    * float16 only: activations are clamped after each residual add when anything overflowed, as HF and Wan
      do (a device-side where, no host sync).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["UMT5Config", "UMT5EncoderModel", "relative_position_buckets", "from_hf_state_dict"]

# feed_forward_proj values that mean the tanh-approximated gated GELU (HF maps "gated-gelu" to "gelu_new")
_GATED_GELU_TANH = ("gated-gelu", "gated-gelu_new", "gated-gelu_pytorch_tanh")


@dataclass(frozen=True)
class UMT5Config:
    """The architecture fields of a Hugging Face UMT5 config.json (defaults: HF's UMT5Config)."""
    vocab_size: int = 250112
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "UMT5 config") -> "UMT5Config":
        """The fields this encoder uses, from a config dict (other keys, e.g. decoder ones, are ignored)."""
        out = cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg})
        if out.feed_forward_proj not in _GATED_GELU_TANH:
            raise ValueError(f"{where}: feed_forward_proj is '{out.feed_forward_proj}'; this UMT5 encoder has the "
                             f"gated tanh-GELU FFN of UMT5 ({' or '.join(_GATED_GELU_TANH)})")
        if out.relative_attention_num_buckets < 4 or out.relative_attention_num_buckets % 2:
            raise ValueError(f"{where}: relative_attention_num_buckets is {out.relative_attention_num_buckets}; "
                             f"bidirectional bucketing needs an even number >= 4 (UMT5: 32)")
        return out


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """Bidirectional T5 bucket of (key position - query position) for every pair: [L_q, L_k] long in
    [0, num_buckets)."""
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # [L_q, L_k]: > 0 for keys after the query
    half = num_buckets // 2
    out = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    # log-spaced buckets from `exact` up to max_distance; clamp(min=1) only keeps log() finite where the exact
    # branch is taken anyway
    far = exact + (torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                   * (half - exact)).long()
    far = far.clamp(max=half - 1)
    return out + torch.where(dist < exact, dist, far)


class Embedding(nn.Embedding):
    """nn.Embedding that does not initialise a meta-device weight: normal_ on a meta tensor runs a Python
    reference wrapped in torch._disable_dynamo, whose first call imports Dynamo (seconds of every start), and a
    meta tensor has no values to set anyway (the node initialises or loads after to_empty)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    """T5's layer norm (named as HF's UMT5LayerNorm's parameter: `weight`)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 whatever x's dtype: bf16 sums of 4096 squares lose the scale
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(self.weight.dtype)


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    # HF's and Wan's overflow guard: +-inf becomes the largest finite value less a margin, only once any did
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, -limit, limit)


class SelfAttention(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.relative_attention_bias = Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        # x [B, L, D], buckets [L, L] long, keep [B, 1, 1, L] bool (False: a padding key) or None
        b, n = x.shape[:2]
        q, k, v = (proj(x).view(b, n, self.heads, self.d_kv).transpose(1, 2)  # [B, H, L, d_kv]
                   for proj in (self.q, self.k, self.v))
        bias = self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # [1, H, L, L]
        if keep is not None:
            # the lowest finite value, not -inf or a bool mask: a row with every key masked (an empty prompt)
            # softmaxes to finite weights on every SDPA backend (some give NaN for a row of -inf)
            bias = bias.masked_fill(~keep, torch.finfo(bias.dtype).min)  # [B, H, L, L]
        # contiguous: the permuted table's last dim is strided, and the fused kernels want a dense bias
        bias = bias.to(q.dtype).contiguous()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # [B, H, L, d_kv]
        return self.o(o.transpose(1, 2).reshape(b, n, self.heads * self.d_kv))


class AttentionLayer(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        # registered before layer_norm, as HF does: the seeded random init walks the parameters in this order
        self.SelfAttention = SelfAttention(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x, buckets, keep):
        return _clamp_fp16(x + self.SelfAttention(self.layer_norm(x), buckets, keep))


class GatedGelu(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class FeedForwardLayer(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.DenseReluDense = GatedGelu(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x):
        return _clamp_fp16(x + self.DenseReluDense(self.layer_norm(x)))


class Block(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.layer = nn.ModuleList([AttentionLayer(cfg), FeedForwardLayer(cfg)])

    def forward(self, x, buckets, keep):
        return self.layer[1](self.layer[0](x, buckets, keep))


class Stack(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.block = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class UMT5EncoderModel(nn.Module):
    """ids [B, L] (+ mask [B, L], 1 = token, 0 = padding) -> features [B, L, D] (padding rows are not zeroed)."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.shared(ids)  # [B, L, D]
        buckets = relative_position_buckets(ids.shape[1], self.cfg.relative_attention_num_buckets,
                                            self.cfg.relative_attention_max_distance, ids.device)  # [L, L]
        keep = None if mask is None else mask[:, None, None, :].bool()  # [B, 1, 1, L]
        for block in self.encoder.block:
            x = block(x, buckets, keep)
        return self.encoder.final_layer_norm(x)


def from_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A HF UMT5EncoderModel state dict as this model's: `encoder.embed_tokens.weight` (HF's tied copy of
    `shared.weight`) dropped, or taken as `shared.weight` where a file saved only the copy."""
    sd = dict(sd)
    tied = sd.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in sd and tied is not None:
        sd["shared.weight"] = tied
    return sd
