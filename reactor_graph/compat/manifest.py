"""manifest.json -> a loaded VideoModel behind a ModelHost.

    {
      "class": "model:MyModel",          # module:Class; the module is looked up in the manifest's folder first
      "model_name": "my-model",          # shown to clients (default: the class name)
      "model_version": "1.0.0",
      "args": {"steps": 4},              # keyword arguments of MyModel.__init__ (or its `config` dict)
      "weights": ["ckpt/model.safetensors", "MyWeights"],  # local paths (relative to the manifest; they must
                                         # exist) or weights folder names for VideoModel.weights("MyWeights"),
                                         # found locally (reactor_graph.compat.weights); or {"MyWeights": "path"}
      "reactor-runtime": "0.0.4",        # optional: the runtime version the model was written for (as the
                                         # Reactor documentation writes it), or a range (">=0.0.3")
      "fps": 16, "size": [480, 640]      # optional hints: playback rate; [height, width] of the stream
    }

Every problem in the file (missing keys, wrong types, a class that cannot be imported, args the class does not
take, weights that are not there) is reported together, as a GraphError with the file and key, before anything
heavy runs. Nothing is downloaded. Keys this loader does not know are kept (`Manifest.model_extra`), not refused:
manifests written for the Reactor runtime may carry more.

The model class may derive from reactor-graph's own VideoModel (reactor_graph.compat.api, which `import
reactor_runtime` gives where the real package is not installed) or from the real, installed reactor_runtime's
VideoModel (0.0.x and 1.x), which is then driven through that package's own contract (reactor_graph.compat.real).
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import GraphError, Issue, ReactorGraphError
from .api import Config, VideoModel
from .shim import install_shim

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
    weights: list[str] | dict[str, str] = Field(default_factory=list)
    runtime: str | None = Field(None, alias="reactor-runtime",
                                description="the runtime version the model was written for ('0.0.4') or a range "
                                            "('>=0.0.3')")
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
    weights: list[Path]  # every entry that resolved to a local path (files or folders)
    resolver: Any = None  # reactor_graph.compat.weights.WeightsResolver: what VideoModel.weights(name) answers
    driver: Any = None  # reactor_graph.compat.real.RealRuntime for a class built on the installed reactor_runtime
    notes: list[str] = field(default_factory=list)  # warnings about the runtime version (also logged)

    @property
    def runtime(self) -> dict[str, Any]:
        """What /health and `show` say: the version the manifest names and what drives the model here."""
        from .api import API_VERSION

        if self.driver is not None:
            driven = {"package": "reactor_runtime", "version": self.driver.version, "api": self.driver.describe()}
        else:
            driven = {"package": "reactor_graph.compat", "version": API_VERSION,
                      "api": "reactor-graph's VideoModel API (stand-in for reactor_runtime 0.0.x/1.x)"}
        return {"written_for": self.manifest.runtime, "driven_by": driven, "notes": list(self.notes)}


# ---------------------------------------------------------------------------------------------- classes
def _owns(folder: Path, top: str) -> bool:
    return (folder / f"{top}.py").exists() or (folder / top / "__init__.py").exists() or (folder / top).is_dir()


def load_class(spec: str, folder: str | Path | None = None, shim: bool | None = None, real: bool = False) -> type:
    """Import 'module:Class', looking in `folder` first (put on sys.path). Raises ModelLoadError, clearly.

    The reactor_runtime stand-in is installed first (see reactor_graph.compat.shim). Where the folder has a
    module of that name but another one of the same name is already imported from elsewhere, the folder's wins.
    real=True also takes a class built on the installed reactor_runtime (what open_manifest drives); without it
    such a class is refused, saying so.
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
            stale = [n for n in sys.modules if n == top or n.startswith(top + ".")]
            from .real import forget_modules

            forget_modules(stale)
            for name in stale:
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
        found = [n for n, v in vars(module).items() if isinstance(v, type) and v is not VideoModel
                 and not v.__module__.startswith("reactor_runtime") and (issubclass(v, VideoModel) or _real_video_model(v))]
        have = f"; VideoModel classes there: {', '.join(found)}" if found else "; it defines no VideoModel subclass"
        raise ModelLoadError(f"module '{module_name}' has no '{cls_name}'{have}")
    if not (isinstance(cls, type) and issubclass(cls, VideoModel)):
        from .real import UnsupportedRuntime, real_base, runtime

        base = real_base(cls) if isinstance(cls, type) else None
        if base is not None and real:
            try:
                rt = runtime()
                if rt is None:
                    raise UnsupportedRuntime(f"it derives from {base.__module__}.{base.__name__}, which is not the "
                                             f"installed reactor_runtime")
                rt.check_class(cls)
            except UnsupportedRuntime as exc:
                raise ModelLoadError(f"'{spec}': {exc}") from None
            return cls
        why = ""
        if base is not None:
            why = (f" (it derives from {base.__module__}.{base.__name__}, the real reactor_runtime package: run it "
                   f"from its manifest.json (reactor-graph run|render|bench manifest.json), or set "
                   f"REACTOR_GRAPH_SHIM=force to use reactor-graph's stand-in)")
        raise ModelLoadError(f"'{spec}' is not a VideoModel subclass{why}")
    return cls


def _real_video_model(cls: type) -> bool:
    from .real import real_base

    return real_base(cls) is not None


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


VERSION_RE = re.compile(r"^v?\d+(\.\d+)*$")


def parse_runtime(value: str):
    """(version, None) for a bare version ('0.0.4': what the model was written for, as the Reactor documentation
    writes it), (None, SpecifierSet) for a range ('>=0.0.3'); ValueError otherwise."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import Version

    v = value.strip()
    if VERSION_RE.match(v):
        return Version(v.lstrip("v")), None
    try:
        return None, SpecifierSet(v)
    except InvalidSpecifier:
        raise ValueError(f"'{value}' is neither a version (\"0.0.4\", the runtime version the model was written "
                         f"for) nor a version range (\">=0.0.3\")") from None


def runtime_notes(value: str | None, driver) -> list[str]:
    """Warnings, only where the model may need an API that is not what drives it here."""
    if not value:
        return []
    from packaging.version import InvalidVersion, Version

    try:
        version, spec = parse_runtime(value)
    except ValueError:
        return []
    def line(v: Version) -> str:
        return "0.0.x" if v.major == 0 else f"{v.major}.x"

    if driver is None:  # reactor-graph's own API: the 0.0.x/1.x VideoModel API
        low = version if version is not None else min((Version(s.version) for s in spec
                                                       if s.operator in (">=", "==", "~=", ">", "===")
                                                       and VERSION_RE.match(s.version)), default=None)
        if low is not None and low.major >= 2:
            return [f"the manifest says reactor-runtime {value}: the {line(low)} API (ReactorModel, @event) is not "
                    f"provided by reactor-graph, which provides the 0.0.x/1.x VideoModel API"]
        return []
    try:
        installed = Version(driver.version)
    except InvalidVersion:
        return []
    if version is not None:
        if line(version) != line(installed) or (installed.major == 1 and (version < Version("1.6")) !=
                                                  (installed < Version("1.6"))):
            return [f"the model was written for reactor-runtime {value} and runs on the installed reactor_runtime "
                    f"{driver.version}, whose VideoModel API differs ({driver.describe()})"]
        return []
    if not spec.contains(installed, prereleases=True):
        return [f"the manifest asks for reactor-runtime {value}; the installed reactor_runtime is {driver.version}"]
    return []


def _weights(man: Manifest, root: Path, text: str, resolver) -> tuple[list[Path], list[Issue]]:
    from . import weights as W

    paths, issues = [], []
    entries = man.weights.items() if isinstance(man.weights, dict) else [(w, None) for w in man.weights]
    for i, (w, mapped) in enumerate(entries):
        key = f"weights.{w}" if mapped is not None else f"weights[{i}]"
        if mapped is None and not W.is_name(w):
            wp = Path(w).expanduser()
            wp = wp if wp.is_absolute() else root / wp
            paths.append(wp)
            if not wp.exists():
                issues.append(Issue(key, f"'{w}' does not exist (looked for {wp}); reactor-graph reads weights from "
                                         f"local paths only and never downloads them", _line_of(text, "weights")))
            continue
        try:
            paths.append(resolver.resolve(w))
        except W.WeightsNotFound as exc:
            issues.append(Issue(key, str(exc), _line_of(text, "weights")))
    return paths, issues


def load_manifest(path: str | Path, shim: bool | None = None, weights_dir: list[str | Path] | str | Path | None = None
                  ) -> LoadedManifest:
    """Read and check a manifest (a manifest.json file, or a folder holding one); import its class. Raises
    GraphError listing every problem found. `weights_dir`: folders where weights names are looked up."""
    from . import weights as W

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
    dirs = [weights_dir] if isinstance(weights_dir, (str, Path)) else list(weights_dir or [])
    names = list(man.weights) if isinstance(man.weights, dict) else [w for w in man.weights if W.is_name(w)]
    resolver = W.WeightsResolver(root, man.weights if isinstance(man.weights, dict) else None, dirs, names)
    weights, issues = _weights(man, root, text, resolver)
    if man.runtime:
        try:
            parse_runtime(man.runtime)
        except ValueError as exc:
            issues.append(Issue("reactor-runtime", str(exc), _line_of(text, "reactor-runtime")))
        except ImportError:  # packaging absent: the version is informational only
            pass
    cls = driver = None
    try:
        cls = load_class(man.class_, root, shim, real=True)
    except ModelLoadError as exc:
        issues.append(Issue("class", str(exc), _line_of(text, "class")))
    if cls is not None and not issubclass(cls, VideoModel):
        from .real import runtime

        driver = runtime()
    if cls is not None and not (driver is not None and driver.takes_config(cls)):
        for key, msg in init_problems(cls, man.args):
            issues.append(Issue(key, msg, _line_of(text, key.split(".")[-1]) or _line_of(text, "args")))
    if issues:
        raise GraphError(issues, file)
    notes = runtime_notes(man.runtime, driver)
    for n in notes:
        log.warning("%s: %s", file, n)
    return LoadedManifest(man, file, root, cls, weights, resolver, driver, notes)


def open_manifest(path: str | Path, *, format: str = "yuv420p", matrix: str = "bt601", shim: bool | None = None,
                  stop_timeout: float = 5.0, weights_dir: list[str | Path] | str | Path | None = None):
    """Load the model a manifest names (its __init__ is the heavy load, done here once) behind a ModelHost."""
    from . import weights as W
    from .host import ModelHost

    lm = load_manifest(path, shim, weights_dir)
    man = lm.manifest
    name = man.model_name or lm.cls.__name__
    W.use(lm.resolver)
    commands = None
    if lm.driver is not None:
        drv = lm.driver
        drv.prepare(lm.cls, man.model_dump(by_alias=True), name, list(man.weights))
        try:
            model = drv.instantiate(lm.cls, man.args, lm.root)
        except Exception as exc:
            from .host import where_raised

            raise ModelLoadError(f"{lm.cls.__name__}.__init__ failed: {type(exc).__name__}: {exc}"
                                 f"{where_raised(exc)}") from exc
        commands = drv.commands(lm.cls)
    else:
        model = instantiate(lm.cls, man.args)
    host = ModelHost(model, name=name, version=man.model_version, fps=man.fps, size=man.size, format=format,
                     matrix=matrix, stop_timeout=stop_timeout, commands=commands, driver=lm.driver)
    host.manifest = lm
    host.runtime = lm.runtime
    return host
