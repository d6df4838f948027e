"""Weights from local files only (safetensors or a torch checkpoint); never a download."""
from __future__ import annotations

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
