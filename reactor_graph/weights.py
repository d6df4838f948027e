"""Weights from local files only (safetensors or a torch checkpoint); never a download."""
from __future__ import annotations

from pathlib import Path

import torch


def resolve(path: str | Path, root: Path | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and root is not None:
        p = Path(root) / p
    return p


def read_state_dict(path: str | Path, root: Path | None = None) -> dict[str, torch.Tensor]:
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


def save(module: torch.nn.Module, path: str | Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
