"""`VideoModel.weights("Name")` on reactor-graph: a local folder, never a download.

The Reactor runtime resolves a weights *name* (a manifest `weights` entry, or a name in `@model(weights=[...])`)
by downloading that folder from its bucket into ~/.cache/reactor_registry/<name>. Here a name resolves, in order,
to:

1. the manifest's own mapping: `"weights": {"Name": "path/to/folder"}` (relative to the manifest);
2. `<weights dir>/<Name>` for each `--weights-dir` given (also REACTOR_GRAPH_WEIGHTS_DIR, `:`-separated);
3. `<manifest folder>/<Name>` (a folder next to the manifest);
4. `~/.cache/reactor_registry/<Name>`: where the real runtime left a folder it downloaded before (read only).

Nothing is downloaded. A name found nowhere raises WeightsNotFound listing every folder searched.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")  # what the runtime accepts as a weights folder name
REGISTRY_CACHE = Path("~/.cache/reactor_registry")


class WeightsNotFound(FileNotFoundError):
    """A weights name that resolves to no local folder; the message lists the folders searched."""


def is_name(entry: str) -> bool:
    """A bare weights folder name (as the runtime has them), not a path."""
    return bool(NAME_RE.match(entry))


class WeightsResolver:
    def __init__(self, root: str | Path | None = None, mapping: dict[str, str] | None = None,
                 dirs: list[str | Path] | None = None, names: list[str] | None = None):
        self.root = Path(root).resolve() if root is not None else None
        self.mapping = {k: self._abs(v) for k, v in (mapping or {}).items()}
        env = [d for d in os.environ.get("REACTOR_GRAPH_WEIGHTS_DIR", "").split(os.pathsep) if d]
        self.dirs = [self._abs(d) for d in [*(dirs or []), *env]]
        self.names = list(names) if names is not None else None  # the declared names, when known

    def _abs(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() or self.root is None else self.root / p

    def candidates(self, name: str) -> list[Path]:
        out = [self.mapping[name]] if name in self.mapping else []
        out += [d / name for d in self.dirs]
        if self.root is not None:
            out.append(self.root / name)
        out.append(REGISTRY_CACHE.expanduser() / name)
        return out

    def find(self, name: str) -> Path | None:
        for c in self.candidates(name):
            if c.exists():
                return c
        return None

    def resolve(self, name: str) -> Path:
        if not isinstance(name, str) or not name:
            raise WeightsNotFound(f"weights(name) takes a weights folder name, got {name!r}")
        found = self.find(name)
        if found is not None:
            return found
        searched = ", ".join(str(c) for c in self.candidates(name))
        declared = ""
        if self.names is not None and name not in self.names:
            declared = f" ('{name}' is not in the manifest's weights: {', '.join(self.names) or 'none'})"
        raise WeightsNotFound(f"weights '{name}' not found; searched {searched}{declared}. reactor-graph never "
                              f"downloads weights: put the folder in one of those places, pass --weights-dir, or map "
                              f"it in the manifest (\"weights\": {{\"{name}\": \"path/to/folder\"}})")


_current = WeightsResolver()
_lock = threading.Lock()


def use(resolver: WeightsResolver) -> None:
    """Make `resolver` the one `VideoModel.weights(name)` answers from (the model being loaded)."""
    global _current
    with _lock:
        _current = resolver


def current() -> WeightsResolver:
    return _current


def resolve(name: str) -> Path:
    return _current.resolve(name)
