"""Graph file -> pydantic models, with YAML line numbers kept so every error can point at its line.

The YAML is composed into nodes (which carry their marks) and turned into plain Python data plus a map
from key path to line. Pydantic validates the shape of the file; its error locations are translated back
through that map. Node params are validated later, against each node type's own `Params` model.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import GraphError, Issue

FORMAT_VERSION = 1
SLOT_REF = "$slots."


# ---------------------------------------------------------------------------------------------- YAML
class Positions(dict):
    """Key path (tuple) -> 1-based line number of that key (or list item) in the file."""

    def line(self, path: tuple) -> int | None:
        # Fall back to the nearest enclosing key that has a position.
        path = tuple(path)
        while path:
            if path in self:
                return self[path]
            path = path[:-1]
        return self.get((), None)


MAX_YAML_VALUES = 100_000  # a graph file has hundreds; aliases may not expand it beyond this


class _Budget:
    """Counts values as aliases expand them: nested aliases grow exponentially (a 'billion laughs')."""

    def __init__(self, limit: int = MAX_YAML_VALUES):
        self.left = limit
        self.seen: set[int] = set()

    def take(self, node: yaml.Node) -> bool:
        self.left -= 1
        if id(node) in self.seen:
            return self.left >= 0
        self.seen.add(id(node))
        return True


def _to_python(node: yaml.Node, path: tuple, pos: Positions, issues: list[Issue], budget: _Budget) -> Any:
    if not budget.take(node):
        raise GraphError([Issue(_dotted(path), f"YAML aliases expand this file beyond {MAX_YAML_VALUES} values; "
                                               "write the values out or use fewer nested aliases",
                                node.start_mark.line + 1)])
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for k_node, v_node in node.value:
            key = k_node.value if isinstance(k_node, yaml.ScalarNode) else str(k_node)
            if key in out:
                issues.append(Issue(_dotted(path + (key,)), "duplicate key (each key may appear once)",
                                    k_node.start_mark.line + 1))
            pos[path + (key,)] = k_node.start_mark.line + 1
            out[key] = _to_python(v_node, path + (key,), pos, issues, budget)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            pos[path + (i,)] = item.start_mark.line + 1
            items.append(_to_python(item, path + (i,), pos, issues, budget))
        return items
    # Scalars resolve with the safe loader's own tag logic (ints, floats, bools, nulls, strings).
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


def _dotted(path: tuple) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in path).replace(".[", "[")


def parse_yaml(text: str, file: str | None = None) -> tuple[Any, Positions]:
    pos = Positions()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = str(getattr(exc, "problem", exc))
        hint = ""
        if any(k in problem for k in ("mapping values are not allowed", "expected <block end>",
                                      "did not find expected key", "could not find expected ':'")):
            hint = "; check the indentation of this line and the one before (nested keys indent by two spaces)"
        elif "tab" in problem:
            hint = "; indent with spaces, not tabs"
        raise GraphError([Issue("", f"not valid YAML: {problem}{hint}", line)], file) from None
    if root is None:
        raise GraphError([Issue("", "the file is empty; a graph starts with 'reactor-graph: 1'", 1)], file)
    pos[()] = root.start_mark.line + 1
    issues: list[Issue] = []
    try:
        data = _to_python(root, (), pos, issues, _Budget())
    except GraphError as exc:
        raise GraphError(exc.issues, file) from None
    if issues:
        raise GraphError(issues, file)
    return data, pos


def near(name: str, choices, n: int = 3) -> str:
    """' (did you mean 'x'?)' for a typo, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + " or ".join(f"'{c}'" for c in close) + "?)"


# ---------------------------------------------------------------------------------------------- models
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


SlotType = Literal["str", "int", "float", "bool", "tensor", "video", "image"]


class SlotSpec(_Strict):
    type: SlotType = Field(description="value type a command writes")
    default: Any = Field(None, description="value a session starts with")
    shape: list[int] | None = Field(None, description="for tensor slots: fixed shape")
    description: str = ""
    # video / image slots (reactor_graph/inputs.py): [T, 3, H, W] pictures in [-1, 1]
    size: tuple[int, int] | None = Field(None, description="video/image slots: [height, width] (even)")
    fps: float | None = Field(None, gt=0, le=240, description="video slots: the rate the track is expected at")
    frames: int | None = Field(None, ge=1, le=64, description="video slots: newest frames per block (T)")

    @model_validator(mode="after")
    def _media(self):
        from .inputs import check_media_spec

        return check_media_spec(self)


class ParamSpec(_Strict):
    """One command parameter; becomes a pydantic field (and so a JSON schema for clients)."""

    type: Literal["str", "int", "float", "bool", "image"]  # image: an upload (FileRef) or base64
    description: str = ""
    default: Any = None
    enum: list[Any] | None = None
    min_length: int | None = None
    max_length: int | None = None
    ge: float | None = None
    le: float | None = None


class CommandSpec(_Strict):
    description: str = ""
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    set: dict[str, Any] = Field(default_factory=dict, description="slot -> value; '$param' inserts a param")
    map: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="param -> {choice: slot value}, for params whose choices stand for values")
    swap: dict[str, str] = Field(default_factory=dict, description="node -> alternative that replaces it")


class NodeSpec(_Strict):
    type: str = Field(description="registered node type, or 'package.module:Class'")
    params: dict[str, Any] = Field(default_factory=dict)
    in_: dict[str, Any] = Field(default_factory=dict, alias="in",
                                description="port -> '$slots.name' or 'node.output'")
    description: str = ""


class GraphSpec(_Strict):
    format: Literal[1] = Field(alias="reactor-graph", description="file format version")
    name: str
    version: str = "0.1.0"
    description: str = ""
    fps: float = Field(16.0, gt=0, le=240)
    size: tuple[int, int] = Field(description="[height, width] of emitted frames")
    device: str = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    compile: Literal["eager", "compile", "cudagraph"] = "eager"
    wrap_blocks: int | None = Field(None, ge=1, description="restart the sequence after this many blocks")
    seed: int = 0
    slots: dict[str, SlotSpec] = Field(default_factory=dict)
    commands: dict[str, CommandSpec] = Field(default_factory=dict)
    nodes: dict[str, NodeSpec]
    alternatives: dict[str, NodeSpec] = Field(default_factory=dict)

    @field_validator("size")
    @classmethod
    def _positive(cls, v):
        if v[0] <= 0 or v[1] <= 0:
            raise ValueError("height and width must be positive")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError(f"device '{v}' is not one of auto, cpu, cuda, cuda:N")
        return v


class LoadedSpec:
    """A validated GraphSpec together with where it came from, for later location-aware errors."""

    def __init__(self, spec: GraphSpec, pos: Positions, file: str | None, root: Path | None):
        self.spec, self.pos, self.file, self.root = spec, pos, file, root

    def issue(self, path: tuple, message: str) -> Issue:
        return Issue(_dotted(path), message, self.pos.line(path))


def _pydantic_issues(err: ValidationError, pos: Positions, prefix: tuple = ()) -> list[Issue]:
    aliases = {"in_": "in", "format": "reactor-graph"}
    issues = []
    for e in err.errors():
        path = prefix + tuple(aliases.get(p, p) if isinstance(p, str) else p for p in e["loc"])
        kind, msg = e["type"], e["msg"]
        if kind == "extra_forbidden":
            parent_fields = _fields_at(path[:-1]) if not prefix else None
            hint = near(str(path[-1]), parent_fields) if parent_fields else ""
            msg = f"unknown key '{path[-1]}'{hint}" + (
                f"; allowed here: {', '.join(sorted(parent_fields))}" if parent_fields else "")
        elif kind == "missing":
            msg = f"required key '{path[-1]}' is missing"
        issues.append(Issue(_dotted(path), msg, pos.line(path)))
    return issues


def _fields_at(path: tuple) -> list[str] | None:
    """Names of the keys a model accepts at a path, for 'did you mean' hints on unknown keys."""
    model: type[BaseModel] | None = GraphSpec
    i = 0
    while i < len(path) and model is not None:
        key = path[i]
        if key in ("slots", "commands", "nodes", "alternatives") and model is GraphSpec:
            model = {"slots": SlotSpec, "commands": CommandSpec, "nodes": NodeSpec, "alternatives": NodeSpec}[key]
            i += 2  # skip the user-chosen name
            continue
        if key == "params" and model is CommandSpec:
            model, i = ParamSpec, i + 2
            continue
        return None
    if model is None or i != len(path):
        return None
    return [f.alias or n for n, f in model.model_fields.items()]


def load_spec(source: str | Path, text: str | None = None) -> LoadedSpec:
    """Parse and validate the structure of a graph file (node types and edges are checked by plan.py)."""
    file = str(source)
    root = None
    if text is None:
        path = Path(source)
        if not path.exists():
            raise GraphError([Issue("", "file not found")], file)
        if path.is_dir():
            raise GraphError([Issue("", "is a folder, not a graph file (a .yaml file)")], file)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise GraphError([Issue("", "is not a text file (a graph is YAML text)")], file) from None
        except OSError as exc:
            raise GraphError([Issue("", f"cannot be read: {exc.strerror or exc}")], file) from None
        if "\x00" in text:
            raise GraphError([Issue("", "is not a text file (a graph is YAML text)")], file)
        root = path.resolve().parent
    data, pos = parse_yaml(text, file)
    if not isinstance(data, dict):
        raise GraphError([Issue("", "a graph file is a mapping that starts with 'reactor-graph: 1'", 1)], file)
    if "reactor-graph" not in data:
        raise GraphError([Issue("reactor-graph", "missing 'reactor-graph: 1' (the file format version) at the top",
                                1)], file)
    try:
        spec = GraphSpec.model_validate(data)
    except ValidationError as err:
        raise GraphError(_pydantic_issues(err, pos), file) from None
    return LoadedSpec(spec, pos, file, root)


def pydantic_issues(err: ValidationError, pos: Positions, prefix: tuple) -> list[Issue]:
    """Issues for a node's own Params model, placed at that node's `params` in the file."""
    return _pydantic_issues(err, pos, prefix)
