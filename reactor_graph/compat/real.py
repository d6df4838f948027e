"""Driving a model built on the *real* installed `reactor_runtime` package (its 0.0.x and 1.x `VideoModel` API).

reactor-graph does not start any of that package's servers, LiveKit rooms, cloud or download code. It drives the
model through the package's own contract, as its runtimes do, and detects what differs version by version from
the package itself (not from a table of versions):

- the class: a subclass of the installed `reactor_runtime.VideoModel`; constructed as that version's loader does:
  `cls(**args)` (0.0.x, `utils.loader.build_model`), or `cls(config=DictConfig)` (1.x: the `@model(config=...)`
  YAML, if any, with the manifest's `args` merged over it, as `reactor run --model.k=v` does);
- commands: the package's own `model_api.command_registry` (name -> {"model", "description", "handler"}):
  params are validated with its pydantic model in the caller's thread and the command runs as the runtime runs
  it, `model.send(name, params)`; only the commands whose handler the model's class defines are offered;
- the session context: the package's own `ReactorContext` (`reactor_runtime.context.context` in 0.0.x,
  `reactor_runtime.context_api` in 1.x), built with the fields that version declares (`_send_fn`,
  `_emit_block_fn` or, from 1.6, `_push_to_framebuffer_fn` fed by the track accumulator, the monitoring hooks,
  `_set_fixed_rate_fn`, `_stop_evt`) and set with its `_set_global_ctx`, so `get_ctx()` is the package's own
  function; 1.6+ contexts are wired from the model's tracks with `ctx._configure_from_registry(cls)`;
- client video: `model.on_frame(frame)` (0.0.x to 1.4), `model._dispatch_media(MediaBundle)` (1.6+, which
  updates `VideoIn` tracks' `latest()` and calls `on_media`);
- weights: `VideoModel.weights(name)` keeps its own checks (the name must be in the manifest, 0.0.x, or in
  `@model(weights=[...])`, 1.x) and its download function (`model_api.get_weights`) is replaced by
  reactor_graph.compat.weights: a local folder, never a download. 0.0.x's `VideoModel.manifest()` reads the
  manifest being run (its cache is set), wherever the process was started.

What a version does not have is refused or explained naming the method and the version: `get_ctx().emit_block`
on 1.6+ (removed: `get_ctx().get_track().emit(frame)`), `get_ctx().should_stop()` on 0.0.x (use
`get_ctx()._stop_evt.is_set()`), `emit_frame` (never in the real package), and the 2.x `ReactorModel` API.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import sys
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from . import weights as W
from .api import ModelCommand

log = logging.getLogger("reactor_graph.compat")
ROOT = "reactor_runtime"


def installed_module():
    """The real reactor_runtime module if one is importable (the shim's stand-in does not count), else None."""
    from .shim import MARK

    mod = sys.modules.get(ROOT)
    if mod is None:
        try:
            mod = importlib.import_module(ROOT)
        except ImportError:
            return None
    return None if getattr(mod, MARK, False) else mod


def version_of(mod) -> str:
    v = getattr(mod, "__version__", None)
    if isinstance(v, str) and not v.endswith(".dev"):
        return v
    try:
        return metadata.version("reactor-runtime")
    except metadata.PackageNotFoundError:
        return v or "unknown"


def real_base(cls: type) -> type | None:
    """The real package's VideoModel (or 2.x ReactorModel) in cls's MRO, if any."""
    for b in getattr(cls, "__mro__", ()):
        if b.__module__.startswith(ROOT + ".") and b.__name__ in ("VideoModel", "ReactorModel"):
            return b
    return None


class UnsupportedRuntime(Exception):
    """The installed reactor_runtime's API for this class cannot be honoured; the message names what and why."""


class RealCommand(ModelCommand):
    """A command of the real registry: validated with the registry's own pydantic model, run by `model.send`."""

    def __init__(self, name: str, entry: dict):
        super().__init__(name, entry.get("description") or "", entry["handler"])
        self._model = entry["model"]
        self._names = tuple(self._model.model_fields)

    def call(self, instance: Any, validated) -> Any:
        return instance.send(self.name, validated.model_dump())


class RealRuntime:
    """The installed reactor_runtime, as reactor-graph drives it (one per process)."""

    def __init__(self, mod):
        self.mod = mod
        self.version = version_of(mod)
        try:
            self.model_api = importlib.import_module(f"{ROOT}.model_api")
        except ImportError:
            self.model_api = None
        self.VideoModel = getattr(self.model_api, "VideoModel", None)
        if self.VideoModel is None:
            raise UnsupportedRuntime(f"reactor_runtime {self.version} has no VideoModel (its API is ReactorModel "
                                     f"with @event and async run(), the 2.x line); reactor-graph drives the 0.0.x and "
                                     f"1.x VideoModel API only (see reactor_graph/compat/README.md)")
        self.ctx_mod = None
        for name in (f"{ROOT}.context_api", f"{ROOT}.context.context"):  # 1.x, 0.0.x
            try:
                self.ctx_mod = importlib.import_module(name)
                break
            except ImportError:
                continue
        if self.ctx_mod is None or not hasattr(self.ctx_mod, "ReactorContext"):
            raise UnsupportedRuntime(f"reactor_runtime {self.version}: no ReactorContext in context_api or "
                                     f"context.context; reactor-graph cannot build this version's session context")
        self.Context = self.ctx_mod.ReactorContext
        self.fields = {f.name for f in dataclasses.fields(self.Context) if f.init}
        self.bundles = "_push_to_framebuffer_fn" in self.fields  # 1.6+: tracks and MediaBundles
        if not self.bundles and "_emit_block_fn" not in self.fields:
            raise UnsupportedRuntime(f"reactor_runtime {self.version}: its ReactorContext takes neither "
                                     f"_emit_block_fn nor _push_to_framebuffer_fn ({', '.join(sorted(self.fields))})")
        self.registry = getattr(self.model_api, "command_registry", {})
        self.weights_patched = False

    # -- what this version offers ---------------------------------------------------------------------
    def has(self, method: str) -> bool:
        return callable(getattr(self.Context, method, None))

    def describe(self) -> str:
        how = "get_track().emit (tracks)" if self.bundles else "emit_block"
        return f"reactor_runtime {self.version} ({how})"

    # -- loading ------------------------------------------------------------------------------------
    def check_class(self, cls: type) -> None:
        base = real_base(cls)
        if base is not None and base.__name__ == "ReactorModel":
            raise UnsupportedRuntime(f"{cls.__name__} is a reactor_runtime {self.version} ReactorModel (async run(), "
                                     f"@event, typed Input/Output: the 2.x API), which reactor-graph does not drive; "
                                     f"it drives VideoModel subclasses of reactor_runtime 0.0.x and 1.x")
        if not (isinstance(cls, type) and issubclass(cls, self.VideoModel)):
            raise UnsupportedRuntime(f"{cls.__name__} is not a subclass of reactor_runtime.VideoModel")

    def registered(self, cls: type) -> dict | None:
        reg = getattr(self.model_api, "MODEL_REGISTRY", None)  # 1.x: @model's registry
        if reg is None:
            return None
        return next((v for v in reg.values() if v.get("class") is cls), None)

    def prepare(self, cls: type, manifest: dict, name: str, weight_names: list[str]) -> None:
        """Before __init__: weights resolve locally; 0.0.x's manifest() is this manifest; a 1.x class without
        @model is registered through the package's own @model (so its tracks and weights() work)."""
        self.patch_weights()
        if hasattr(self.VideoModel, "_manifest_cache"):  # 0.0.x reads manifest.json from the cwd otherwise
            self.VideoModel._manifest_cache = {**manifest, "weights": list(weight_names)}
        decorate = getattr(self.model_api, "model", None)
        if decorate is not None and self.registered(cls) is None:
            try:
                decorate(name=name, weights=list(weight_names))(cls)
            except ValueError as exc:  # a name clash with another registered class
                log.warning("could not register %s with reactor_runtime's @model: %s", cls.__name__, exc)
        reg = getattr(self.model_api, "MODEL_REGISTRY", None)
        if reg:  # 1.x's VideoModel.weights() reads "the" registered model (the first): make it this one
            items = list(reg.items())
            mine = [kv for kv in items if kv[1].get("class") is cls]
            reg.clear()
            reg.update(mine + [kv for kv in items if kv[1].get("class") is not cls])

    def patch_weights(self) -> None:
        if self.weights_patched or not hasattr(self.model_api, "get_weights"):
            return

        def get_weights(name, *args, **kwargs):  # the runtime's S3 download, replaced by a local lookup
            return W.resolve(name)

        get_weights.__doc__ = "reactor-graph: a local folder (reactor_graph.compat.weights), never a download"
        self.model_api.get_weights = get_weights
        self.weights_patched = True

    @property
    def line(self) -> str:
        """'0.0.x' or '1.x': how this version builds the model (0.0.x's context lives in context.context)."""
        return "0.0.x" if self.ctx_mod.__name__.endswith("context.context") else "1.x"

    def takes_config(self, cls: type) -> bool:
        """1.x builds `cls(config=DictConfig)`: a class whose __init__ takes `config` (or **kwargs) gets that."""
        if self.line == "0.0.x" or cls.__init__ is object.__init__:
            return False
        try:
            params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        except (TypeError, ValueError):
            return False
        return any(p.name == "config" or p.kind is p.VAR_KEYWORD for p in params)

    def instantiate(self, cls: type, args: dict, root: Path):
        """As this version's utils.loader.build_model does: cls(**args) (0.0.x) or cls(config=DictConfig) (1.x)."""
        if self.takes_config(cls):
            return cls(config=self.config(cls, args, root))
        return cls(**args)

    def config(self, cls: type, args: dict, root: Path):
        """1.x: the @model(config=...) YAML (relative to the manifest's folder) with the manifest's args over it."""
        from omegaconf import OmegaConf

        info = self.registered(cls) or {}
        base = OmegaConf.create({})
        path = info.get("config")
        if path:
            p = Path(path)
            p = p if p.is_absolute() else root / p
            base = OmegaConf.load(p)
        return OmegaConf.merge(base, OmegaConf.create(dict(args)))

    def commands(self, cls: type) -> dict[str, ModelCommand]:
        """The registry's commands whose handler is a method of cls (or a base), by name."""
        mine = {id(v) for k in cls.__mro__ for v in vars(k).values()}
        return {name: RealCommand(name, entry) for name, entry in self.registry.items()
                if id(entry.get("handler")) in mine}

    # -- sessions ------------------------------------------------------------------------------------
    @contextmanager
    def session(self, model, ctx):
        """The package's own ReactorContext around reactor-graph's SessionContext `ctx`, as its global context
        for the length of one start_session()."""
        kw: dict[str, Any] = {"_send_fn": ctx.send, "_enable_monitoring_fn": ctx.enable_monitoring,
                              "_disable_monitoring_fn": ctx.disable_monitoring, "_stop_evt": ctx._stop_evt}
        if self.bundles:
            kw["_push_to_framebuffer_fn"] = lambda bundle: self._bundle(model, ctx, bundle)
            if "_set_fixed_rate_fn" in self.fields:
                kw["_set_fixed_rate_fn"] = lambda fps: setattr(ctx, "fixed_rate", fps)
        else:
            kw["_emit_block_fn"] = ctx.emit_block
        real = self.Context(**{k: v for k, v in kw.items() if k in self.fields})
        if self.bundles:
            real._configure_from_registry(type(model))
        self.ctx_mod._set_global_ctx(real)
        try:
            yield real
        finally:
            if getattr(self.ctx_mod, "ctx", None) is real:
                self.ctx_mod._set_global_ctx(None)

    def _bundle(self, model, ctx, bundle) -> None:
        """A completed 1.6+ bucket: the default video output track's frames are the block."""
        real = self.ctx_mod.ctx
        track = None
        if real is not None:
            try:
                track = real.get_track()
            except RuntimeError:
                track = None
        td = bundle.get_track(track.name) if track is not None else None
        if td is None:
            videos = [t for t in bundle.get_tracks() if getattr(t.info.kind, "value", t.info.kind) == "video"]
            td = videos[0] if videos else None
        if td is None:
            return
        data = td.data
        size = ctx._size()
        if isinstance(data, np.ndarray) and size is not None and data.ndim == 3 and data.shape[:2] != tuple(size) \
                and not data.any():
            data = None  # the track's own black placeholder (720x1280): black of this stream's size
        ctx.emit_block(data)

    def video_inputs(self, model) -> list[str]:
        """The names of the model's VideoIn/InputTrack video tracks (1.6+)."""
        get = getattr(type(model), "get_tracks", None)
        if get is None:
            return []
        out = []
        for t in get():
            if getattr(t.direction, "value", t.direction) == "in" and getattr(t.kind, "value", t.kind) == "video":
                out.append(t.name)
        return out

    def deliver_frame(self, model, frame: np.ndarray, track: str | None = None) -> None:
        """A client video frame ([H, W, 3] uint8 RGB) to the model, as this version's runtime delivers it."""
        if self.bundles:
            media = importlib.import_module(f"{ROOT}.transports.media")
            names = self.video_inputs(model)
            name = track or (names[0] if names else "video")
            model._dispatch_media(media.MediaBundle.from_video_frame(frame, name))
        else:
            model.on_frame(frame)

    def explain(self, exc: BaseException) -> str:
        """A clearer reason for a model error that is this version's API (a method it does not have)."""
        if isinstance(exc, AttributeError) and getattr(exc, "obj", None) is not None \
                and isinstance(exc.obj, self.Context):
            name = exc.name
            hint = {
                "emit_block": "from 1.6 frames go out through tracks: get_ctx().get_track().emit(frame)",
                "emit_frame": "the real package never had emit_frame: use get_ctx().emit_block(frame)",
                "should_stop": "0.0.x has no should_stop(): use get_ctx()._stop_evt.is_set()",
                "get_track": "tracks (get_track) came with 1.6: use get_ctx().emit_block(frames)",
            }.get(name, f"its ReactorContext has {', '.join(sorted(_public(self.Context)))}")
            return (f"; get_ctx().{name}() is not part of reactor_runtime {self.version}'s context ({hint}); the "
                    f"model was written for another version of the runtime")
        return ""


def forget_modules(names: list[str]) -> None:
    """Modules about to be imported afresh (load_class re-imports a model module from another folder): drop what
    their classes put in the real package's process-wide registries (@model's MODEL_REGISTRY, @command's
    command_registry), so the fresh import registers again instead of clashing ("Duplicate model name")."""
    from .shim import MARK

    mod = sys.modules.get(ROOT)
    api = sys.modules.get(f"{ROOT}.model_api")
    if mod is None or getattr(mod, MARK, False) or api is None:
        return
    gone = set(names)
    reg = getattr(api, "MODEL_REGISTRY", None)
    if reg:
        for key in [k for k, v in reg.items() if getattr(v.get("class"), "__module__", None) in gone]:
            del reg[key]
    cmds = getattr(api, "command_registry", None)
    if cmds:
        for key in [k for k, v in cmds.items() if getattr(v.get("handler"), "__module__", None) in gone]:
            del cmds[key]


def _public(cls) -> set[str]:
    return {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}


def _var_kw(cls) -> bool:
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
    except (TypeError, ValueError):
        return False


_runtime: RealRuntime | None = None


def runtime() -> RealRuntime | None:
    """The installed real runtime (cached), or None where only the stand-in is there."""
    global _runtime
    mod = installed_module()
    if mod is None:
        return None
    if _runtime is None or _runtime.mod is not mod:
        _runtime = RealRuntime(mod)
    return _runtime
