"""A persistent compile cache per graph, torch and device: inductor's and Triton's artifacts of one graph's hot
path, saved after it compiled (torch.compiler.save_cache_artifacts) and loaded before the next start compiles
it (load_cache_artifacts), so a restart, also on a machine whose temporary folders were wiped, skips codegen.

A cache belongs to one graph (its file and every node's params), one torch/Triton build and one GPU model; a
file made for another is left alone and the log says why, never loaded. Where: `REACTOR_GRAPH_CACHE_DIR`, else
~/.cache/reactor-graph/compile.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("reactor_graph")


def cache_dir() -> Path:
    return Path(os.environ.get("REACTOR_GRAPH_CACHE_DIR") or Path.home() / ".cache" / "reactor-graph" / "compile")


def build_of(device: torch.device) -> dict[str, str]:
    """What compiled code depends on besides the graph: torch, Triton, Python, the device model."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "device": f"{device.type}:{dev}"}


def graph_digest(plan: Any) -> str:
    """The graph as compiled: its file's text and each node's type and params (a change in either is another
    hot path)."""
    h = hashlib.sha256()
    f = plan.spec.file
    if f and Path(f).is_file():
        h.update(Path(f).read_bytes())
    for name, node in sorted(plan.nodes.items()):
        h.update(f"{name}:{node.type_name}:{node.params.model_dump_json()}".encode())
    return h.hexdigest()[:16]


class CompileCache:
    def __init__(self, plan: Any, device: torch.device, mode: str, folder: Path | None = None):
        self.folder = folder or cache_dir()
        self.graph = plan.name
        self.meta = {"graph": plan.name, "digest": graph_digest(plan), "mode": mode, **build_of(device)}
        key = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()[:16]
        self.path = self.folder / f"{_safe(plan.name)}-{key}.bin"
        self.loaded = False

    def _mismatch(self, other: dict) -> str:
        diff = [f"{k} {other.get(k)!r} (here {v!r})" for k, v in self.meta.items() if other.get(k) != v]
        return ", ".join(diff)

    def load(self) -> bool:
        """Load this graph's cache if there is one for this build; say why others are ignored."""
        if self.path.is_file():
            try:
                torch.compiler.load_cache_artifacts(self.path.read_bytes())
                self.loaded = True
                log.info("compile cache loaded: %s", self.path)
            except Exception as exc:  # noqa: BLE001 - a damaged cache costs a compile, never the start
                log.warning("compile cache %s ignored: it could not be read (%s)", self.path, exc)
            return self.loaded
        for meta_file in sorted(self.folder.glob(f"{_safe(self.graph)}-*.json")):
            try:
                other = json.loads(meta_file.read_text())
            except (OSError, ValueError):
                continue
            log.info("compile cache %s ignored: made for %s", meta_file.with_suffix(".bin").name,
                     self._mismatch(other))
        return False

    def save(self) -> Path | None:
        """Save what this process compiled (nothing is written if inductor made nothing cacheable)."""
        try:
            saved = torch.compiler.save_cache_artifacts()
        except Exception as exc:  # noqa: BLE001
            log.warning("compile cache not saved: %s", exc)
            return None
        if not saved or not saved[0]:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(saved[0])
        tmp.replace(self.path)  # a reader never sees half a file
        self.path.with_suffix(".json").write_text(json.dumps(self.meta, indent=1))
        log.info("compile cache saved: %s (%d kB)", self.path, len(saved[0]) // 1024)
        return self.path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:60] or "graph"
