"""Models written for the Reactor runtime API, run on reactor-graph.

- `VideoModel`, `command`, `get_ctx`, `model` (reactor_graph.compat.api): the API itself;
- `open_manifest(path) -> ModelHost`: a manifest.json's model loaded behind the StreamHost protocol, so it gets
  the server, page, render and bench of a graph;
- `install_shim()`: `import reactor_runtime` gives this API where the real package is not installed;
- a model built on the real, installed `reactor_runtime` (0.0.x/1.x) is driven through that package's own
  context and command registry (reactor_graph.compat.real); `VideoModel.weights(name)` is a local folder
  (reactor_graph.compat.weights);
- the `reactor_model` node (reactor_graph.nodes.reactor_model): such a class as one node of a graph.
"""
from .api import Config, FrameError, ModelCommand, SessionContext, VideoModel, command, get_ctx, model
from .host import ModelHost, Ticket
from .manifest import LoadedManifest, Manifest, ModelLoadError, instantiate, load_class, load_manifest, open_manifest
from .shim import install_shim, real_runtime_installed, uninstall_shim

__all__ = ["VideoModel", "command", "get_ctx", "model", "SessionContext", "ModelCommand", "Config", "FrameError",
           "ModelHost", "Ticket", "open_manifest", "load_manifest", "load_class", "instantiate", "Manifest",
           "LoadedManifest", "ModelLoadError", "install_shim", "uninstall_shim", "real_runtime_installed"]
