"""Weights from local files only (safetensors or a torch checkpoint); never a download."""
from __future__ import annotations

import json
from pathlib import Path

import torch


RANDOM = "random"  # a `weights:` value: the real architecture with random weights (for benches)


def resolve(path: str | Path, root: Path | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and root is not None:
        p = Path(root) / p
    return p


def read_state_dict(path: str | Path, root: Path | None = None) -> dict[str, torch.Tensor]:
    """A `.safetensors` or torch (`.pth`/`.pt`, tensors only) state dict on the CPU, unwrapped from the usual
    training wrappers; `path` relative to `root`."""
    p = resolve(path, root)
    if not p.exists():
        raise FileNotFoundError(f"weights file {p} does not exist (weights are read from local files only)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    sd = torch.load(str(p), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "generator_ema", "generator"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{p}: expected a state dict, got {type(sd).__name__}")
    return sd


# what a Hugging Face `save_pretrained` folder holds the weights in, in the order from_pretrained prefers them
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def read_hf_folder(folder: str | Path, root: Path | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a Hugging Face `save_pretrained` folder, on the CPU: one `model.safetensors`, or the
    shards a `model.safetensors.index.json` names (its `weight_map`), or the `pytorch_model.bin` equivalents."""
    p = resolve(folder, root)
    name = next((n for n in HF_WEIGHT_FILES if (p / n).exists()), None)
    if name is None:
        raise FileNotFoundError(f"weights folder {p} holds none of {', '.join(HF_WEIGHT_FILES)} (the files of a "
                                f"Hugging Face from_pretrained folder); point `weights:` at a checkpoint file instead")
    if not name.endswith(".index.json"):
        return read_state_dict(p / name)
    try:
        shards = sorted(set(json.loads((p / name).read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise ValueError(f"{p / name} is not a shard index (JSON with a `weight_map` of key -> file): {exc}") from None
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        sd.update(read_state_dict(p / shard))
    return sd


def load_into(module: torch.nn.Module, path: str | Path, root: Path | None = None, prefix: str = "") -> None:
    """Strict load; a mismatch names the missing and unexpected keys."""
    sd = read_state_dict(path, root)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    want = module.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    if missing or unexpected:
        def few(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

        raise ValueError(f"weights {path} do not fit {type(module).__name__}: "
                         f"missing keys: {few(missing) or 'none'}; unexpected keys: {few(unexpected) or 'none'}")
    bad = [k for k in want if tuple(want[k].shape) != tuple(sd[k].shape)]
    if bad:
        k = bad[0]
        raise ValueError(f"weights {path}: '{k}' has shape {list(sd[k].shape)}, the model wants "
                         f"{list(want[k].shape)} ({len(bad)} tensors differ)")
    module.load_state_dict(sd)


def load_exact(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Strict load of a state dict already read; a mismatch names every missing, unexpected and wrongly
    shaped key (ValueError)."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        raise ValueError(f"{what} state dict mismatch: missing keys {missing}; unexpected keys {unexpected}; "
                         f"shape mismatches {shapes}")
    module.load_state_dict(sd, strict=True)


def save(module: torch.nn.Module, path: str | Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path),
              metadata={k: str(v) for k, v in (metadata or {}).items()})


def resolve_weights(weights: str, root, kind: str, folder_file: str | None = None) -> Path:
    """The local file `weights` names (relative to the graph's folder); a clear error if it is not there."""
    p = resolve(weights, root)
    if p.is_dir() and folder_file:
        if (p / folder_file).exists():
            return p / folder_file
        raise FileNotFoundError(f"{kind} weights folder {p} has no {folder_file}; point `weights:` at the "
                                f"checkpoint file, or use `weights: random`")
    if not p.exists():
        raise FileNotFoundError(f"{kind} weights file {p} does not exist (weights are read from local files only; "
                                f"point `weights:` at your local checkpoint, or use `weights: random`)")
    return p


def use_random_weights(loaded_spec) -> list[str]:
    """`--random-weights`: every node (and alternative) with a `weights` param gets random weights.

    Nodes that declare `accepts_random_weights = True` get `weights: random`; older nodes whose `weights` default
    is None (None means random there) lose the key. Edits the LoadedSpec's node params in place, before the plan
    is built; returns the names of the nodes changed."""
    from reactor_graph.node import resolve_type

    changed = []
    for section in (loaded_spec.spec.nodes, loaded_spec.spec.alternatives):
        for name, ns in section.items():
            try:
                cls = resolve_type(ns.type)
            except (KeyError, ImportError, AttributeError, TypeError):
                continue  # build_plan reports it
            fields = getattr(cls.Params, "model_fields", {})
            if "weights" not in fields:
                continue
            if getattr(cls, "accepts_random_weights", False):
                ns.params["weights"] = RANDOM
            elif fields["weights"].default is None:
                ns.params.pop("weights", None)
            else:
                continue
            changed.append(name)
    return changed


# ------------------------------------------------------------------------------------------------ LoRA

# prefixes that trainers and converters put in front of the model's own module names
_LORA_PREFIXES = ("base_model.model.", "diffusion_model.", "generator.", "model.", "module.", "transformer.",
                  "_orig_mod.")
# (down, up) suffix pairs: peft (`lora_A`/`lora_B`, with or without the adapter name) and kohya/Wan style
_LORA_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"))


class LoraDelta:
    """One target module's update: low-rank (down [r, in], up [out, r], alpha) and/or full diffs (`diff`,
    `diff_b`: added to weight and bias as they are)."""

    def __init__(self):
        self.down: torch.Tensor | None = None
        self.up: torch.Tensor | None = None
        self.alpha: float | None = None
        self.diff: torch.Tensor | None = None
        self.diff_b: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return 0 if self.down is None else self.down.shape[0]

    def to(self, device) -> "LoraDelta":
        for k in ("down", "up", "diff", "diff_b"):
            t = getattr(self, k)
            if t is not None:
                setattr(self, k, t.to(device))
        return self

    def weight_delta(self, alpha: float | None, scale: float, device=None) -> torch.Tensor | None:
        """scale * (alpha / r) * up @ down (+ scale * diff), float32; alpha: the file's, else the given one,
        else r (peft's and LongLive's alpha = rank: a factor of 1)."""
        out = None
        if self.down is not None:
            a = self.alpha if self.alpha is not None else (alpha if alpha is not None else float(self.rank))
            out = (self.up.to(device).float() @ self.down.to(device).float()) * (scale * a / self.rank)
        if self.diff is not None:
            diff = self.diff.to(device).float() * scale
            out = diff if out is None else out + diff
        return out


def _lora_module_name(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _LORA_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def parse_lora(sd: dict[str, torch.Tensor], what: str = "LoRA") -> dict[str, LoraDelta]:
    """Group a LoRA state dict by target module: peft (`base_model.model.<m>.lora_A[.default].weight`, `lora_B`;
    LongLive's `lora.pt`, also under `generator_lora`), Wan/kohya style (`diffusion_model.<m>.lora_down.weight`,
    `lora_up.weight`, `<m>.alpha`), full diffs (`<m>.diff`, `<m>.diff_b`). Module names keep the model's dots
    (kohya's `lora_unet_blocks_0_self_attn_q` underscores are mapped by `merge_lora_`). Any other key, or a
    down without its up, is a ValueError naming it."""
    if "generator_lora" in sd and isinstance(sd["generator_lora"], dict):
        sd = sd["generator_lora"]
    out: dict[str, LoraDelta] = {}
    odd = []
    for key, val in sd.items():
        if not isinstance(val, torch.Tensor):
            continue
        k = key.replace(".default.", ".")  # peft's adapter name in a full (not get_peft_model_state_dict) dump
        for down, up in _LORA_PAIRS:
            if k.endswith(down) or k.endswith(up):
                part = "down" if k.endswith(down) else "up"
                name = _lora_module_name(k[:-len(down if part == "down" else up)])
                setattr(out.setdefault(name, LoraDelta()), part, val)
                break
        else:
            if k.endswith(".alpha"):
                out.setdefault(_lora_module_name(k[:-6]), LoraDelta()).alpha = float(val.float().item())
            elif k.endswith(".diff_b"):
                out.setdefault(_lora_module_name(k[:-7]), LoraDelta()).diff_b = val
            elif k.endswith(".diff"):
                out.setdefault(_lora_module_name(k[:-5]), LoraDelta()).diff = val
            else:
                odd.append(key)
    half = sorted(n for n, d in out.items() if (d.down is None) != (d.up is None))
    if odd or half:
        raise ValueError(f"{what}: {len(odd)} keys are not LoRA keys (lora_A/lora_B, lora_down/lora_up, alpha, diff, "
                         f"diff_b): {_few(odd)}; {len(half)} modules have only one of the two factors: {_few(half)}")
    if not out:
        raise ValueError(f"{what}: no LoRA keys found")
    return out


def _few(keys, n: int = 8) -> str:
    keys = list(keys)
    return (", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")) or "none"


def lora_targets(model: torch.nn.Module, lora: dict[str, LoraDelta],
                 what: str = "LoRA") -> dict[str, tuple[str, torch.nn.Module]]:
    """The model's (module name, module) for each LoRA entry (dotted names, or kohya's `lora_unet_` underscored ones), with the
    shapes checked: a name the model lacks or a factor of the wrong shape is a ValueError naming them all."""
    mods = dict(model.named_modules())
    by_underscore = {n.replace(".", "_"): n for n in mods}
    found, missing, bad = {}, [], []
    for name, d in lora.items():
        real = name if name in mods else by_underscore.get(name.removeprefix("lora_unet_"))
        m = mods.get(real) if real else None
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            missing.append(name)
            continue
        out_f, in_f = w.shape
        if d.down is not None and (d.down.dim() != 2 or d.up.dim() != 2 or d.down.shape[1] != in_f
                                   or d.up.shape[0] != out_f or d.up.shape[1] != d.down.shape[0]):
            bad.append(f"{name}: down {list(d.down.shape)}, up {list(d.up.shape)} vs weight {list(w.shape)}")
        elif d.diff is not None and tuple(d.diff.shape) != tuple(w.shape):
            bad.append(f"{name}: diff {list(d.diff.shape)} vs weight {list(w.shape)}")
        elif d.diff_b is not None and (m.bias is None or tuple(d.diff_b.shape) != tuple(m.bias.shape)):
            bad.append(f"{name}: diff_b {list(d.diff_b.shape)} vs bias "
                       f"{None if m.bias is None else list(m.bias.shape)}")
        else:
            found[name] = (real, m)
    if missing or bad:
        raise ValueError(f"{what} does not fit {type(model).__name__}: {len(missing)} target modules are not linear "
                         f"layers of the model: {_few(missing)}; {len(bad)} shape mismatches: {_few(bad)}")
    return found


@torch.no_grad()
def merge_lora_(model: torch.nn.Module, lora: dict[str, LoraDelta], scale: float = 1.0, alpha: float | None = None,
                what: str = "LoRA", base: dict[str, torch.Tensor] | None = None) -> list[str]:
    """W <- W + scale * (alpha / r) * up @ down for every target, in place (the parameters keep their storage,
    so compiled code and captured graphs that read them stay valid). The sum is formed in float32 and rounded
    to the parameter dtype once. base: the unmerged weights by parameter name (see `lora_base`) to merge onto
    instead of the current values (a LoRA swap: nothing accumulates over swaps). Returns the parameter names
    written."""
    written = []
    for name, (pname, m) in lora_targets(model, lora, what).items():
        d = lora[name]
        dev = m.weight.device  # the product is formed where the weight is (a 1.3B model's LoRA: GPU work)
        for attr, delta in (("weight", d.weight_delta(alpha, scale, dev)),
                            ("bias", None if d.diff_b is None else d.diff_b.to(dev).float() * scale)):
            if delta is None:
                continue
            p = getattr(m, attr)
            key = f"{pname}.{attr}"
            src = base[key] if base is not None and key in base else p
            p.copy_((src.to(dev, non_blocking=True).float() + delta).to(p.dtype))
            written.append(key)
    return written


def lora_base(model: torch.nn.Module, loras: list[dict[str, LoraDelta]], device=None) -> dict[str, torch.Tensor]:
    """Copies of the parameters that any of `loras` writes (by parameter name), taken before merging: what a swap
    merges onto. Weight and bias copies only for the modules touched."""
    names = set()
    for lora in loras:
        for name, (pname, _) in lora_targets(model, lora).items():
            names.add(f"{pname}.weight")
            if lora[name].diff_b is not None:
                names.add(f"{pname}.bias")
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone().to(device or params[n].device) for n in sorted(names)}
