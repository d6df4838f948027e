"""The official Self-Forcing `CausalWanModel` (github guandeh17/Self-Forcing), driven next to our WanDiT.

Nothing of it is in this repository: `load_official(src)` imports it from a local checkout `src` that the user
provides (the GPU runs carry one at .official/Self-Forcing, git-ignored). Nothing is downloaded.

What is imported, and what is stubbed (only what the timed path does not use)
    wan/modules/attention.py, model.py, causal_model.py are loaded as `wan.modules.*` WITHOUT running the
    packages' __init__ files (wan/__init__.py imports the T2V/I2V pipelines, T5, CLIP, the VAE and the
    distributed helpers: tqdm, diffusers' schedulers, ftfy + transformers for the tokenizer, torchvision; none of
    them is on the DiT's path). Their pipeline/causal_inference.py and utils/wan_wrapper.py are not used either:
    the wrapper builds the model by `from_pretrained` of a wan_models/ folder and loads the T5 and VAE checkpoints;
    `official_block` makes the calls their pipeline makes. The DiT path needs torch only, plus:
      * diffusers (`ModelMixin`, `ConfigMixin`, `register_to_config`): base classes and a config-recording
        decorator of CausalWanModel, no part of its forward. Used when importable, else stubbed
        (nn.Module / object / identity).
      * einops (`repeat`, imported by model.py at module level): used only by the GAN classifier branch of
        WanModel. Used when importable, else a stub that raises if called.
      * flash_attn / flash_attn_interface: absent on our GPU machine. Their self-attention calls
        `attention()`, which falls back to SDPA when neither is installed; their cross-attention calls
        `flash_attention()` directly, which asserts flash-attn is installed. `attention` picks how that is met:
          sdpa  the cross-attention's `flash_attention` is pointed at their own `attention()` (the same SDPA
                fallback their self-attention takes; their inference passes no k_lens, so no padding mask is lost)
          fa3   a `flash_attn_interface` module backed by the fa3_fwd wheel (FlashAttention-3 forward, the
                kernel their code prefers on Hopper), and FLASH_ATTN_3_AVAILABLE forced on: their check accepts
                only device names containing "h100"/"hopper", so on an H200 it would ask for FA2.
    `Official.stubs` lists what was stubbed, for the report.

Weights
    Parameter names are those of the public Wan checkpoints on both sides; `official_state_dict` maps ours to
    theirs explicitly (it is the identity for every key today) and raises on any missing, unexpected or
    mis-shaped key.

The cache layouts (their CausalInferencePipeline._initialize_kv_cache / _initialize_crossattn_cache)
    self-attention: per layer {"k", "v": [B, cache_tokens, H, D], "global_end_index", "local_end_index": long
    [1]}; cross-attention: per layer {"k", "v": [B, text_len, H, D], "is_init": bool}, filled on the first call.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

MODULES = ("attention", "model", "causal_model")  # wan/modules/*.py, in import order


@dataclass
class Official:
    """The loaded official modules: `attention`, `model`, `causal_model` (module objects) and what was stubbed."""

    src: Path
    attention_mode: str
    attention: types.ModuleType
    model: types.ModuleType
    causal_model: types.ModuleType
    stubs: list[str] = field(default_factory=list)

    @property
    def CausalWanModel(self):
        return self.causal_model.CausalWanModel


def _stub_module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def _has(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _stub_diffusers() -> None:
    class ConfigMixin:  # a base class only: records the constructor's arguments in diffusers
        pass

    def register_to_config(init):
        return init

    sys.modules["diffusers"] = _stub_module("diffusers")
    sys.modules["diffusers.configuration_utils"] = _stub_module(
        "diffusers.configuration_utils", ConfigMixin=ConfigMixin, register_to_config=register_to_config)
    sys.modules["diffusers.models"] = _stub_module("diffusers.models")
    sys.modules["diffusers.models.modeling_utils"] = _stub_module("diffusers.models.modeling_utils",
                                                                  ModelMixin=nn.Module)


def _stub_einops() -> None:
    def repeat(*_a, **_k):
        raise RuntimeError("einops is stubbed (not installed): only the official GAN classifier branch uses it")

    sys.modules["einops"] = _stub_module("einops", repeat=repeat)


def _fa3_interface() -> types.ModuleType:
    """flash_attn_interface as their attention.py calls it (`flash_attn_varlen_func(...)[0]`: the FA3 releases
    it was written against returned (out, lse)); fa3_fwd returns `out` alone, so the shim returns (out,)."""
    import fa3_fwd_interface

    def flash_attn_varlen_func(*args, **kwargs):
        return (fa3_fwd_interface.flash_attn_varlen_func(*args, **kwargs),)

    return _stub_module("flash_attn_interface", flash_attn_varlen_func=flash_attn_varlen_func)


def _load_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@functools.lru_cache(maxsize=4)
def load_official(src: str | Path, attention: str = "sdpa") -> Official:
    """Import the official DiT modules from checkout `src` (see the module docstring). attention: sdpa | fa3."""
    src = Path(src).resolve()
    mdir = src / "wan" / "modules"
    missing = [m for m in MODULES if not (mdir / f"{m}.py").is_file()]
    if missing:
        raise FileNotFoundError(f"{src} is not a Self-Forcing checkout: wan/modules/{{{','.join(missing)}}}.py "
                                "missing (give the folder of a local clone of guandeh17/Self-Forcing)")
    if attention not in ("sdpa", "fa3"):
        raise ValueError(f"official attention {attention!r}: sdpa or fa3")
    loaded = sys.modules.get("wan.modules.causal_model")
    if loaded is not None:
        prev = getattr(loaded, "_reactor_official", None)  # loaded by another copy of this module
        if prev is not None and prev.src == src and prev.attention_mode == attention:
            return prev
        raise RuntimeError(f"the official modules are already loaded from {Path(loaded.__file__).parents[2]} "
                           "(one checkout and one attention mode per process)")
    for name in ("flash_attn", "flash_attn_interface"):
        if _has(name):
            raise RuntimeError(f"{name} is installed: their attention.py would use it instead of the kernel asked "
                               "for; run where it is absent")
    stubs = []
    if not _has("diffusers"):
        _stub_diffusers()
        stubs.append("diffusers (ModelMixin -> nn.Module, ConfigMixin, register_to_config: no-ops)")
    if not _has("einops"):
        _stub_einops()
        stubs.append("einops.repeat (GAN branch only)")
    if attention == "fa3":
        sys.modules["flash_attn_interface"] = _fa3_interface()
        stubs.append("flash_attn_interface -> fa3_fwd_interface (FA3 forward)")
    # the packages without their __init__: the relative imports of model.py resolve against these
    for pkg, path in (("wan", src / "wan"), ("wan.modules", mdir)):
        p = types.ModuleType(pkg)
        p.__path__ = [str(path)]
        sys.modules[pkg] = p
    mods = {m: _load_file(f"wan.modules.{m}", mdir / f"{m}.py") for m in MODULES}
    att, mdl = mods["attention"], mods["model"]
    if attention == "fa3":
        att.FLASH_ATTN_3_AVAILABLE = True
    else:
        fallback = att.attention

        @functools.wraps(fallback)
        def sdpa(q, k, v, **kw):
            # their fallback casts q/k/v to its `dtype` argument, bf16 by default: a no-op in their bf16 runs; in
            # the input's dtype, the float32 check can run it too
            kw.setdefault("dtype", q.dtype)
            return fallback(q, k, v, **kw)

        # cross-attention: their own SDPA fallback in place of the flash-attn-only entry point
        mdl.flash_attention = sdpa
        mods["causal_model"].attention = sdpa
        stubs.append("model.flash_attention -> their attention() (SDPA fallback) for the cross-attention; "
                     "attention() called with dtype=q.dtype (a no-op in bf16)")
    off = Official(src, attention, att, mdl, mods["causal_model"], stubs)
    mods["causal_model"]._reactor_official = off
    return off


# ------------------------------------------------------------------------------------------------ model


def official_kwargs(cfg) -> dict:
    """CausalWanModel's constructor arguments for our WanConfig (Self-Forcing's default: global attention, no
    sink, i.e. a KV cache of the whole 21-frame clip)."""
    return dict(model_type="t2v", patch_size=tuple(cfg.patch_size), text_len=cfg.text_len, in_dim=cfg.in_dim,
                dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim,
                out_dim=cfg.out_dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers, local_attn_size=-1,
                sink_size=0, qk_norm=cfg.qk_norm, cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps)


# our key -> theirs. Both follow the public Wan2.1 checkpoints, so this is the identity today; a rename on either
# side goes here, and anything it does not account for fails `official_state_dict`.
KEY_MAP: dict[str, str] = {}


def official_state_dict(ours: dict[str, torch.Tensor], theirs: nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict renamed for `theirs`; raises ValueError on any key or shape that does not match."""
    want = theirs.state_dict()
    mapped = {KEY_MAP.get(k, k): v for k, v in ours.items()}
    missing = sorted(set(want) - set(mapped))
    unexpected = sorted(set(mapped) - set(want))
    bad = [f"{k} {list(mapped[k].shape)} vs {list(want[k].shape)}" for k in want
           if k in mapped and tuple(mapped[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or bad:
        raise ValueError(f"our WanDiT weights do not fit the official CausalWanModel: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}, shape mismatches {bad[:8]}")
    return mapped


def build_official(off: Official, cfg, ours: nn.Module, device, dtype) -> nn.Module:
    """CausalWanModel with `ours`'s weights, on `device` in `dtype`, eval, no grad. Built on the meta device (no
    init pass over 1.3B parameters); its RoPE table (`freqs`, a plain attribute their forward moves to the device)
    is taken from a CausalWanModel of the same head_dim built on the CPU, as their constructor makes it."""
    with torch.device("meta"):
        m = off.CausalWanModel(**official_kwargs(cfg)).to(dtype)
    m.to_empty(device=device)
    sd = official_state_dict({k: v.detach() for k, v in ours.state_dict().items()}, m)
    m.load_state_dict({k: v.to(device) for k, v in sd.items()}, strict=True)
    probe = off.CausalWanModel(**{**official_kwargs(cfg), "dim": cfg.head_dim, "num_heads": 1, "ffn_dim": 2,
                                  "num_layers": 1, "text_dim": 2, "freq_dim": 2})
    m.freqs = probe.freqs
    return m.eval().requires_grad_(False)


class OfficialCache:
    """Their per-layer cache dicts for one sequence of `max_frames` frames (global attention: the cache holds
    the whole clip) and the block-position bookkeeping their forward reads and advances."""

    def __init__(self, cfg, *, batch_size: int, tokens_per_frame: int, max_frames: int, dtype, device):
        self.tokens_per_frame = tokens_per_frame
        n, H, D = max_frames * tokens_per_frame, cfg.num_heads, cfg.head_dim
        self.kv = [{"k": torch.zeros(batch_size, n, H, D, dtype=dtype, device=device),
                    "v": torch.zeros(batch_size, n, H, D, dtype=dtype, device=device),
                    "global_end_index": torch.zeros(1, dtype=torch.long, device=device),
                    "local_end_index": torch.zeros(1, dtype=torch.long, device=device)}
                   for _ in range(cfg.num_layers)]
        self.cross = [{"k": torch.zeros(batch_size, cfg.text_len, H, D, dtype=dtype, device=device),
                       "v": torch.zeros(batch_size, cfg.text_len, H, D, dtype=dtype, device=device),
                       "is_init": False} for _ in range(cfg.num_layers)]

    def set_end(self, frames: int) -> None:
        """As after a block that ended at frame `frames` (the state their loop is in before the next block)."""
        for c in self.kv:
            c["global_end_index"].fill_(frames * self.tokens_per_frame)
            c["local_end_index"].fill_(frames * self.tokens_per_frame)


def official_forward(model: nn.Module, cache: OfficialCache, x: torch.Tensor, t: torch.Tensor,
                     context: torch.Tensor, start_frame: int) -> torch.Tensor:
    """One call as their pipeline makes it (through WanDiffusionWrapper, minus its [B, F, C, H, W] permutes):
    x [B, C, F, H, W] in the model dtype, t [B, F], context T5 features [B, L, text_dim] -> flow [B, C, F, H, W]."""
    return model(x, t=t, context=context, seq_len=cache.kv[0]["k"].shape[1], kv_cache=cache.kv,
                 crossattn_cache=cache.cross, current_start=start_frame * cache.tokens_per_frame)


def official_block(model: nn.Module, cache: OfficialCache, noise: torch.Tensor, context: torch.Tensor,
                   start_frame: int, schedule, context_noise: float = 0.0) -> torch.Tensor:
    """One block as their CausalInferencePipeline.inference makes it: `schedule.num_steps` calls at the warped
    timesteps, each x0 re-noised with the next step's noise, then the cache pass on the clean x0 at
    `context_noise`. noise [steps, B, C, F, H, W] (noise[0] is x_T) -> x0 [B, C, F, H, W] float32.

    The sampler arithmetic is ours (BlockCausalWan's, in float32) on both sides, so the comparison is of the
    DiTs: their wrapper converts flow -> x0 in float64 and rounds x0 to bf16 before re-noising it."""
    b, f = noise.shape[1], noise.shape[3]
    dtype = next(model.parameters()).dtype
    x = noise[0].float()
    x0 = x
    for i, (t, s) in enumerate(zip(schedule.timesteps, schedule.sigmas)):
        tt = torch.full((b, f), float(t), dtype=torch.float32, device=noise.device)
        flow = official_forward(model, cache, x.to(dtype), tt, context, start_frame)
        x0 = x - s * flow.float()
        if i + 1 < schedule.num_steps:
            sn = schedule.next_sigmas[i]
            x = (1 - sn) * x0 + sn * noise[i + 1].float()
    tt = torch.full((b, f), float(context_noise), dtype=torch.float32, device=noise.device)
    official_forward(model, cache, x0.to(dtype), tt, context, start_frame)
    return x0
