"""The few domain exceptions the library raises. Only the CLI turns them into messages and exit codes."""
from __future__ import annotations

from dataclasses import dataclass


class ReactorGraphError(Exception):
    """Base of every error the engine raises on purpose."""


@dataclass(frozen=True)
class Issue:
    """One problem in a graph file, located by YAML line and key path."""

    key: str  # dotted path, e.g. "nodes.denoise.in.cond"
    message: str  # what is wrong and what would be right
    line: int | None = None  # 1-based

    def render(self, file: str | None) -> str:
        where = file or "<graph>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


class GraphError(ReactorGraphError):
    """A graph file that cannot be loaded; carries every issue found, not just the first."""

    def __init__(self, issues: list[Issue], file: str | None = None):
        self.issues = list(issues)
        self.file = file
        n = len(self.issues)
        head = f"{file or 'graph'}: {n} problem{'s' if n != 1 else ''}"
        super().__init__(head + "\n" + "\n".join("  " + i.render(file) for i in self.issues))


class CommandError(ReactorGraphError):
    """A command that is unknown or whose params fail validation; nothing was changed."""

    def __init__(self, command: str, message: str, field: str | None = None):
        self.command, self.field, self.reason = command, field, message
        where = f"{command}.{field}" if field else command
        super().__init__(f"command '{where}': {message}")


class NodeError(ReactorGraphError):
    """A node raised while loading or running; names the node so the user knows where to look."""

    def __init__(self, node: str, node_type: str, stage: str, cause: BaseException):
        self.node, self.node_type, self.stage, self.cause = node, node_type, stage, cause
        super().__init__(f"node '{node}' ({node_type}) failed in {stage}: {type(cause).__name__}: {cause}")


class CaptureError(ReactorGraphError):
    """Compilation or CUDA-graph capture/replay went wrong (e.g. inputs differ from what was captured)."""


class SessionError(ReactorGraphError):
    """A session could not start or was ended by the engine (busy, watchdog)."""
