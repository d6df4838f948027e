"""A small text encoder: a deterministic word tokenizer (no vocabulary download) and a tiny transformer."""
from __future__ import annotations

import re
import zlib

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from reactor_graph.node import Node, Port, register
from reactor_graph.weights import load_into


class WordTokenizer:
    """Lower-cased words hashed (crc32) into a fixed id range; id 0 pads. Same ids on every machine."""

    def __init__(self, vocab_size: int, max_tokens: int):
        self.vocab_size, self.max_tokens = vocab_size, max_tokens

    def __call__(self, text: str) -> torch.Tensor:
        words = re.findall(r"[a-z0-9]+", text.lower())[: self.max_tokens]
        ids = [1 + zlib.crc32(w.encode()) % (self.vocab_size - 1) for w in words]
        return torch.tensor(ids + [0] * (self.max_tokens - len(ids)), dtype=torch.long)  # [L]


class TextEncoderModel(nn.Module):
    def __init__(self, vocab_size: int, dim: int, max_tokens: int, layers: int, heads: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [B, L] -> [B, L, D]; padded positions come out as zeros so they carry no signal.
        pad = ids == 0
        x = self.embed(ids) + self.pos
        x = self.layers(x, src_key_padding_mask=pad)
        return self.norm(x) * (~pad).unsqueeze(-1)


@register("text_encoder")
class TextEncoder(Node):
    description = "Encodes a prompt into token embeddings; runs only when the prompt changes."

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        vocab_size: int = Field(4096, ge=16, description="hash buckets for words")
        dim: int = Field(64, ge=8, description="embedding width")
        max_tokens: int = Field(16, ge=1, le=512, description="prompt length in words (longer is cut)")
        layers: int = Field(1, ge=0, le=24)
        heads: int = Field(4, ge=1)
        weights: str | None = Field(None, description="local safetensors/torch file; random init if absent")
        weights_prefix: str = Field("", description="key prefix to take from a shared weights file")
        vocabulary: list[str] = Field(default_factory=list, description="the words it was trained to understand "
                                      "(empty: it does not say); a prompt with none of them is refused")
        filler: list[str] = Field(default_factory=list, description="words it reads past (a, the, on...)")
        examples: list[str] = Field(default_factory=list, description="prompts to offer a user")

    inputs = {"text": Port("str", description="the prompt")}

    def ports(self):
        p = self.params
        return dict(self.inputs), {"embeds": Port("tensor", "float", (p.max_tokens, p.dim), "token embeddings [L, D]")}

    def __init__(self, name, params, graph):
        super().__init__(name, params, graph)
        if params.dim % params.heads:
            raise ValueError(f"dim ({params.dim}) must be divisible by heads ({params.heads})")
        self.tokenizer = WordTokenizer(params.vocab_size, params.max_tokens)

    def words(self, text: str) -> tuple[list[str], list[str]]:
        """(understood, not understood) words of a prompt, by `vocabulary` and `filler` (all understood if
        the node declares no vocabulary)."""
        words = re.findall(r"[a-z0-9]+", text.lower())
        if not self.params.vocabulary:
            return words, []
        known = set(self.params.vocabulary)
        ignored = set(self.params.filler)
        return [w for w in words if w in known], [w for w in words if w not in known and w not in ignored]

    def check_input(self, port, value):
        if port != "text" or not self.params.vocabulary or not isinstance(value, str):
            return None
        known, unknown = self.words(value)
        if not known:
            example = f"; try e.g. '{self.params.examples[0]}'" if self.params.examples else ""
            raise ValueError(f"no word of this prompt is one the model understands"
                             f"{' (not understood: ' + ', '.join(unknown) + ')' if unknown else ''}; it knows: "
                             f"{', '.join(self.params.vocabulary)}{example}")
        if unknown:
            return "not understood (ignored): " + ", ".join(dict.fromkeys(unknown))
        return None

    def understands(self):
        p = self.params
        if not (p.vocabulary or p.examples):
            return None
        return {"vocabulary": list(p.vocabulary), "examples": list(p.examples)}

    def load(self, device, dtype):
        super().load(device, dtype)
        p = self.params
        torch.manual_seed(self.graph.seed + 1)
        self.model = TextEncoderModel(p.vocab_size, p.dim, p.max_tokens, p.layers, p.heads)
        if p.weights:
            load_into(self.model, p.weights, self.graph.root, p.weights_prefix)
        self.model.to(device=device, dtype=dtype).eval()

    def forward(self, text: str):
        ids = self.tokenizer(text).to(self.device)[None]
        return {"embeds": self.model(ids)[0]}  # [L, D]
