"""manifest.json -> a loaded VideoModel behind a ModelHost.

    {
      "class": "model:MyModel",          # module:Class; the module is looked up in the manifest's folder first
      "model_name": "my-model",          # shown to clients (default: the class name)
      "model_version": "1.0.0",
      "args": {"steps": 4},              # keyword arguments of MyModel.__init__ (or its `config` dict)
      "weights": ["ckpt/model.safetensors"],  # local paths, relative to the manifest; all must exist
      "reactor-runtime": ">=0.0.3",      # optional: the runtime version the model was written for
      "fps": 16, "size": [480, 640]      # optional hints: playback rate; [height, width] of the stream
    }

Every problem in the file (missing keys, wrong types, a class that cannot be imported, args the class does not
take, weights that are not there) is reported together, as a GraphError with the file and key, before anything
heavy runs. Nothing is downloaded. Keys this loader does not know are kept (`Manifest.model_extra`), not refused:
manifests written for the Reactor runtime may carry more.
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import GraphError, Issue, ReactorGraphError
from .api import Config, VideoModel
from .shim import install_shim, real_runtime_installed

log = logging.getLogger("reactor_graph.compat")
CLASS_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


class ModelLoadError(ReactorGraphError):
    """A model class that could not be imported or whose __init__ failed."""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    class_: str = Field(alias="class", description="'module:Class' of the VideoModel subclass")
    model_name: str | None = None
    model_version: str = "0.1.0"
    args: dict[str, Any] = Field(default_factory=dict)
    weights: list[str] = Field(default_factory=list)
    runtime: str | None = Field(None, alias="reactor-runtime", description="version spec, e.g. '>=0.0.3'")
    fps: float | None = Field(None, gt=0, le=240)
    size: tuple[int, int] | None = Field(None, description="[height, width]")

    @field_validator("class_")
    @classmethod
    def _class(cls, v):
        if not CLASS_RE.match(v):
            raise ValueError(f"'{v}' is not 'module:Class' (e.g. \"model:MyModel\" or \"pkg.model:MyModel\")")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        if v is not None and (v[0] <= 0 or v[1] <= 0):
            raise ValueError("height and width must be positive")
        return v


@dataclass
class LoadedManifest:
    manifest: Manifest
    file: str
    root: Path  # the manifest's folder
    cls: type
    weights: list[Path]


# ---------------------------------------------------------------------------------------------- classes
def _owns(folder: Path, top: str) -> bool:
    return (folder / f"{top}.py").exists() or (folder / top / "__init__.py").exists() or (folder / top).is_dir()


def load_class(spec: str, folder: str | Path | None = None, shim: bool | None = None) -> type:
    """Import 'module:Class', looking in `folder` first (put on sys.path). Raises ModelLoadError, clearly.

    The reactor_runtime stand-in is installed first (see reactor_graph.compat.shim). Where the folder has a
    module of that name but another one of the same name is already imported from elsewhere, the folder's wins.
    """
    if not CLASS_RE.match(spec or ""):
        raise ModelLoadError(f"'{spec}' is not 'module:Class' (e.g. \"model:MyModel\")")
    install_shim(shim)
    module_name, _, cls_name = spec.partition(":")
    top = module_name.split(".")[0]
    where = ""
    if folder is not None:
        folder = Path(folder).resolve()
        where = f" in {folder} or on sys.path"
        while str(folder) in sys.path:  # first on the path, so the folder's module is the one found
            sys.path.remove(str(folder))
        sys.path.insert(0, str(folder))
        old = sys.modules.get(top)
        old_file = getattr(old, "__file__", None) if old is not None else None
        if old is not None and _owns(folder, top) and (old_file is None or not Path(old_file).resolve().is_relative_to(folder)):
            for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
                del sys.modules[name]
        importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ModelLoadError(f"cannot import module '{module_name}': no such module{where}") from exc
        raise ModelLoadError(f"module '{module_name}' failed to import: ModuleNotFoundError: {exc}"
                             f"{_hint_runtime(exc)}") from exc
    except Exception as exc:
        raise ModelLoadError(f"module '{module_name}' failed to import: {type(exc).__name__}: {exc}") from exc
    cls = getattr(module, cls_name, None)
    if cls is None:
        found = [n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, VideoModel)
                 and v is not VideoModel]
        have = f"; VideoModel classes there: {', '.join(found)}" if found else "; it defines no VideoModel subclass"
        raise ModelLoadError(f"module '{module_name}' has no '{cls_name}'{have}")
    if not (isinstance(cls, type) and issubclass(cls, VideoModel)):
        base = ""
        if isinstance(cls, type) and any(b.__name__ == "VideoModel" for b in cls.__mro__):
            real = next(b for b in cls.__mro__ if b.__name__ == "VideoModel")
            base = (f" (it derives from {real.__module__}.VideoModel, the real reactor_runtime package, which "
                    f"reactor-graph cannot drive; set REACTOR_GRAPH_SHIM=force to use reactor-graph's stand-in)")
        raise ModelLoadError(f"'{spec}' is not a VideoModel subclass{base}")
    return cls


def _hint_runtime(exc: ModuleNotFoundError) -> str:
    if exc.name and exc.name.startswith("reactor_runtime"):
        return ""
    return " (install the model's own dependencies in this environment)"


def _init_params(cls: type) -> list[inspect.Parameter]:
    if cls.__init__ is object.__init__:
        return []
    try:
        return list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]


def init_problems(cls: type, args: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, message) for args the class's __init__ would refuse: unknown names, missing required ones."""
    params = _init_params(cls)
    if _takes_config(params, args):
        return []
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    out = []
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        takes = ", ".join(sorted(named)) or "nothing"
        out += [(f"args.{k}", f"{cls.__name__}.__init__ takes no argument '{k}'; it takes: {takes}")
                for k in args if k not in named]
    out += [(f"args.{p.name}", f"{cls.__name__}.__init__ needs '{p.name}' (it has no default); add it to args")
            for p in params if p.name in named and p.default is p.empty and p.name not in args]
    return out


def _takes_config(params, args) -> bool:
    """`__init__(self, config)`: the models that read a config dict get the args as one Config."""
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    others = [p for p in params if p not in pos and p.kind is not p.VAR_KEYWORD]
    return (len(pos) == 1 and pos[0].name in ("config", "cfg", "conf") and not others and pos[0].name not in args)


def instantiate(cls: type, args: dict[str, Any]) -> Any:
    """The heavy load: cls(**args), or cls(Config(args)) for an __init__(self, config). ModelLoadError on failure."""
    params = _init_params(cls)
    try:
        if _takes_config(params, args):
            return cls(Config(args))
        return cls(**args)
    except Exception as exc:
        from .host import where_raised

        raise ModelLoadError(f"{cls.__name__}.__init__ failed: {type(exc).__name__}: {exc}{where_raised(exc)}") from exc


# ---------------------------------------------------------------------------------------------- manifest
def _line_of(text: str, key: str) -> int | None:
    m = re.search(r'"' + re.escape(key) + r'"\s*:', text)
    return text.count("\n", 0, m.start()) + 1 if m else None


def load_manifest(path: str | Path, shim: bool | None = None) -> LoadedManifest:
    """Read and check a manifest (a manifest.json file, or a folder holding one); import its class. Raises
    GraphError listing every problem found."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    file = str(p)
    if not p.exists():
        raise GraphError([Issue("", "file not found")], file)
    text = p.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GraphError([Issue("", f"not valid JSON: {exc.msg}", exc.lineno)], file) from None
    if not isinstance(data, dict):
        raise GraphError([Issue("", "a manifest is a JSON object with 'class', 'model_name', 'args', ...", 1)], file)
    try:
        man = Manifest.model_validate(data)
    except ValidationError as err:
        issues = []
        for e in err.errors():
            loc = [str(x) for x in e["loc"]]
            key = ".".join(loc).replace(".[", "[")
            msg = f"required key '{loc[-1]}' is missing" if e["type"] == "missing" else e["msg"]
            issues.append(Issue(key, msg, _line_of(text, loc[0]) if loc else None))
        raise GraphError(issues, file) from None

    root = p.resolve().parent
    issues: list[Issue] = []
    weights = []
    for i, w in enumerate(man.weights):
        wp = Path(w).expanduser()
        wp = wp if wp.is_absolute() else root / wp
        weights.append(wp)
        if not wp.exists():
            issues.append(Issue(f"weights[{i}]", f"'{w}' does not exist (looked for {wp}); reactor-graph reads "
                                                 f"weights from local paths only and never downloads them",
                                _line_of(text, "weights")))
    if man.runtime:
        try:
            from packaging.specifiers import InvalidSpecifier, SpecifierSet

            try:
                SpecifierSet(man.runtime)
            except InvalidSpecifier:
                issues.append(Issue("reactor-runtime", f"'{man.runtime}' is not a version spec (e.g. '>=0.0.3')",
                                    _line_of(text, "reactor-runtime")))
        except ImportError:  # packaging absent: the spec is informational only
            pass
    cls = None
    try:
        cls = load_class(man.class_, root, shim)
    except ModelLoadError as exc:
        issues.append(Issue("class", str(exc), _line_of(text, "class")))
    if cls is not None:
        for key, msg in init_problems(cls, man.args):
            issues.append(Issue(key, msg, _line_of(text, key.split(".")[-1]) or _line_of(text, "args")))
    if issues:
        raise GraphError(issues, file)
    if man.runtime and real_runtime_installed():
        log.info("the real reactor_runtime is installed; the manifest asks for reactor-runtime %s", man.runtime)
    return LoadedManifest(man, file, root, cls, weights)


def open_manifest(path: str | Path, *, format: str = "yuv420p", matrix: str = "bt601", shim: bool | None = None,
                  stop_timeout: float = 5.0):
    """Load the model a manifest names (its __init__ is the heavy load, done here once) behind a ModelHost."""
    from .host import ModelHost

    lm = load_manifest(path, shim)
    model = instantiate(lm.cls, lm.manifest.args)
    man = lm.manifest
    host = ModelHost(model, name=man.model_name or lm.cls.__name__, version=man.model_version, fps=man.fps,
                     size=man.size, format=format, matrix=matrix, stop_timeout=stop_timeout)
    host.manifest = lm
    return host
