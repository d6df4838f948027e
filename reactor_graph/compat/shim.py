"""`import reactor_runtime` for Reactor-API models, without shadowing the real package.

`install_shim()` puts a meta-path finder at the *end* of `sys.meta_path`: Python asks it only after every
ordinary finder (site-packages, the source tree, editable installs) has failed to find `reactor_runtime`. So where
the real `reactor_runtime` is installed, it is what `import reactor_runtime` gives, and nothing is shadowed; where
it is not, the import gives reactor-graph's implementation of the API (reactor_graph.compat.api), with the same
objects under these names:

    reactor_runtime            VideoModel, command, get_ctx, model, SessionContext, __version__
    reactor_runtime.model_api  VideoModel, command, get_ctx, model
    reactor_runtime.context    get_ctx, SessionContext (also as Context)

Any other `reactor_runtime.*` submodule fails with an ImportError that lists these. `install_shim(force=True)`
(or REACTOR_GRAPH_SHIM=force in the environment) puts the finder *first* instead, so the stand-in is used even
where the real package is installed: that is for running a model that imports the real package under
reactor-graph, whose host drives only its own VideoModel/get_ctx. The shim is installed by `open_manifest`, by the
`reactor_model` node and by `load_class`; nothing installs it at import time of reactor_graph.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

MARK = "__reactor_graph_shim__"
ROOT = "reactor_runtime"


def _exports() -> dict[str, dict[str, object]]:
    from . import api

    core = {"VideoModel": api.VideoModel, "command": api.command, "get_ctx": api.get_ctx, "model": api.model}
    return {
        ROOT: {**core, "SessionContext": api.SessionContext, "__version__": api.API_VERSION},
        f"{ROOT}.model_api": dict(core),
        f"{ROOT}.context": {"get_ctx": api.get_ctx, "SessionContext": api.SessionContext,
                            "Context": api.SessionContext},
    }


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != ROOT and not fullname.startswith(ROOT + "."):
            return None
        if fullname != ROOT:
            parent = sys.modules.get(ROOT)
            if parent is None or not getattr(parent, MARK, False):
                return None  # a submodule of the real package: not ours to answer
        return importlib.util.spec_from_loader(fullname, self, is_package=(fullname == ROOT))

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        exports = _exports()
        if module.__name__ not in exports:
            have = ", ".join(sorted(exports))
            raise ModuleNotFoundError(f"No module named '{module.__name__}': reactor-graph's stand-in for the "
                                      f"Reactor runtime provides {have} (the real reactor_runtime is not installed)",
                                      name=module.__name__)
        module.__dict__.update(exports[module.__name__])
        module.__dict__[MARK] = True
        module.__doc__ = "reactor-graph's implementation of the Reactor runtime model API (reactor_graph.compat)"


_finder = _Finder()


def real_runtime_installed() -> bool:
    """True when a reactor_runtime other than this shim is importable."""
    mod = sys.modules.get(ROOT)
    if mod is not None:
        return not getattr(mod, MARK, False)
    for finder in sys.meta_path:
        if finder is _finder:
            continue
        try:
            spec = finder.find_spec(ROOT, None) if hasattr(finder, "find_spec") else None
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            return True
    return False


def install_shim(force: bool | None = None) -> bool:
    """Make `import reactor_runtime` work. Returns True when the stand-in is what that import gives.

    force=None reads REACTOR_GRAPH_SHIM (force|auto, default auto)."""
    if force is None:
        force = os.environ.get("REACTOR_GRAPH_SHIM", "auto").strip().lower() == "force"
    loaded = sys.modules.get(ROOT)
    if force:
        if loaded is not None and not getattr(loaded, MARK, False):
            raise ImportError("REACTOR_GRAPH_SHIM=force: the real reactor_runtime was already imported in this "
                              "process; force the stand-in before anything imports reactor_runtime")
        if _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
        sys.meta_path.insert(0, _finder)
        return True
    if _finder not in sys.meta_path:
        sys.meta_path.append(_finder)
    return not real_runtime_installed()


def uninstall_shim() -> None:
    """Remove the finder and any stand-in modules already imported (tests)."""
    while _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    for name in [n for n in sys.modules if n == ROOT or n.startswith(ROOT + ".")]:
        if getattr(sys.modules[name], MARK, False):
            del sys.modules[name]


def shim_active() -> bool:
    return _finder in sys.meta_path
