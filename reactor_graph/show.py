"""The plan shown to a person: a table in the terminal, Graphviz DOT, or a PNG."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .plan import Plan


def print_plan(plan: Plan, console: Console) -> None:
    d = plan.describe()
    console.print(f"[bold]{d['name']}[/]  {d['size'][1]}x{d['size'][0]} at {d['fps']:g} fps")
    if d["slots"]:
        console.print("slots: " + ", ".join(f"{k} ({v['type']})" for k, v in d["slots"].items()))
    for title, rows in (("on change (run when a slot they read changes)", d["on_change"]),
                        ("hot path (every block)", d["hot"]), ("alternatives (swap in by command)", d["alternatives"])):
        if not rows:
            continue
        table = Table(title=title, title_justify="left")
        for col in ("node", "type", "inputs", "outputs", "phases"):
            table.add_column(col)
        for r in rows:
            ins = "\n".join(f"{p} <- {v['from']}  {v['port']}" for p, v in r["inputs"].items())
            outs = "\n".join(f"{p}: {v}" for p, v in r["outputs"].items())
            table.add_row(r["name"] + (" (output)" if r["name"] == d["output"] else ""), r["type"], escape(ins),
                          escape(outs), str(r["phases"]))
        console.print(table)
    for name, u in d.get("understands", {}).items():
        if u.get("vocabulary"):
            console.print(f"{name} understands: " + escape(", ".join(u["vocabulary"])))
        for ex in u.get("examples", []):
            console.print(f"  try: {escape(ex)}")
    if d["commands"]:
        console.print("commands: " + ", ".join(c["name"] for c in d["commands"]) + ", reset (built in)")


def print_manifest(lm, console: Console) -> None:
    """A Reactor manifest.json (reactor_graph.compat.LoadedManifest): the model, and the runtime it was written
    for against what drives it here. Nothing is instantiated."""
    m, rt = lm.manifest, lm.runtime
    size = f"  {m.size[1]}x{m.size[0]}" if m.size else ""
    fps = f" at {m.fps:g} fps" if m.fps else ""
    console.print(f"[bold]{escape(m.model_name or lm.cls.__name__)}[/] {escape(m.model_version)}  "
                  f"{escape(m.class_)}{size}{fps}")
    by = rt["driven_by"]
    console.print(f"reactor-runtime: written for {escape(rt['written_for'] or '(not given)')}; driven by "
                  f"{escape(by['api'])}")
    for n in rt["notes"]:
        console.print(f"[yellow]warning:[/] {escape(n)}")
    if lm.weights:
        console.print("weights: " + ", ".join(escape(str(w)) for w in lm.weights))


def to_dot(plan: Plan) -> str:
    lines = [f'digraph "{plan.name}" {{', "  rankdir=LR;", "  node [shape=box, fontname=Helvetica];"]
    for slot in plan.slots:
        lines.append(f'  "$slots.{slot}" [shape=ellipse, style=dashed];')
    for name, node in plan.nodes.items():
        style = "filled" if name in plan.hot else "rounded"
        fill = ', fillcolor="#ffd9a8"' if name in plan.hot else ""
        lines.append(f'  "{name}" [label="{name}\\n{node.type_name}", style="{style}"{fill}];')
    for name, binds in plan.bindings.items():
        for port, src in binds.items():
            tail = f"$slots.{src.name}" if src.node is None else src.node
            label = port if src.node is None else f"{src.name} -> {port}"
            lines.append(f'  "{tail}" -> "{name}" [label="{label}", fontsize=10];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw_png(plan: Plan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    g = plan.graph.copy()
    for name, binds in plan.bindings.items():
        for src in binds.values():
            if src.node is None:
                g.add_edge(f"${src.name}", name)
    for layer, nodes in enumerate(nx.topological_generations(g)):
        for n in nodes:
            g.nodes[n]["layer"] = layer
    pos = nx.multipartite_layout(g, subset_key="layer")
    colours = ["#ffd9a8" if n in plan.hot else "#cfe3ff" if n in plan.nodes else "#eeeeee" for n in g.nodes]
    fig, ax = plt.subplots(figsize=(2.2 * (1 + max(nx.get_node_attributes(g, "layer").values())), 4))
    nx.draw_networkx(g, pos, ax=ax, node_color=colours, node_size=2600, node_shape="s", font_size=8, arrows=True)
    ax.set_title(f"{plan.name}: orange = hot path, blue = on change, grey = slots")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
