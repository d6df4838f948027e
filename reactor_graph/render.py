"""Headless output: run a session and write its stream to an mp4, driven by a script of timed commands."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import av
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import CommandError, GraphError, Issue
from .loop import Engine, SessionResult  # or a compat ModelHost: the same run_session/fps/commands
from .spec import parse_yaml


class TimedCommand(BaseModel):
    model_config = ConfigDict(extra="forbid")
    block: int | None = Field(None, ge=0, description="apply before this block (0 = the first)")
    time: float | None = Field(None, ge=0, description="or: apply before the first block starting at/after this "
                                                       "many seconds of video")
    command: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_when(self):
        if (self.block is None) == (self.time is None):
            raise ValueError("give exactly one of 'block' or 'time'")
        return self


def load_script(path: str | Path, engine: Engine) -> list[TimedCommand]:
    """A YAML list of {block|time, command, params}; every command is validated before rendering starts."""
    data, pos = parse_yaml(Path(path).read_text(), str(path))
    if not isinstance(data, list):
        raise GraphError([Issue("", "a command script is a list of {block|time, command, params}", 1)], str(path))
    items, issues = [], []
    for i, raw in enumerate(data):
        try:
            item = TimedCommand.model_validate(raw)
            engine.commands.validate(item.command, item.params)
            items.append(item)
        except ValidationError as err:
            e = err.errors()[0]
            loc = ".".join(str(x) for x in e["loc"])
            issues.append(Issue(f"[{i}]{'.' + loc if loc else ''}", e["msg"], pos.line((i,))))
        except CommandError as err:
            issues.append(Issue(f"[{i}]", str(err), pos.line((i,))))
    if issues:
        raise GraphError(issues, str(path))
    return items


def pick_codec() -> str:
    for name in ("libx264", "h264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - PyAV raises several types for a missing codec
            continue
    raise RuntimeError("no H.264 or MPEG-4 encoder in this PyAV build")


def render(engine: Engine, out: str | Path, blocks: int, script: list[TimedCommand] | None = None,
           on_progress: Callable[[int], None] | None = None,
           inputs: dict[str, str] | None = None) -> tuple[SessionResult, int]:
    """Render `blocks` blocks to `out`. Returns the session result and the number of frames written.
    `inputs`: video slot -> video file feeding it in video time (reactor_graph.inputs.ClipFeed)."""
    fps = Fraction(engine.fps).limit_denominator(1000)
    pending = list(script or [])  # commands due at the same boundary apply in script order
    written = 0
    clips = open_clips(engine, inputs)

    def before_block(index: int) -> None:
        now = written / float(fps)
        for clip in clips:
            clip.advance(now)
        for cmd in list(pending):
            due = cmd.block is not None and cmd.block <= index or cmd.time is not None and cmd.time <= now
            if due:
                engine.submit(cmd.command, cmd.params)
                pending.remove(cmd)

    with av.open(str(out), mode="w") as container:
        stream = None

        def on_block(block) -> None:
            nonlocal written, stream
            if stream is None:  # opened on the first block: a wrapped model may learn its size only then
                stream = container.add_stream(pick_codec(), rate=fps)
                stream.width, stream.height, stream.pix_fmt = block.width, block.height, "yuv420p"
                if stream.codec_context.name == "libx264":
                    stream.options = {"preset": "veryfast", "crf": "18"}
            for frame in block.video():
                vf = av.VideoFrame.from_ndarray(frame, format=block.format)
                if block.format != "yuv420p":
                    vf = vf.reformat(format="yuv420p")
                container.mux(stream.encode(vf))
                written += 1
            if on_progress:
                on_progress(block.index + 1)

        try:
            result = engine.run_session(on_block, max_blocks=blocks, before_block=before_block)
        finally:
            for clip in clips:
                clip.close()
        if stream is not None:
            container.mux(stream.encode(None))
    return result, written


def open_clips(engine: Any, inputs: dict[str, str] | None) -> list:
    """ClipFeeds for `--input NAME=PATH`; raises ReactorGraphError naming what is wrong."""
    if not inputs:
        return []
    from .errors import ReactorGraphError
    from .inputs import ClipFeed

    feeds = getattr(engine, "inputs", None)
    if feeds is None or not hasattr(feeds, "feeds"):
        raise ReactorGraphError("--input feeds a graph's video slots; this model has none")
    feeds.stale_seconds = float("inf")  # video time, not the clock: a slow render never falls back
    try:
        return [ClipFeed(feeds, name, path) for name, path in inputs.items()]
    except ValueError as exc:
        raise ReactorGraphError(str(exc)) from None
