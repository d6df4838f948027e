"""Benchmark the Triton colour-conversion kernels (reactor_graph.kernels.colour) on CUDA.

    python bench/bench_colour.py [OUT.json]        # JSON to OUT.json, or to stdout if omitted

Needs only torch + triton (+ a CUDA device). Uses the installed ``reactor_graph.kernels.colour``
when importable; otherwise (repo not pip-installed, e.g. a bare copy on the GPU machine) loads
``kernels/colour.py`` from this checkout by file path. The human-readable table goes to stderr
when the JSON goes to stdout, else to stdout.
"""

import importlib.util
import json
import os
import sys


def load_colour():
    try:
        from reactor_graph.kernels import colour  # installed (editable) package

        return colour
    except Exception:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(os.path.dirname(here), "kernels", "colour.py")
    name = "reactor_graph_kernels_colour"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered before exec: triton.jit / inspect look the module up
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_path = argv[0] if argv else None
    colour = load_colour()
    table = sys.stdout if out_path else sys.stderr
    result = colour.benchmark(file=table)
    text = json.dumps(result, indent=2)
    if out_path:
        with open(out_path, "w") as f:
            f.write(text + "\n")
        print(f"wrote {out_path}", file=table)
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
