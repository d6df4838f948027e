"""The `reactor-graph` command. The only place where errors become messages and exit codes."""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import CommandError, GraphError, ReactorGraphError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="A declarative pipeline-graph engine for real-time, interactive video models.")
console = Console(stderr=True)
out = Console()
_state = {"verbose": False}
_T0 = time.perf_counter()


def demo_path() -> Path:
    from reactor_graph import graphs

    return Path(graphs.__file__).parent / "demo.yaml"


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="show tracebacks and debug logs"),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="only warnings and errors (no session log)")):
    _state["verbose"] = verbose
    setup_logging(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a test runner swaps it and closes the old one)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int) -> None:
    """reactor_graph's own log (sessions start and end, with client and reason; refused commands, swaps,
    errors, shutdown) on stderr at `level`: timestamped plain lines, or Rich's on a terminal."""
    logger = logging.getLogger("reactor_graph")
    for h in [h for h in logger.handlers if getattr(h, "_reactor_graph", False)]:
        logger.removeHandler(h)
    if console.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler._reactor_graph = True
    if level <= logging.DEBUG:  # --verbose: every library's debug log too, through the root logger
        root = logging.getLogger()
        for h in [h for h in root.handlers if getattr(h, "_reactor_graph", False)]:
            root.removeHandler(h)
        root.addHandler(handler)
        root.setLevel(level)
    else:  # other libraries: warnings only, on Python's last-resort handler
        logger.addHandler(handler)
    logger.setLevel(level)


@contextmanager
def clear_errors():
    """Domain errors become one paragraph and an exit code: 2 for bad input (graph, command), 1 otherwise."""
    try:
        yield
    except (GraphError, CommandError) as exc:
        _fail(exc, 2)
    except ReactorGraphError as exc:
        _fail(exc, 1)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        _fail(exc, 1)


def _fail(exc: BaseException, code: int):
    if _state["verbose"]:
        traceback.print_exception(exc)
    console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


HEARTBEAT_S = 20.0  # without a terminal, a step running longer than this says it is still running


@contextmanager
def _progress(label: str):
    """Progress messages of a long step: the spinner's text on a terminal; without one (a log, CI), plain lines
    with the time since the command started, and a line every HEARTBEAT_S while one message's step goes on (a
    compile can run for minutes inside one step), so it is never silent."""
    with console.status(label) as status:
        if console.is_terminal:
            yield lambda msg: status.update(f"[cyan]{msg}")
            return
        now = [label, time.perf_counter()]
        done = threading.Event()

        def line(msg: str) -> None:
            console.print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", highlight=False, markup=False)

        def beat() -> None:
            while not done.wait(HEARTBEAT_S):
                msg, since = now
                line(f"still {msg} ({time.perf_counter() - since:.0f}s)")

        def say(msg: str) -> None:
            now[:] = [msg, time.perf_counter()]
            line(msg)

        ticker = threading.Thread(target=beat, name="reactor-graph-heartbeat", daemon=True)
        ticker.start()
        try:
            yield say
        finally:
            done.set()
            ticker.join()


def is_manifest(path: str) -> bool:
    p = Path(path)
    return p.suffix == ".json" or (p.is_dir() and (p / "manifest.json").exists())


def _plan(graph, random_weights: bool = False):
    from .plan import build_plan
    from .spec import load_spec
    from .weights import use_random_weights

    ls = load_spec(graph)
    if random_weights:
        changed = use_random_weights(ls)
        if changed:
            console.print(f"random weights for: {', '.join(changed)}")
    return build_plan(ls)


RANDOM_WEIGHTS = typer.Option(False, "--random-weights", help="ignore every node's `weights:` and use random "
                                                              "weights (timing the real architecture)")


def _open(graph: str, device, dtype, compile, random_weights: bool = False, weights_dir=None, start: str = "full"):
    """A graph's Engine, or for a Reactor manifest.json a ModelHost (the same surface for run/render)."""
    from .loop import Engine

    if is_manifest(graph):
        from .compat import open_manifest

        with console.status(f"loading {graph}"):
            host = open_manifest(graph, weights_dir=weights_dir)
        for note in host.manifest.notes:
            console.print(f"[yellow]warning:[/] {escape(note)}", highlight=False)
        return host
    plan = _plan(graph, random_weights)
    with _progress("loading") as say:
        engine = Engine(plan, device=device, dtype=dtype, compile=compile, start=start)
        engine.load(progress=say)
    return engine


GRAPH_ARG = typer.Argument(None, help="graph YAML (default: the built-in demo), or a Reactor manifest.json",
                           show_default=False)
WEIGHTS_DIR = typer.Option(None, "--weights-dir", help="a Reactor manifest's model: folder where "
                                                       "VideoModel.weights(name) finds <name>/ (repeatable; nothing "
                                                       "is downloaded)")


@app.command()
def validate(graphs: list[Path] = typer.Argument(..., help="graph files to check")):
    """Check graph files without loading weights. Exit 2 if any is wrong.

    Example: `reactor-graph validate graphs/demo.yaml graphs/self_forcing.yaml`
    """
    from .plan import load_plan

    bad = 0
    for g in graphs:
        try:
            plan = load_plan(g)
            out.print(f"[green]ok[/] {g}: {len(plan.nodes)} nodes ({len(plan.on_change)} on change, "
                      f"{len(plan.hot)} hot), {len(plan.commands)} commands")
        except GraphError as exc:
            bad += 1
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
    if bad:
        raise typer.Exit(2)


@app.command()
def show(graph: Optional[str] = GRAPH_ARG,
         dot: Optional[Path] = typer.Option(None, help="write the graph as Graphviz DOT"),
         png: Optional[Path] = typer.Option(None, help="draw the graph to a PNG (needs matplotlib)"),
         as_json: bool = typer.Option(False, "--json", help="print the plan as JSON")):
    """Show the plan: slots, on-change nodes, the hot path, shapes, commands.

    Example: `reactor-graph show graphs/demo.yaml --dot plan.dot`
    """
    from .plan import load_plan
    from .show import draw_png, print_manifest, print_plan, to_dot

    with clear_errors():
        if graph and is_manifest(graph):
            from .compat import load_manifest

            lm = load_manifest(graph)
            if as_json:
                out.print_json(json.dumps({"class": lm.manifest.class_, "model_name": lm.manifest.model_name,
                                           "model_version": lm.manifest.model_version, "runtime": lm.runtime}))
            else:
                print_manifest(lm, out)
            return
        plan = load_plan(graph or demo_path())
        if as_json:
            out.print_json(json.dumps(plan.describe()))
        else:
            print_plan(plan, out)
        if dot:
            dot.write_text(to_dot(plan))
            out.print(f"wrote {dot}")
        if png:
            draw_png(plan, png)
            out.print(f"wrote {png}")


def node_ports(cls) -> tuple[dict, dict, str]:
    """Every input and output port of a node type: from an instance on default params (most nodes shape
    their ports from params) on a 480x832 frame, else the class's declaration. Returns (ins, outs, how)."""
    from .node import GraphInfo

    try:
        inst = cls("example", cls.Params(), GraphInfo(height=480, width=832, fps=16.0))
        ins, outs = inst.ports()
        return ins, outs, "default params and a 480x832 frame (H=480, W=832)"
    except Exception:  # noqa: BLE001 - required params: the class's declaration
        return dict(cls.inputs), dict(cls.outputs), "as declared; shapes follow the params"


@app.command()
def nodes():
    """List every node type with all its input and output ports (kind, dtype, shape) and params.

    Example: `reactor-graph nodes`
    """
    from .node import registry

    for name, cls in sorted(registry().items()):
        ins, outs, how = node_ports(cls)
        table = Table(title=f"[bold]{name}[/]  {escape(cls.description)}", title_justify="left", show_header=True,
                      caption=f"ports at {how}", caption_justify="left")
        table.add_column("kind")
        table.add_column("name")
        table.add_column("type / shape / default", overflow="fold")
        table.add_column("description", overflow="fold")
        for pname, f in cls.Params.model_fields.items():
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            typ = getattr(f.annotation, "__name__", str(f.annotation))
            table.add_row("param", f.alias or pname, escape(f"{typ} = {default}"),
                          escape(f.description or ""))
        for kind, ports in (("in", ins), ("out", outs)):
            for pname, port in ports.items():
                opt = " (optional)" if port.optional else ""
                table.add_row(kind, pname, escape(port.describe()) + opt, escape(port.description))
        if not outs:
            table.add_row("out", "-", "set by its params", "")
        out.print(table)


@app.command()
def render(graph: Optional[str] = GRAPH_ARG,
           output: Path = typer.Option(Path("out.mp4"), "-o", "--output", help="mp4 file to write"),
           blocks: int = typer.Option(16, min=1, help="blocks to generate"),
           commands: Optional[Path] = typer.Option(None, help="YAML list of {block|time, command, params}"),
           input: Optional[list[str]] = typer.Option(None, "--input", help="SLOT=FILE: a video file feeds the "
                                                     "graph's video slot SLOT (repeatable)"),
           device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
           compile: Optional[str] = typer.Option(None, help="eager | compile | cudagraph"),
           dtype: Optional[str] = typer.Option(None, help="float32 | float16 | bfloat16"),
           random_weights: bool = RANDOM_WEIGHTS, weights_dir: Optional[list[Path]] = WEIGHTS_DIR):
    """Render the stream to an mp4, applying timed commands from a script.

    Example: `reactor-graph render graphs/demo.yaml -o demo.mp4 --blocks 32 --commands script.yaml`;
    video-to-video: `reactor-graph render graphs/camera.yaml --input camera=clip.mp4`
    """
    from rich.progress import Progress

    from .render import load_script
    from .render import render as do_render

    with clear_errors():
        if not output.parent.exists():
            raise CommandError("render", f"cannot write {output}: folder {output.parent} does not exist", "output")
        if commands is not None and not commands.is_file():
            raise CommandError("render", f"command script {commands} does not exist", "commands")
        engine = _open(graph or str(demo_path()), device, dtype, compile, random_weights, weights_dir)
        script = load_script(commands, engine) if commands else None
        _check_script_fits(script or [], blocks, commands)
        clips = {}
        for item in input or []:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ReactorGraphError(f"--input takes SLOT=FILE, got {item!r}")
            clips[name] = path
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("rendering", total=blocks)
            result, frames = do_render(engine, output, blocks, script,
                                       on_progress=lambda n: progress.update(task, completed=n), inputs=clips)
        if result.error:
            raise ReactorGraphError(f"the session ended early after {result.blocks} blocks: {result.error}")
        out.print(f"wrote {output}: {frames} frames of {engine.width}x{engine.height} at {engine.fps:g} fps")


@app.command()
def bench(graph: Optional[str] = GRAPH_ARG,
          blocks: int = typer.Option(50, min=1, help="measured blocks per mode"),
          warmup: int = typer.Option(5, min=0, help="blocks run before measuring"),
          compile: Optional[str] = typer.Option(None, help="modes to compare, comma-separated (default: "
                                                "eager,compile,cudagraph on a GPU, eager on a CPU)"),
          device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
          dtype: Optional[str] = typer.Option(None, help="float32 | float16 | bfloat16"),
          json_out: Optional[Path] = typer.Option(None, "--json", help="write the report (schema in bench.py)"),
          plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG: per-node bars, block times"),
          trace: Optional[Path] = typer.Option(None, "--trace", help="write a Chrome/Perfetto trace of the timed "
                                               "blocks (open at ui.perfetto.dev)"),
          switch: int = typer.Option(0, "--switch", min=0, help="a prompt switch lands every N measured blocks: "
                                                                "its cost in the block where it lands"),
          random_weights: bool = RANDOM_WEIGHTS,
          swap: bool = typer.Option(False, "--swap", help="also swap through the graph's alternatives and report "
                                                          "the stall of each swap"),
          weights_dir: Optional[list[Path]] = WEIGHTS_DIR):
    """Time every node and the whole block, per compile mode, side by side.

    Example: `reactor-graph bench graphs/demo.yaml --compile eager,cudagraph --json b.json --plot b.png`
    """
    from .bench import default_modes, run_bench
    from .compile import MODES

    with clear_errors():
        modes = [m.strip() for m in compile.split(",") if m.strip()] if compile else []
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise CommandError("bench", f"unknown compile mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}",
                               "compile")
        if is_manifest(graph or ""):
            from .bench import bench_host

            host = _open(graph, device, dtype, None, weights_dir=weights_dir)
            with console.status("benchmarking"):
                report = bench_host(host, blocks, warmup)
            r = report["modes"]["model"]
            out.print(f"{report['graph']}: block p50 {r['block_ms']['p50']:.2f} ms, p95 {r['block_ms']['p95']:.2f}, "
                      f"p99 {r['block_ms']['p99']:.2f}; {r['fps']:.1f} frames/s; first frame "
                      f"{r['ttff_s'] * 1000:.0f} ms (a wrapped model is timed as a whole, block to block)")
            if json_out:
                json_out.write_text(json.dumps(report, indent=2))
            return
        for p in (json_out, plot, trace):
            _check_writable(p)
        engine = _open(graph or str(demo_path()), device, dtype, "eager", random_weights)
        modes = modes or default_modes(engine.device)
        probes: dict = {}
        with _progress("benchmarking") as say:
            report = run_bench(engine, modes, blocks, warmup, progress=say, switch=switch, probes=probes)
            if swap:
                from .bench import swap_scenario

                report["swaps"] = swap_scenario(engine, progress=say)
        print_bench(report)
        if json_out:
            json_out.write_text(json.dumps(report, indent=2))
            out.print(f"wrote {json_out}")
        if plot:
            from .bench import plot as draw

            draw(report, plot)
            out.print(f"wrote {plot}")
        if trace:
            from .trace import write

            n = write(trace, probes)
            out.print(f"wrote {trace}: {n} events (open it at ui.perfetto.dev or chrome://tracing)")


def _check_script_fits(script, blocks: int, path) -> None:
    """A command due after the last rendered block would be silently skipped: say which, and why."""
    from .errors import Issue

    late = [Issue(f"[{i}].block", f"block {item.block} is past the last block rendered ({blocks - 1}); raise "
                                  f"--blocks or move the command")
            for i, item in enumerate(script) if item.block is not None and item.block >= blocks]
    if late:
        raise GraphError(late, str(path))


def _check_writable(path: Optional[Path]) -> None:
    """Before any work: an output path whose folder is missing is named now, not after minutes of it."""
    if path is not None and not path.parent.exists():
        raise CommandError("bench", f"cannot write {path}: folder {path.parent} does not exist")


def _ms(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def print_bench(report: dict) -> None:
    """The report in tables that fit 80 columns: latency, throughput and start-up, then per node."""
    from .bench import label

    modes = report["modes"]
    rows = {m: label(m, r) for m, r in modes.items()}
    t1 = Table(title=f"{report['graph']} on {report['device_name']} ({report['dtype']}), ms", title_justify="left")
    for col in ("mode", "p50", "p95", "p99", "hot", "nodes", "ovh"):
        t1.add_column(col, justify="left" if col == "mode" else "right", overflow="fold")
    for m, r in modes.items():
        b = r["block_ms"]
        t1.add_row(rows[m], _ms(b["p50"]), _ms(b["p95"]), _ms(b["p99"]), _ms(r["hot_path_ms"]["p50"]),
                   _ms(r["nodes_sum_ms"]), _ms(r["overhead_ms"]))
    out.print(t1)
    out.print("  p50/p95/p99: block latency; hot: hot path (un-probed); nodes: sum of per-node times (probed);\n"
              "  ovh: block p50 - hot, what the engine adds", highlight=False)
    t2 = Table(title="throughput and start-up", title_justify="left")
    for col in ("mode", "frames/s", "1st frame", "compile", "capture", "probe", "peak MB"):
        t2.add_column(col, justify="left" if col == "mode" else "right", overflow="fold")
    for m, r in modes.items():
        peak = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
        t2.add_row(rows[m], f"{r['fps']:.1f}", f"{r['ttff_s'] * 1000:.0f} ms", f"{r['compile_s']:.1f} s",
                   f"{r['capture_s']:.1f} s", f"{r['probe_cost_ms']:+.2f}", peak)
    out.print(t2)
    out.print("  probe: what timing every node adds to the hot path (probed - un-probed, ms)", highlight=False)
    t3 = Table(title="per node, p50 ms (on change: first run / steady)", title_justify="left")
    t3.add_column("node", overflow="fold")
    names = list(modes)
    for i, m in enumerate(names, 1):
        t3.add_column(f"[{i}]", justify="right", overflow="fold")
    oc = list(dict.fromkeys(n for r in modes.values() for n in r.get("on_change", {})))
    for n in oc:
        t3.add_row(f"{n} (on change)", *[f"{_ms(modes[m]['on_change'][n]['first_ms'])} / "
                                         f"{_ms(modes[m]['on_change'][n]['steady_ms'])}" for m in names])
    for n in dict.fromkeys(n for r in modes.values() for n in r["nodes_ms"]):
        t3.add_row(n, *[_ms(modes[m]["nodes_ms"].get(n)) for m in names])
    t3.add_row("[dim]sum of nodes[/]", *[_ms(modes[m]["nodes_sum_ms"]) for m in names])
    t3.add_row("[dim]hot path, probed[/]", *[_ms(modes[m]["probed_hot_path_ms"]) for m in names])
    out.print(t3)
    out.print("  " + "; ".join(f"[{i}] {rows[m]}" for i, m in enumerate(names, 1)), highlight=False)
    for m, r in modes.items():
        if r["note"]:
            out.print(f"  {m}: {r['note']}", highlight=False)
        if r.get("switch"):
            sw = r["switch"]
            out.print(f"  {m}: prompt switch every {sw['every']} blocks: {sw['block_ms']:.2f} ms in the block where "
                      f"it lands, {sw['stall_ms']:+.2f} ms over p50", highlight=False)
    for sw in report.get("swaps", []):
        what = f"{sw['node']} -> {sw['now']}" if sw["ok"] else f"refused: {sw['error']}"
        out.print(f"swap {what}: stall {sw['stall_ms']:.2f} ms over a {sw['block_p50_ms']:.2f} ms block"
                  + (" (recaptured)" if sw["recaptured"] else ""))
    if report["ratios"]:
        out.print("ratios (block p50): " + ", ".join(f"{k} {v:.2f}x" for k, v in report["ratios"].items()))


@app.command()
def run(graph: Optional[str] = GRAPH_ARG,
        host: str = typer.Option("127.0.0.1", help="address to bind (127.0.0.1 keeps it local)"),
        port: int = typer.Option(8080, help="port to serve on"),
        device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
        compile: Optional[str] = typer.Option(None, help="eager | compile | cudagraph"),
        dtype: Optional[str] = typer.Option(None, help="float32 | float16 | bfloat16"),
        max_seconds: Optional[float] = typer.Option(None, help="stop serving after this long (for scripts)"),
        policy: str = typer.Option("lossless", help="frame queue when the viewer is slower: lossless | latest"),
        queue_frames: int = typer.Option(8, min=1, help="frames the queue holds before the policy applies"),
        allow_origin: list[str] = typer.Option([], "--allow-origin", help="a web origin (https://app.example.com) "
                                               "whose pages may use this server; loopback origins always may"),
        token: Optional[str] = typer.Option(None, envvar="REACTOR_GRAPH_TOKEN", show_envvar=True,
                                            help="require this bearer token to start or stop sessions"),
        max_session_seconds: Optional[float] = typer.Option(None, min=1, help="end each session after this long "
                                                            "(the next in line gets the model)"),
        block_timeout: Optional[float] = typer.Option(None, min=0.1, help="a block running longer ends the session "
                                                      "(default: 20x the slowest block seen, at least 30 s)"),
        advertise_address: Optional[str] = typer.Option(None, help="the address WebRTC candidates carry "
                                                        "(behind NAT or in a container)"),
        replicas: int = typer.Option(1, min=1, help="engine replicas behind this address, on Ray Serve (needs "
                                     "pip install 'reactor-graph[scale]'; docs/scale-out.md)"),
        ray_address: Optional[str] = typer.Option(None, help="a Ray cluster for the replicas (default: a local "
                                                  "one, when --replicas > 1)"),
        trace: Optional[Path] = typer.Option(None, "--trace", help="time every node of the stream and write a "
                                             "Chrome/Perfetto trace of the last blocks served at shutdown"),
        trace_blocks: int = typer.Option(500, min=1, help="blocks the --trace file keeps (the last ones)"),
        start: str = typer.Option("tiered", help="tiered: stream at once from the eager code (CUDA graphs of it "
                                  "in cudagraph mode) and switch to the compiled hot path when it is built in the "
                                  "background | full: compile everything before the first frame"),
        random_weights: bool = RANDOM_WEIGHTS, weights_dir: Optional[list[Path]] = WEIGHTS_DIR):
    """Serve a graph (or a Reactor manifest.json): a web page, the Reactor JS SDK local protocol, metrics.

    Example: `reactor-graph run` (the built-in demo), then open the printed address.
    """
    with clear_errors():
        from .server.access import AccessPolicy, is_loopback_host
        from .server.app import serve

        if policy not in ("lossless", "latest"):
            raise CommandError("run", f"unknown policy '{policy}'; choose lossless or latest", "policy")
        if start not in ("tiered", "full"):
            raise CommandError("run", f"unknown start '{start}'; choose tiered or full", "start")
        access = AccessPolicy(bind=host, allow_origins=list(allow_origin), token=token or None)
        if not is_loopback_host(host) and not token:
            console.print(f"[bold yellow]warning:[/] serving on {host} without a token: anyone who can reach "
                          f"this address can use the model; pass --token (or set REACTOR_GRAPH_TOKEN)")
        _check_port(host, port)
        if trace is not None and (replicas > 1 or ray_address):
            raise CommandError("run", "--trace traces one engine; it does not go with --replicas/--ray-address",
                               "trace")
        if trace is not None and not trace.parent.exists():
            raise CommandError("run", f"cannot write {trace}: folder {trace.parent} does not exist", "trace")
        if replicas > 1 or ray_address:
            _run_replicas(graph, replicas, ray_address, host, port, access, max_seconds, device=device,
                          dtype=dtype, compile=compile, random_weights=random_weights, weights_dir=weights_dir,
                          settings=dict(policy=policy, queue_frames=queue_frames,
                                        max_session_seconds=max_session_seconds, block_timeout=block_timeout,
                                        advertise_address=advertise_address))
            return
        engine = _open(graph or str(demo_path()), device, dtype, compile, random_weights, weights_dir=weights_dir,
                       start="full" if trace is not None else start)  # a trace times the compiled path only
        probe = _start_trace(engine, trace, trace_blocks) if trace is not None else None
        code = serve(engine, host=host, port=port, max_seconds=max_seconds, policy=policy,
                     queue_frames=queue_frames, access=access, max_session_seconds=max_session_seconds,
                     block_timeout=block_timeout, advertise_address=advertise_address,
                     announce=lambda url: out.print(f"[bold green]serving[/] {engine.name} at {url}"))
        if probe is not None:
            _write_trace(trace, probe)
        if code:
            console.print("[bold red]error:[/] the engine is stuck in a node that does not return; exiting so "
                          "that a supervisor can restart the server")
            raise typer.Exit(code)
        if getattr(engine, "compiling", False):
            # inductor inside a daemon thread at interpreter shutdown can abort the process; its work is in
            # the compile caches as far as it got, so leave without waiting for it
            console.print("stopped while the hot path was still compiling in the background")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def _run_replicas(graph, replicas, ray_address, host, port, access, max_seconds, settings, **engine):
    """`run --replicas N`: the replicas on Ray Serve behind one front (reactor_graph/scale/)."""
    try:
        from .scale.ray_app import serve_replicas
    except ImportError as exc:
        raise CommandError("run", f"--replicas/--ray-address need Ray Serve ({exc}); install it with "
                                  f"pip install 'reactor-graph\\[scale]'", "replicas") from None
    path = str(Path(graph).resolve()) if graph else str(demo_path())
    engine["weights_dir"] = [str(Path(p).resolve()) for p in engine.get("weights_dir") or []] or None
    serve_replicas(path, replicas, ray_address, host, port, access, engine, settings, max_seconds,
                   announce=lambda url: out.print(f"[bold green]serving[/] {replicas} replicas at {url}"))


def _check_port(host: str, port: int) -> None:
    """Before loading the model: a port already taken is one line, not a traceback minutes later."""
    import socket

    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            why = "is already in use" if exc.errno in (98, 48, 10048) else f"cannot be used ({exc.strerror})"
            raise CommandError("run", f"port {port} on {host} {why}; pick another with --port", "port") from None


def _start_trace(engine, path: Path, keep: int):
    """`run --trace`: the engine times every node (a compiled hot path is built again, split at node
    boundaries) and the track records each frame; written at shutdown."""
    from collections import deque

    from .hot_path import Probe
    from .server import tracks

    if not hasattr(engine, "use_probe"):
        raise CommandError("run", "--trace needs a graph (a wrapped Reactor model is one opaque loop)", "trace")
    probe = Probe(engine.device, keep=keep)
    with _progress("preparing the traced hot path") as say:
        engine.use_probe(probe, progress=say)
    tracks.TRACE = deque(maxlen=keep * 64)
    tracks.trace_encoders()
    return probe


def _write_trace(path: Path, probe) -> None:
    from .server import tracks
    from .trace import write

    frames, tracks.TRACE = list(tracks.TRACE or ()), None
    n = write(path, {"reactor-graph run": probe}, {"reactor-graph run": frames})
    out.print(f"wrote {path}: {n} events (open it at ui.perfetto.dev or chrome://tracing)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
