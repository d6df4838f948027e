"""Write a copy of the demo graph with torus positions on its denoiser and circular padding on its decoder
(what issue 17's fifth training run trains, before its weights are shipped with graphs/demo.yaml itself).

    python tools/demo_torus_graph.py graphs/demo.yaml graphs/demo_torus.yaml
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml


def torus_graph(src: Path, dst: Path) -> None:
    graph = yaml.safe_load(src.read_text())
    kinds = {spec["type"]: spec for spec in graph["nodes"].values()}
    kinds["causal_denoiser"].setdefault("params", {})["positions"] = "torus"
    kinds["latent_decoder"].setdefault("params", {})["padding"] = "circular"
    dst.write_text(yaml.safe_dump(graph, sort_keys=False, width=110))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    torus_graph(Path(sys.argv[1]), Path(sys.argv[2]))
