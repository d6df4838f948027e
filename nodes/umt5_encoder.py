"""UMT5 text encoder (Wan2.1's umt5-xxl) as an on-change node: a prompt -> T5 features [max_tokens, dim].

The model is our own plain-torch encoder (reactor_graph/models/umt5.py) with Hugging Face's UMT5EncoderModel
parameter names, built from a local config, never downloaded. `transformers` is not needed for it (importing it
costs seconds of every start); only a real `tokenizer:` folder is read with transformers' AutoTokenizer, and
loading such a node without it says how to install it.

Params
    config      "umt5-xxl" (built-in: Wan2.1's text encoder, d_model 4096, 24 layers), "tiny" (built-in, for
                tests), or a local folder holding config.json (e.g. Wan2.1-T2V-1.3B-Diffusers/text_encoder) or a
                JSON file.
    weights     "random" (seeded N(0, 1/fan_in) init, directly on the device), a local folder in Hugging Face
                `from_pretrained` layout (model.safetensors, or shards and model.safetensors.index.json, or
                pytorch_model.bin; its config.json, if there, must agree with `config`), or one file (safetensors
                or torch) with Hugging Face key names or Wan's own (`models_t5_umt5-xxl-enc-bf16.pth`:
                token_embedding, blocks.N.attn.q, ...; mapped to Hugging Face names on load).
    tokenizer   a local tokenizer folder (AutoTokenizer, so this needs `transformers`; e.g. google/umt5-xxl's
                files), or none: the deterministic hashing word tokenizer of the text_encoder node (same ids on
                every machine, no vocabulary; fine for random weights and tests, meaningless for real weights).
    max_tokens  512 (Wan's text_len); the prompt is cut there.

Prompt clean-up: as Wan's tokenizer (`clean='whitespace'`): `ftfy.fix_text` (mojibake such as "cafÃ©"), HTML
entities unescaped twice ("Tom &amp; Jerry", "&amp;lt;3"), whitespace runs collapsed. `ftfy` comes with the `wan`
extra; a node with a real tokenizer refuses to load without it (the ids would differ from Wan's), the built-in word
tokenizer goes on without it.

Output: features of the prompt's tokens, zero after its last token (Wan trims the T5 output to the prompt's length
and zero-pads it to 512 before the DiT's text embedding); in the graph's dtype.
"""
from __future__ import annotations

import dataclasses
import html
import json
import re
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from reactor_graph.models.umt5 import UMT5Config, UMT5EncoderModel, from_hf_state_dict
from reactor_graph.node import Node, Port, register
from reactor_graph.nodes.text_encoder import WordTokenizer
from reactor_graph.weights import RANDOM, read_hf_folder, read_state_dict, resolve, resolve_weights

PRESETS = {
    # google/umt5-xxl encoder, as Wan2.1 uses it
    "umt5-xxl": dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                     layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1),
    "tiny": dict(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, relative_attention_max_distance=16,
                 feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                 layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1),
}

_INSTALL = ("the umt5_encoder node reads a `tokenizer:` folder with the `transformers` package (AutoTokenizer), "
            "which is not installed here: pip install 'transformers>=4.40' sentencepiece (or 'reactor-graph[wan]'); "
            "or leave `tokenizer` out for the built-in word tokenizer")


def read_config(config: str, root) -> dict:
    if config in PRESETS:
        return dict(PRESETS[config])
    p = resolve(config, root)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ValueError(f"config '{config}': {p} does not exist; use a preset ({', '.join(PRESETS)}) or a local "
                         f"folder holding config.json")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"config {p} is not readable JSON: {exc}") from None
    if "d_model" not in cfg:
        raise ValueError(f"config {p} is not a T5/UMT5 config (no d_model)")
    return cfg


def clean_prompt(text: str, fix_text=None) -> str:
    """Wan's prompt clean-up before tokenizing (`basic_clean` then `whitespace_clean`): ftfy's fix_text (skipped
    when `fix_text` is None), HTML unescaped twice, whitespace runs to one space, stripped."""
    if fix_text is not None:
        text = fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _ftfy():
    try:
        import ftfy
    except ImportError:
        return None
    return ftfy.fix_text


_WAN_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def hf_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face UMT5EncoderModel names for a state dict in HF or in Wan's own T5 naming."""
    if "token_embedding.weight" not in sd:
        return sd
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
        if k == "token_embedding.weight":
            out["shared.weight"] = v
        elif k == "norm.weight":
            out["encoder.final_layer_norm.weight"] = v
        elif m and m.group(2) in _WAN_BLOCK:
            out[f"encoder.block.{m.group(1)}.{_WAN_BLOCK[m.group(2)]}"] = v
        else:
            out[k] = v  # reported as unexpected
    return out


@torch.no_grad()
def init_random_t5_(model: UMT5EncoderModel, cfg: UMT5Config, seed: int) -> None:
    """N(0, 1/fan_in) weights (q further scaled by 1/sqrt(d_kv): T5 does not scale attention scores; outputs by
    1/sqrt(2*layers)), unit norms, N(0, 1) embeddings: activations stay O(1) in bf16."""
    g = None
    layers = max(1, cfg.num_layers)
    for name, p in model.named_parameters():
        if g is None:
            g = torch.Generator(device=p.device).manual_seed(seed)
        if name.endswith("layer_norm.weight"):
            p.fill_(1.0)
        elif name == "shared.weight":
            p.normal_(0.0, 1.0, generator=g)
        elif name.endswith("relative_attention_bias.weight"):
            p.normal_(0.0, 0.5, generator=g)
        else:
            std = p.shape[1] ** -0.5
            if name.endswith("SelfAttention.q.weight"):
                std /= cfg.d_kv ** 0.5
            elif name.endswith(("SelfAttention.o.weight", "DenseReluDense.wo.weight")):
                std /= (2 * layers) ** 0.5
            p.normal_(0.0, std, generator=g)


@register("umt5_encoder")
class UMT5Encoder(Node):
    description = ("UMT5 text encoder (Wan2.1's umt5-xxl; our own torch model, HF/Wan checkpoints load as they "
                   "are): prompt -> T5 features [L, D], zero after the prompt's tokens; runs only when the prompt "
                   "changes.")
    accepts_random_weights = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        config: str = Field("umt5-xxl", description="'umt5-xxl', 'tiny', or a local config folder / JSON file")
        weights: str = Field(RANDOM, description="'random', a local from_pretrained folder, or a safetensors/torch "
                                                 "file (HF or Wan key names)")
        tokenizer: str | None = Field(None, description="local tokenizer folder (needs transformers); none: "
                                                        "hashing word tokenizer")
        max_tokens: int = Field(512, ge=1, le=4096, description="tokens kept (Wan: 512)")
        dim: int | None = Field(None, description="feature width; must equal the config's d_model (4096)")
        layers: int | None = Field(None, ge=1, le=64, description="fewer layers (random weights only; smoke tests)")
        seed: int = Field(0, description="seed of random weights (added to the graph's seed)")

    inputs = {"text": Port("str", description="the prompt")}

    def __init__(self, name, params, graph):
        super().__init__(name, params, graph)
        p = params
        self.config = read_config(p.config, graph.root)
        if p.layers is not None:
            if p.weights != RANDOM:
                raise ValueError("layers can only be changed with `weights: random` (a checkpoint fixes the depth)")
            self.config["num_layers"] = p.layers
        self.arch = UMT5Config.from_dict(self.config, f"config '{p.config}'")
        d = self.arch.d_model
        if p.dim is not None and p.dim != d:
            raise ValueError(f"dim is {p.dim} but the config's d_model is {d}")
        self.dim = d
        self.tokenizer = None
        self._fix_text = _ftfy()
        self.word_tokenizer = WordTokenizer(self.arch.vocab_size, p.max_tokens)

    def ports(self):
        return dict(self.inputs), {"embeds": Port("tensor", "float", (self.params.max_tokens, self.dim),
                                                  "T5 features [L, D], zeros after the prompt's tokens")}

    def load(self, device, dtype):
        super().load(device, dtype)
        p = self.params
        if p.tokenizer:  # before the weights: a missing package should not cost an 11 GB read first
            self.tokenizer = self._load_tokenizer(resolve(p.tokenizer, self.graph.root))
        with torch.device("meta"):
            model = UMT5EncoderModel(self.arch)
        model.to(dtype)
        if p.weights == RANDOM:
            model.to_empty(device=device)
            init_random_t5_(model, self.arch, self.graph.seed + p.seed)
        else:
            path = resolve(p.weights, self.graph.root)
            if path.is_dir():
                self._check_folder_config(path)
                sd = read_hf_folder(path)
            else:
                path = resolve_weights(p.weights, self.graph.root, "UMT5")
                sd = read_state_dict(path)
            self._load_weights(model, sd, path)
            model.to(device)
        self.model = model.eval().requires_grad_(False)

    def _load_tokenizer(self, folder: Path):
        if not folder.exists():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist (tokenizers are read from local "
                                    f"files only; leave `tokenizer` out for the built-in word tokenizer)")
        try:
            from transformers import AutoTokenizer  # only here: its import costs seconds of every start
        except ImportError as exc:
            raise RuntimeError(f"{_INSTALL} ({exc})") from None
        if self._fix_text is None:
            raise RuntimeError("the umt5_encoder node cleans prompts as Wan does, with `ftfy`, which is not "
                               "installed here: pip install ftfy (or reactor-graph[wan])")
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)

    def _check_folder_config(self, folder: Path) -> None:
        """A from_pretrained folder's config.json describes its weights: fields that no tensor shape shows
        (max_distance, eps, the FFN) must agree with the node's config too, or the features are silently wrong."""
        f = folder / "config.json"
        if not f.exists():
            return
        try:
            theirs = UMT5Config.from_dict(json.loads(f.read_text()), str(f))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{f} is not readable JSON: {exc}") from None
        diff = [f"{k}: {getattr(theirs, k)} there, {getattr(self.arch, k)} in config '{self.params.config}'"
                for k in dataclasses.asdict(theirs) if getattr(theirs, k) != getattr(self.arch, k)]
        if diff:
            raise ValueError(f"UMT5 weights folder {folder}: its config.json differs from the node's config "
                             f"({'; '.join(diff)}); set `config: {folder}`")

    @staticmethod
    def _load_weights(model: UMT5EncoderModel, sd: dict[str, torch.Tensor], path: Path) -> None:
        sd = from_hf_state_dict(hf_keys(sd))
        want = model.state_dict()
        missing = sorted(set(want) - set(sd))
        unexpected = sorted(set(sd) - set(want))
        bad = [f"{k} {list(sd[k].shape)} vs {list(want[k].shape)}" for k in want
               if k in sd and sd[k].shape != want[k].shape]
        if missing or unexpected or bad:
            def few(keys):
                return ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "") or "none"

            raise ValueError(f"UMT5 weights {path} do not fit the config: missing keys: {few(missing)}; unexpected "
                             f"keys: {few(unexpected)}; shape mismatches: {few(bad)}")
        model.load_state_dict({k: sd[k].to(want[k].dtype) for k in want}, assign=True)

    def tokenize(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, attention mask [1, max_tokens] (long)."""
        text = clean_prompt(text, self._fix_text)
        if self.tokenizer is None:
            ids = self.word_tokenizer(text)[None]
            return ids, (ids != 0).long()
        enc = self.tokenizer(text, max_length=self.params.max_tokens, truncation=True, padding="max_length",
                             add_special_tokens=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def forward(self, text: str):
        ids, mask = self.tokenize(text)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.no_grad():
            h = self.model(ids, mask)[0]  # [L, D]
        return {"embeds": (h * mask[0, :, None].to(h.dtype)).to(self.dtype)}
