"""Wan2.1 block-causal few-step DiT (Self-Forcing / CausVid / LongLive) as a hot-path node.

Wraps `reactor_graph.models.wan_dit` (WanDiT + KVCache + FlowMatchSchedule + BlockCausalWan): every block it
denoises `frames_per_block` latent frames in `steps` flow-matching steps against the KV cache of earlier blocks,
then writes the clean block's keys/values into the cache.

Ports
    cond    [L, text_dim]      T5 features of the prompt (umt5_encoder), L <= the config's text_len (512);
                               shorter inputs are zero-padded as Wan pads them.
    noise   [C, S*T, h, w]     with `noise: per_step` (default): S = steps noise blocks side by side along time;
                               chunk 0 is x_T, chunk i re-noises the x0 prediction to step i (Self-Forcing draws
                               fresh noise at every step). A plain `noise` node of shape [16, S*T, h, w] feeds it.
            [C, T, h, w]       with `noise: once`: one noise block, reused to re-noise at every step.
    latents [C, T, h, w]       the clean block (x0), in the graph's dtype, at a fixed address.

Phases
    From the cache: max_frames / frames_per_block filling phases, then (rolling) one rolling phase for every
    later block; Self-Forcing's 21-frame cache with 3-frame blocks has 7 + 1 = 8. Without rolling the node is
    finite (`max_blocks` = the cache's blocks) and the loop restarts the sequence after it, like the 5 s clips
    Self-Forcing was trained on. With `recache`, every phase with a non-empty cache has a re-cache twin (phase
    number + num_base_phases - 1), which the engine picks through `phase_on_change` when `cond` changed.

Text cross-attention
    The prompt's cross-attention keys/values (text_embedding + 30 layers of k/v projections over 512 tokens) are
    computed inside the hot path, once per block (`BlockCausalWan.generate_block(context=...)` writes them into
    the cache's `cross` buffer, then the 5 forward passes of the block read them). At the 1.3B size that is
    0.154 TFLOP per block against 80 TFLOP (first block) to 201 TFLOP (rolling, 21-frame cache) for the
    block's five DiT passes at 480x832: 0.08-0.2 % (FlopCounterMode on the meta device, `block_flops()` below).
    Caching them per prompt is not worth a second on-change node and a 94 MB static buffer copy; the text
    features arrive in the engine's static buffer and a new prompt is visible in the next block, no recompile.
    With `recache: false` (default) the self-attention cache keeps the keys/values computed under the old
    prompt and only cross-attention switches. `recache: true` is LongLive's KV re-cache: in the block where new
    text features arrive, before the block's roll, the cached frames are re-encoded from their clean latents
    under the new prompt in one pass in which they all attend to each other (as LongLive's
    `_recache_after_switch` with its global sink: once the cache has rolled, the sink keeps the old prompt's
    keys/values and only the window is re-encoded). Once per switch, one pass of at most max_frames frames.

Rolling and positions
    As the official Self-Forcing and LongLive code: RoPE positions are absolute frame indices (the sink at
    [0, sink_frames), the block at its frame in the video); cached keys are rotated once, when written, and the
    roll only moves them, so bf16 keys are rounded once however long the stream runs. The position counter lives
    on the device; the rolling phase stays one captured program.

Attention
    `attention` picks the self-attention kernel over the cache (reactor_graph/models/attention.py): `auto` (the
    default) takes FlashAttention-3 (bf16, as exact as SDPA, faster on these shapes) where the optional `fa3_fwd`
    wheel imports and the GPU is a Hopper (sm90), else PyTorch's SDPA (cuDNN's kernel on Hopper); `fa3_fp8` runs
    FA3 on e4m3 q/k/v whose per-head scales are computed on the device inside the captured graph; its keys/values
    come from an e4m3 copy of the KV cache kept beside the bf16 one (models/fp8_kv_cache.py: earlier blocks are
    quantised once, when written; each pass quantises only the block's own tokens and q). Asking for
    fa3/fa3_fp8 where FA3 cannot run fails the load (no silent fallback). The choice made is `attention_path`.
    Cross-attention (512 text tokens) stays on SDPA.

Linear layers
    `linears: bf16` (default) or `fp8`: the blocks' self-attention q/k/v/o, cross-attention q/o and FFN layers on
    e4m3 weights (per output channel scales, quantised once at load, after any LoRA merge) through
    `torch._scaled_mm` with row-wise scales (reactor_graph/models/fp8_linear.py). Each activation is quantised per
    token by the kernel that makes it (kernels/fp8_act_quant.py): LayerNorm + adaLN modulation before q/k/v (one
    quantised input for the three) and the FFN, the cross-attention's LayerNorm before its q, bias + GELU between
    the two FFN matmuls; the two attention outputs get one small quantisation pass each before their o
    projections. The text cross-attention k/v stay bf16 (once per prompt). Not with `lora_swap` (it rewrites bf16
    weights in place). Off CUDA the FP8 product is its torch reference (dequantised operands), for tests.

Compilation
    `compile: regional` (default). The engine compiles (torch.compile) and CUDA-graph captures whole hot paths;
    traced whole, this node is 5 passes x 30 layers unrolled per phase, and every phase (8) is traced again:
    many minutes of inductor time at the 1.3B size. So, when the engine traces it, the node hides its body from
    the engine's trace (`torch.compiler.disable`: one graph break) and has its repeated pieces compiled,
    once each: a layer's pre-attention (`WanBlock.qkv`) and post-attention (`WanBlock.finish`) parts (the
    rolling cache's roll is plain copies: keys keep their RoPE, nothing to compile there). Their shapes do not
    depend on the phase (attention, whose key length does, runs between them as one SDPA call), so they compile
    once for all 30 layers and all phases. The engine's CUDA graph then captures the whole block as usual.
    `region_compiles` counts those compilations.
    `compile: whole` lets the engine trace the node like any other (fine for the tiny config).
    The engine compiles the pieces (`compile_regions`, its one torch.compile) with its own backend;
    `compile_backend` is for the node traced outside an engine (default inductor on CUDA, aot_eager elsewhere).
    In `eager` engine mode neither applies: the node runs the plain model.

Weights
    `weights: random` (the shipped graphs' default) initialises with `init_random_` (seeded by `seed` plus the
    graph's seed), directly on the device. Otherwise a local file: a Wan2.1 / CausVid / Self-Forcing / LongLive
    checkpoint (safetensors or torch; wrappers such as `generator_ema` and prefixes such as `model.` are handled by
    `load_wan_state_dict`), or a folder holding Wan's `diffusion_pytorch_model.safetensors`. Relative paths
    resolve against the graph file's folder.
    EMA: training checkpoints hold both `generator` and `generator_ema`. `prefer_ema: true` (default) takes the
    EMA weights, Self-Forcing's choice; LongLive's inference configs take `generator` (`use_ema: false`), so its
    graph sets `prefer_ema: false`. A checkpoint with only one of them loads that one either way.
    LoRA: `lora:` a local LoRA file merged into the weights at load: peft-style keys (LongLive's `lora.pt`,
    `base_model.model.<module>.lora_A/lora_B.weight`, optionally under `generator_lora`) or Wan/kohya-style
    (`diffusion_model.<module>.lora_down/lora_up.weight` with `alpha`, `lora_unet_...`, `diff`/`diff_b`). The update
    is lora_scale * alpha / rank * B @ A, formed in float32 and rounded to the weights' dtype once; alpha from the
    file, else `lora_alpha`, else the rank (LongLive: rank 256, alpha 256, a factor of 1). A key that names no
    linear layer of the model, or a factor of the wrong shape, fails the load naming them.
    LoRA swap: with `lora_swap: device` (or `host`) the unmerged block weights are kept; an alternative of this
    type with `swap_into: <this node>` and its own `lora:` loads only its LoRA, and swapping to it rewrites the
    merged weights in place at a block boundary (`swap_in_place`; base + new LoRA, so nothing accumulates):
    the parameters keep their storage, so no recompile and no recapture; swapping back to this node restores its
    own LoRA. The KV cache keeps what the previous weights wrote (the stream goes on).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from reactor_graph.node import Node, Port, register
from reactor_graph.untraced import not_traced
from reactor_graph.weights import RANDOM, resolve, resolve_weights, use_random_weights  # noqa: F401 - re-exported

log = logging.getLogger("reactor_graph")

CONFIGS = ("1.3b", "14b", "tiny")
LINEARS = ("bf16", "fp8")


def wan_config(name: str, layers: int | None = None):
    from reactor_graph.models.wan_dit import WanConfig

    cfg = {"1.3b": WanConfig.wan_1_3b, "14b": WanConfig.wan_14b, "tiny": WanConfig.tiny}[name]()
    return dataclasses.replace(cfg, num_layers=layers) if layers else cfg




def check_strength(value) -> float:
    """A strength a command may write: a number in (0, 1] (ValueError otherwise, so the command is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {value!r}")
    return float(value)


@register("wan_causal_dit")
class WanCausalDiT(Node):
    description = ("Wan2.1 block-causal few-step DiT with a static KV cache (Self-Forcing, CausVid, LongLive): "
                   "T5 features + noise -> one clean latent block [16, T, h, w] per block.")
    every_block = True
    accepts_random_weights = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        config: Literal["1.3b", "14b", "tiny"] = Field("1.3b", description="Wan2.1 size preset")
        layers: int | None = Field(None, ge=1, le=64, description="fewer layers (random weights only; smoke tests)")
        frames_per_block: int = Field(3, ge=1, le=32, description="latent frames generated per block")
        latent_size: tuple[int, int] = Field((60, 104), description="latent height, width (frame size / 8)")
        steps: int | None = Field(None, ge=1, le=50, description="denoising steps (default: len(timesteps) or 4)")
        timesteps: list[float] | None = Field(None, description="denoising timesteps, e.g. 1000, 750, 500, 250 "
                                                                "(default: evenly spaced from 1000)")
        shift: float = Field(5.0, gt=0, description="flow-matching schedule shift")
        warp: bool = Field(True, description="Self-Forcing's warp_denoising_step mapping of timesteps")
        max_frames: int = Field(21, ge=1, description="KV cache capacity in latent frames (Self-Forcing: 21)")
        sink_frames: int = Field(0, ge=0, description="frames kept at the front when the cache rolls (LongLive)")
        rolling: bool = Field(True, description="roll the cache when full (endless video); else the sequence "
                                                "restarts after max_frames")
        context_noise: float = Field(0.0, ge=0, le=1000, description="timestep of the cache-writing pass")
        strength: float = Field(1.0, gt=0, le=1, description="with `input` bound (SDEdit, StreamDiffusionV2): "
                                                             "the timesteps are scaled by it and the input is "
                                                             "noised to the first one; 1 = pure noise")
        recache: bool = Field(False, description="on a new prompt, re-encode the cached frames under it before "
                                                 "the next block (LongLive's KV re-cache)")
        noise: Literal["per_step", "once"] = Field("per_step", description="per_step: noise of shape (C, steps*T, "
                                                   "h, w), fresh per step; once: (C, T, h, w), reused")
        weights: str = Field(RANDOM, description="'random', or a local Wan/Self-Forcing/CausVid/LongLive "
                                                 "checkpoint (safetensors or torch file)")
        seed: int = Field(0, description="seed of random weights (added to the graph's seed)")
        prefer_ema: bool = Field(True, description="take generator_ema from training checkpoints when present "
                                                   "(Self-Forcing's choice); LongLive's configs use the non-EMA "
                                                   "`generator`: false")
        lora: str | None = Field(None, description="a local LoRA file merged into the weights at load (peft-style "
                                                  "keys as LongLive's lora.pt, or Wan/kohya-style)")
        lora_scale: float = Field(1.0, description="multiplier of the LoRA's update")
        lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha when the file has none (scale = "
                                                                 "alpha / rank); default: the rank (LongLive: "
                                                                 "rank 256, alpha 256)")
        lora_swap: Literal["off", "device", "host"] = Field(
            "off", description="keep the unmerged weights (on the device or in host memory) so LoRA alternatives "
                               "can be swapped in place")
        swap_into: str | None = Field(None, description="as an alternative: the wan_causal_dit node whose weights "
                                                        "this one's LoRA rewrites in place (only the LoRA is loaded)")
        attention: Literal["auto", "sdpa", "cudnn", "flash", "efficient", "math", "fa3", "fa3_fp8"] = Field(
            "auto", description="self-attention kernel: sdpa (PyTorch's choice of backend), cudnn / flash / "
                                "efficient / math (that SDPA backend), fa3 (FlashAttention-3, bf16: the optional "
                                "fa3_fwd wheel, Hopper only), fa3_fp8 (FA3 on e4m3 q/k/v, per-head scales "
                                "computed on the device); auto: fa3 where it can run, else sdpa. The choice made "
                                "is `attention_path` (logged at load)")
        fp8_scale: Literal["head", "tensor"] = Field(
            "head", description="with attention: fa3_fp8, one scale per (batch, head) or per tensor")
        linears: Literal["bf16", "fp8"] = Field(
            "bf16", description="the blocks' linear layers (self-attention q/k/v/o, cross-attention q/o, FFN): bf16, "
                                "or fp8 (e4m3 weights with per-channel scales, quantised once at load; activations "
                                "quantised per token inside the norm/modulation and GELU kernels that make them; "
                                "torch._scaled_mm, sm89 or newer). The choice made is `linears_path`")
        compile: Literal["regional", "whole"] = Field(
            "regional", description="how compiled engine modes compile this node (see the module docstring)")
        compile_backend: str | None = Field(None, description="backend of regional compiles outside an engine, "
                                            "which uses its own (default: inductor on CUDA, aot_eager elsewhere)")

        @model_validator(mode="after")
        def _steps(self):
            if self.timesteps is not None:
                if not self.timesteps:
                    raise ValueError("timesteps must not be empty")
                if self.steps is not None and self.steps != len(self.timesteps):
                    raise ValueError(f"steps is {self.steps} but timesteps has {len(self.timesteps)} entries")
            return self

    def __init__(self, name, params, graph):
        super().__init__(name, params, graph)
        p = params
        if p.layers is not None and p.weights != RANDOM:
            raise ValueError("layers can only be changed with `weights: random` (a checkpoint fixes the depth)")
        if p.linears == "fp8" and p.lora_swap != "off":
            raise ValueError("linears: fp8 quantises the merged weights once at load; an in-place LoRA swap "
                             "(lora_swap) rewrites bf16 weights: use linears: bf16 with lora_swap")
        self.cfg = wan_config(p.config, p.layers)
        _, ph, pw = self.cfg.patch_size
        if p.latent_size[0] % ph or p.latent_size[1] % pw:
            raise ValueError(f"latent_size {list(p.latent_size)} must be a multiple of the patch ({ph}, {pw})")
        if p.max_frames % p.frames_per_block:
            raise ValueError(f"max_frames ({p.max_frames}) must be a multiple of frames_per_block "
                             f"({p.frames_per_block})")
        if p.rolling and p.sink_frames > p.max_frames - p.frames_per_block:
            raise ValueError(f"sink_frames ({p.sink_frames}) must leave room for a block: at most "
                             f"{p.max_frames - p.frames_per_block}")
        self.timesteps = tuple(p.timesteps) if p.timesteps else tuple(
            1000.0 * (1 - i / (p.steps or 4)) for i in range(p.steps or 4))
        self.num_steps = len(self.timesteps)
        self.cache_blocks = p.max_frames // p.frames_per_block
        self.region_compiles = 0
        self._regional = False  # True while the regional (compiled-pieces) path runs
        self._regions_ready = False

    # -- declaration --------------------------------------------------------------------------------
    def ports(self):
        p, c = self.params, self.cfg
        t = p.frames_per_block
        nt = t * self.num_steps if p.noise == "per_step" else t
        desc = (f"noise [C, {self.num_steps}*T, h, w]: chunk i along time re-noises step i"
                if p.noise == "per_step" else "noise [C, T, h, w]")
        return (
            {"cond": Port("tensor", "float", ("L", c.text_dim), f"T5 features [L <= {c.text_len}, {c.text_dim}]"),
             "noise": Port("tensor", "float", (c.in_dim, nt, *p.latent_size), desc),
             "input": Port("tensor", "float", (c.in_dim, t, *p.latent_size),
                           "optional latents [C, T, h, w] to start from (SDEdit, `strength`)", optional=True),
             "strength": Port("float", description="optional live SDEdit strength in (0, 1] (default: the param); "
                                                   "a new value applies from the next block", optional=True)},
            {"latents": Port("tensor", "float", (c.out_dim, t, *p.latent_size), "clean latent block [C, T, h, w]")},
        )

    def num_base_phases(self) -> int:
        return self.cache_blocks + (1 if self.params.rolling else 0)

    def num_phases(self) -> int:
        base = self.num_base_phases()
        return base + (base - 1 if self.params.recache else 0)

    def phase_for_block(self, block: int) -> int:
        return min(block, self.cache_blocks if self.params.rolling else self.cache_blocks - 1)

    def phase_on_change(self, phase: int, changed: frozenset[str]) -> int:
        if self.params.recache and "cond" in changed and 0 < phase < self.num_base_phases():
            return phase + self.num_base_phases() - 1  # the twin that re-encodes the cache first
        return phase

    def _base_phase(self, phase: int) -> tuple[int, bool]:
        base = self.num_base_phases()
        return (phase, False) if phase < base else (phase - base + 1, True)

    def max_blocks(self) -> int | None:
        return None if self.params.rolling else self.cache_blocks

    # -- life cycle -----------------------------------------------------------------------------------
    def load(self, device, dtype):
        super().load(device, dtype)
        from reactor_graph.models.wan_dit import (BlockCausalWan, FlowMatchSchedule, KVCache, WanDiT,
                                                   init_random_, load_wan_state_dict)

        p, cfg = self.params, self.cfg
        self.lora_delta = self._read_lora()
        if p.swap_into is not None:
            return  # an in-place alternative: its LoRA is all it needs (`swap_in_place` of the target)
        with torch.device("meta"):
            model = WanDiT(cfg).to(dtype)
        if p.weights == RANDOM:
            model.to_empty(device=device)
            init_random_(model, seed=self.graph.seed + p.seed)
        else:
            path = resolve_weights(p.weights, self.graph.root, "Wan DiT", "diffusion_pytorch_model.safetensors")
            load_wan_state_dict(model, path, strict=True, prefer_ema=p.prefer_ema)
            model.to(device)
        self.model = model.eval().requires_grad_(False)
        self.set_attention(p.attention)
        self._base = self._keep_base() if p.lora_swap != "off" else None
        self.lora_now = None
        if self.lora_delta is not None:
            self._merge(self.lora_delta, p.lora_scale, p.lora_alpha)
            self.lora_now = self.name
        self.linears_path, self._bf16_linears = "bf16", {}
        if p.linears != "bf16":  # after the merge: the merged weights are what is quantised
            self.set_linears(p.linears, keep=False)
        self.cache = KVCache(cfg, batch_size=1, latent_hw=tuple(p.latent_size), max_frames=p.max_frames,
                             frames_per_block=p.frames_per_block, sink_frames=p.sink_frames, rolling=p.rolling,
                             dtype=dtype, device=device)
        self._fp8_cache()
        schedule = FlowMatchSchedule(denoising_steps=self.timesteps, shift=p.shift, warp=p.warp)
        self.gen = BlockCausalWan(self.model, self.cache, schedule, context_noise=p.context_noise)
        # video-to-video (input bound): the same sampler over timesteps scaled by `strength`, its coefficients on
        # the device (live) so a new strength is a copy into them (prepare), never a recompile or a recapture
        self.strength_now = p.strength
        self.gen_input = BlockCausalWan(self.model, self.cache, self._input_schedule(p.strength),
                                        context_noise=p.context_noise, live=True)
        self.phases = self.cache.phases()
        assert len(self.phases) == self.num_base_phases(), (len(self.phases), self.num_base_phases())
        self.out = torch.zeros(1, cfg.out_dim, p.frames_per_block, *p.latent_size, device=device, dtype=dtype)

    def reset(self):
        if self.params.swap_into is None:
            self.cache.reset_()

    # -- strength (a live slot) ---------------------------------------------------------------------------
    def _input_schedule(self, strength: float):
        from reactor_graph.models.wan_dit import FlowMatchSchedule

        p = self.params
        return FlowMatchSchedule(denoising_steps=tuple(strength * t for t in self.timesteps), shift=p.shift,
                                 warp=p.warp)

    def check_input(self, port, value):
        if port == "strength":
            check_strength(value)
        return None

    def prepare(self, strength: float | None = None):
        """Host half, before every block: a new `strength` (the port, else the param) rewrites the SDEdit schedule
        in place on the device; the next block samples with it."""
        if self.params.swap_into is not None:
            return  # an in-place alternative never runs itself
        s = self.params.strength if strength is None else check_strength(strength)
        if s != self.strength_now:
            self.gen_input.use_schedule(self._input_schedule(s))
            self.strength_now = s

    # -- LoRA -------------------------------------------------------------------------------------------
    def _read_lora(self):
        from reactor_graph.weights import parse_lora, read_state_dict, resolve_weights

        if self.params.lora is None:
            if self.params.swap_into is not None:
                raise ValueError(f"node '{self.name}': swap_into needs a `lora` to swap in")
            return None
        path = resolve_weights(self.params.lora, self.graph.root, "LoRA")
        # on the device: a swap then costs the merge's GPU work, not a host copy of the factors
        return {k: d.to(self.device) for k, d in parse_lora(read_state_dict(path), f"LoRA {path}").items()}

    def _merge(self, lora, scale: float, alpha: float | None, base=None) -> list[str]:
        from reactor_graph.weights import merge_lora_

        what = f"LoRA of node '{self.name}'"
        return merge_lora_(self.model, lora, scale=scale, alpha=alpha, what=what, base=base)

    def _keep_base(self) -> dict[str, torch.Tensor]:
        """Copies of every weight a LoRA can target (the blocks' linear layers), before any merge."""
        host = self.params.lora_swap == "host"
        out = {}
        for name, m in self.model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.startswith("blocks."):
                for attr in ("weight", "bias"):
                    t = getattr(m, attr)
                    if t is None:
                        continue
                    c = t.detach().to("cpu", copy=True) if host else t.detach().clone()
                    out[f"{name}.{attr}"] = c.pin_memory() if host and torch.cuda.is_available() else c
        return out

    def swap_in_place(self, new) -> bool:
        """Engine hook (swap.apply): if `new` is a LoRA alternative of this node (`swap_into` names it) or this
        node itself (swap back), rewrite the merged weights in place -- base + the new LoRA, from the kept base
        copy, so nothing accumulates over swaps -- and return True: the parameters keep their storage, so the
        compiled code and the captured graphs stay valid (no recompile, no recapture). The stall is the merge.
        False for any other replacement (the engine then swaps the node as usual)."""
        if new is not self and (not isinstance(new, WanCausalDiT) or new.params.swap_into != self.name):
            return False
        from reactor_graph.errors import SessionError
        from reactor_graph.weights import lora_targets

        if self._base is None:
            raise SessionError(f"node '{self.name}' was loaded without `lora_swap`: set lora_swap: device (or host) "
                               f"to swap LoRA alternatives into it in place")
        lora = new.lora_delta
        if lora is not None:
            try:  # checked before anything is written
                lora_targets(self.model, lora, f"LoRA of '{new.name}'")
            except ValueError as exc:
                raise SessionError(str(exc)) from None
        if lora is None:  # back to the plain base
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    if name in self._base:
                        p.copy_(self._base[name])
        else:
            params = dict(self.model.named_parameters())
            touched = set(self._merge(lora, new.params.lora_scale, new.params.lora_alpha, base=self._base))
            with torch.no_grad():  # what the new LoRA does not touch goes back to the base
                for name in self._base.keys() - touched:
                    params[name].copy_(self._base[name])
        self.lora_now = new.name if lora is not None else None
        self._in_place = None if new is self else new.name
        return True

    @property
    def swapped_in_place(self) -> bool:
        """True while a LoRA alternative's weights are in place of this node's own (the engine swaps back when
        the session ends: a session's swaps end with it)."""
        return getattr(self, "_in_place", None) is not None

    # -- per block --------------------------------------------------------------------------------------
    def forward(self, cond, noise, input=None):
        if self.params.compile == "regional" and torch.compiler.is_compiling():
            return {"latents": self._generate_regional(cond, noise, self.phase, input)}
        return {"latents": self._generate(cond, noise, self.phase, input)}

    def _step_noise(self, noise: torch.Tensor) -> torch.Tensor:
        if self.params.noise == "once":
            return noise[None]  # [1, C, T, h, w]: reused for every step
        c, _, h, w = noise.shape
        # [C, S*T, h, w] -> [S, 1, C, T, h, w] (a view)
        return noise.view(c, self.num_steps, self.params.frames_per_block, h, w).permute(1, 0, 2, 3, 4)[:, None]

    def set_attention(self, choice: str) -> str:
        """Use the self-attention kernel `choice` (see the `attention` param) from the next trace or run on;
        returns the resolved one (auto -> fa3 or sdpa), also kept as `attention_path`. A compiled or captured
        executor keeps the kernel it was built with: build a new one after this (benches compare kernels so)."""
        from reactor_graph.models.attention import make_attention, resolve_attention

        path = resolve_attention(choice, self.device)
        self.model.attn = make_attention(path, self.params.fp8_scale)
        self.attention_path = path
        if getattr(self, "cache", None) is not None:
            self._fp8_cache()
        log.info("node %s: self-attention %s (asked: %s)", self.name, path, choice)
        return path

    def set_linears(self, choice: str, keep: bool = True) -> str:
        """Run the blocks' linear layers in `choice` (bf16 | fp8, see the `linears` param) from the next trace or
        run on; kept as `linears_path`. To fp8 the layers are replaced by `Fp8Linear`s (weights quantised now); with
        `keep` the bf16 layers are kept aside so `set_linears('bf16')` can put them back (benches compare both in
        one process), else they are freed. As with `set_attention`, build a new executor after this."""
        from reactor_graph.models.fp8_linear import convert_linears_, fp8_matmul_unavailable, restore_linears_

        if choice not in LINEARS:
            raise ValueError(f"linears {choice!r} is not one of {', '.join(LINEARS)}")
        if choice == self.linears_path:
            return choice
        if choice == "fp8":
            if self._base is not None:
                raise ValueError("linears: fp8 does not go with lora_swap (the swap rewrites bf16 weights)")
            why = fp8_matmul_unavailable(self.device)
            if why is not None:
                raise ValueError(f"linears: fp8: {why}")
            self._bf16_linears = convert_linears_(self.model, keep=keep)
        else:
            if not self._bf16_linears:
                raise ValueError("linears: bf16: this node's linears were converted to fp8 without keeping the bf16 "
                                 "layers (set_linears('fp8', keep=True) keeps them)")
            restore_linears_(self.model, self._bf16_linears)
            self._bf16_linears = {}
        self.linears_path = choice
        log.info("node %s: block linears %s", self.name, choice)
        return choice

    def _fp8_cache(self) -> None:
        """fa3_fp8 reads an e4m3 copy of the KV cache (models/fp8_kv_cache.py): made here, before anything is
        compiled or captured; another kernel drops it (the roll would go on moving it)."""
        if getattr(self.model.attn, "reads_fp8_cache", False):
            self.cache.fp8_for(self.model.attn)
        else:
            self.cache.fp8 = None

    def _attention(self):
        from reactor_graph.models.attention import SDPA_BACKENDS

        backend = SDPA_BACKENDS.get(getattr(self, "attention_path", self.params.attention))
        if backend is None:  # sdpa, fa3, fa3_fp8: SDPA (cross-attention at least) picks its own backend
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, backend)])

    def _generate(self, cond: torch.Tensor, noise: torch.Tensor, phase: int,
                  input: torch.Tensor | None = None) -> torch.Tensor:
        if cond.shape[0] > self.cfg.text_len:
            raise ValueError(f"cond has {cond.shape[0]} tokens; this model takes at most {self.cfg.text_len}")
        base, recache = self._base_phase(phase)
        with self._attention():
            if input is None:
                self.gen.generate_block(self._step_noise(noise), cond[None], self.phases[base], out=self.out,
                                        recache=recache)
            else:
                self.gen_input.generate_block(self._step_noise(noise), cond[None], self.phases[base], out=self.out,
                                              recache=recache, start=input[None])
        return self.out[0]

    @not_traced
    def _generate_regional(self, cond, noise, phase: int, input=None) -> torch.Tensor:
        """The block with the layers' repeated pieces compiled (see the module docstring)."""
        if not self._regions_ready:  # traced outside an engine executor (a profile script)
            from reactor_graph.compile import compile_function

            self.compile_regions(lambda fn: compile_function(fn, self._plain_backend(), self._count_region))
        self._regional = True
        try:
            return self._generate(cond, noise, phase, input)
        finally:
            self._regional = False

    # -- regional compilation -----------------------------------------------------------------------------
    def _count_region(self) -> None:
        self.region_compiles += 1

    def _plain_backend(self) -> str:
        return self.params.compile_backend or ("inductor" if self.device.type == "cuda" else "aot_eager")

    def compile_regions(self, compile) -> None:
        """Route each layer's qkv/finish through compiled functions while `_regional`.

        The compiled functions are shared by all layers (the layer is an argument; its parameters are graph
        inputs), so each compiles once. Outside the regional path the plain methods run."""
        from reactor_graph.models.wan_dit import WanBlock

        if self.params.compile != "regional" or self._regions_ready:
            return
        qkv = compile(WanBlock.qkv)
        finish = compile(WanBlock.finish)

        for blk in self.model.blocks:
            blk.qkv = _Routed(self, blk, qkv, WanBlock.qkv)
            blk.finish = _Routed(self, blk, finish, WanBlock.finish)
        self.gen.recache_scope = self._plain
        self.gen_input.recache_scope = self._plain
        self._regions_ready = True

    @contextlib.contextmanager
    def _plain(self):
        """The re-cache pass (max_frames tokens, once per prompt switch) runs the plain pieces: compiling them
        for its token counts would add compilations at start-up for a pass that is not the per-block cost."""
        regional, self._regional = self._regional, False
        try:
            yield
        finally:
            self._regional = regional


class _Routed:
    """A layer's piece: the compiled function while the node runs its regional path, else the plain method. An
    object rather than a closure, so a copy of the node (a warm-up copy: reactor_graph/tiers.py) routes through
    its own flag and layers while sharing the compiled function."""

    def __init__(self, owner, blk, compiled, plain):
        self.owner, self.blk, self.compiled, self.plain = owner, blk, compiled, plain

    def __call__(self, *args, **kw):
        return (self.compiled if self.owner._regional else self.plain)(self.blk, *args, **kw)


@functools.lru_cache(maxsize=8)
def block_flops(config: str = "1.3b", latent_size: tuple[int, int] = (60, 104), frames_per_block: int = 3,
                max_frames: int = 21, steps: int = 4, text_len: int | None = None,
                layers: int | None = None) -> dict[str, float]:
    """FLOPs (FlopCounterMode, on the meta device: nothing is allocated) of one block in the first and in the
    last (fullest) phase, and of the per-block text cross-attention K/V. For benches and the design notes."""
    from torch.utils.flop_counter import FlopCounterMode

    from reactor_graph.models.wan_dit import BlockCausalWan, FlowMatchSchedule, KVCache, WanDiT

    cfg = wan_config(config, layers)
    dev = torch.device("meta")
    with dev:
        model = WanDiT(cfg).to(torch.bfloat16)
    cache = KVCache(cfg, batch_size=1, latent_hw=latent_size, max_frames=max_frames,
                    frames_per_block=frames_per_block, rolling=True, dtype=torch.bfloat16, device=dev)
    sched = FlowMatchSchedule(tuple(1000.0 * (1 - i / steps) for i in range(steps)))
    gen = BlockCausalWan(model, cache, sched)
    ctx = torch.empty(1, text_len or cfg.text_len, cfg.text_dim, device=dev, dtype=torch.bfloat16)
    noise = torch.empty(steps, 1, cfg.in_dim, frames_per_block, *latent_size, device=dev, dtype=torch.bfloat16)
    out = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            gen.set_context(ctx)
        out["cross_kv"] = float(fc.get_total_flops())
        for ph in (gen.phases()[0], gen.phases()[-1]):
            with FlopCounterMode(display=False) as fc:
                gen.generate_block(noise, None, ph)
            out[f"block_{ph.name}"] = float(fc.get_total_flops())
    return out
