"""Benchmark the Triton colour-conversion kernels (reactor_graph.kernels.colour) on CUDA.

    python bench/bench_colour.py [OUT.json] [--T 12 --H 480 --W 832 --dtype bfloat16 --matrix bt601]
                                 [--no-sweep] [--no-compile]

Prints a table and the results as JSON: to OUT.json if given (table to stdout), else to stdout
(table to stderr). GB/s of the Triton kernels against torch eager, torch.compile and a
copy-bandwidth floor; see :func:`benchmark`.

Needs only torch + triton (+ a CUDA device). Uses the installed ``reactor_graph.kernels.colour``
when importable; otherwise (repo not pip-installed, e.g. a bare copy on the GPU machine) loads
``kernels/colour.py`` from this checkout by file path.
"""

import argparse
import importlib.util
import json
import os
import sys
from typing import Optional

import torch


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


def benchmark(
    T: int = 12,
    H: int = 480,
    W: int = 832,
    dtype: torch.dtype = torch.bfloat16,
    matrix: str = "bt601",
    sweep: bool = True,
    compile_reference: bool = True,
    json_path: Optional[str] = None,
    file=None,
    device: str = "cuda",
    colour=None,
) -> dict:
    """Time the Triton kernels against torch on CUDA; return (and optionally write) a JSON dict.

    For each conversion: the Triton kernel (writing into a preallocated ``out``), the torch
    reference eager, ``torch.compile`` of the reference, and a memory floor = bytes read +
    written by the conversion / the device-copy bandwidth measured in this run (a torch
    ``copy_`` of a buffer of that many bytes, which moves twice that). GB/s = (bytes read +
    written) / time. ``triton_over_floor`` = Triton ms / floor ms (1.0 = at copy bandwidth).
    Timings are ``triton.testing.do_bench`` means (L2 flushed between calls); the Triton kernel
    is also timed replayed from a CUDA graph (``do_bench_cudagraph``), which removes the Python
    validation and launch overhead of the public function.
    With ``sweep`` the forward yuv420p kernel is also timed for a few (BLOCK_C, num_warps).

    ``device="cpu"`` is a smoke mode for tests only (needs kernels imported with
    TRITON_INTERPRET=1; a plain wall-clock timer, one repetition; the numbers mean nothing).
    ``colour``: the colour module to time (default: :func:`load_colour`).
    """
    colour = load_colour() if colour is None else colour
    file = sys.stdout if file is None else file
    dev = torch.device(device)
    if not colour._HAVE_TRITON:
        raise RuntimeError("bench_colour.benchmark(): needs triton")
    import triton

    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("bench_colour.benchmark(): needs a CUDA device (torch.cuda.is_available() is False)")
        if colour._INTERPRET:
            raise RuntimeError("bench_colour.benchmark(): unset TRITON_INTERPRET to time compiled kernels")
        from triton.testing import do_bench, do_bench_cudagraph

        def ms_of(fn):
            return float(do_bench(fn, warmup=25, rep=200))

        def graph_ms_of(fn):
            return float(do_bench_cudagraph(fn, rep=100))

        device_name = torch.cuda.get_device_name(dev)
    else:
        if not colour._INTERPRET:
            raise RuntimeError("bench_colour.benchmark(): on CPU only as a smoke test, with TRITON_INTERPRET=1")
        import time

        def ms_of(fn):
            fn()
            t0 = time.perf_counter()
            fn()
            return max((time.perf_counter() - t0) * 1e3, 1e-6)

        graph_ms_of = ms_of  # exercises the same code path; no graph on CPU

        device_name = f"{dev.type} (smoke mode: Triton interpreter, timings meaningless)"

    gen = torch.Generator(device=dev).manual_seed(0)
    if dtype == torch.uint8:
        rgb = torch.randint(0, 256, (T, 3, H, W), device=dev, generator=gen, dtype=torch.uint8)
    else:
        rgb = (torch.rand((T, 3, H, W), device=dev, generator=gen) * 2 - 1).to(dtype)
    yuv_out = torch.empty((T, H * 3 // 2, W), dtype=torch.uint8, device=dev)
    rgb_in_bytes = rgb.numel() * rgb.element_size()
    yuv_bytes = yuv_out.numel()

    # device copy bandwidth, measured on a buffer as large as the biggest conversion's traffic
    n_copy = rgb_in_bytes + yuv_bytes
    src = torch.empty(n_copy, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    copy_ms = ms_of(lambda: dst.copy_(src))
    copy_gbps = 2 * n_copy / (copy_ms * 1e-3) / 1e9
    del src, dst

    def compiled(fn):
        try:
            return torch.compile(fn, dynamic=False)
        except Exception as e:  # pragma: no cover - depends on the machine
            return e

    n_rot = 4

    def rotating(fn, src, out):
        """A call cycling over ``n_rot`` copies of (src, out): back-to-back replays in a CUDA
        graph (no L2 flush there) then do not find the previous call's data in L2."""
        copies = [(src.clone(), torch.empty_like(out)) for _ in range(n_rot)]
        state = [0]

        def call():
            x, o = copies[state[0] % n_rot]
            state[0] += 1
            fn(x, o)

        return call

    fwd_yuv = lambda x, o: colour.rgb_to_yuv420p(x, matrix, out=o)  # noqa: E731
    fwd_nv12 = lambda x, o: colour.rgb_to_nv12(x, matrix, out=o)  # noqa: E731
    yuv_in = colour.rgb_to_yuv420p_reference(rgb, matrix)
    rgb_out = torch.empty((T, 3, H, W), dtype=dtype, device=dev)
    inv = lambda x, o: colour.yuv420p_to_rgb(x, matrix, dtype, out=o)  # noqa: E731
    cases = {
        "rgb_to_yuv420p": dict(
            nbytes=rgb_in_bytes + yuv_bytes,
            triton=lambda: fwd_yuv(rgb, yuv_out),
            graph=rotating(fwd_yuv, rgb, yuv_out) if graph_ms_of else None,
            ref=lambda: colour.rgb_to_yuv420p_reference(rgb, matrix),
            ref_fn=colour.rgb_to_yuv420p_reference, ref_args=(rgb, matrix),
        ),
        "rgb_to_nv12": dict(
            nbytes=rgb_in_bytes + yuv_bytes,
            triton=lambda: fwd_nv12(rgb, yuv_out),
            graph=rotating(fwd_nv12, rgb, yuv_out) if graph_ms_of else None,
            ref=lambda: colour.rgb_to_nv12_reference(rgb, matrix),
            ref_fn=colour.rgb_to_nv12_reference, ref_args=(rgb, matrix),
        ),
        f"yuv420p_to_rgb_{str(dtype).replace('torch.', '')}": dict(
            nbytes=yuv_bytes + rgb_in_bytes,
            triton=lambda: inv(yuv_in, rgb_out),
            graph=rotating(inv, yuv_in, rgb_out) if graph_ms_of else None,
            ref=lambda: colour.yuv420p_to_rgb_reference(yuv_in, matrix, dtype),
            ref_fn=colour.yuv420p_to_rgb_reference, ref_args=(yuv_in, matrix, dtype),
        ),
    }

    result = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": [T, 3, H, W],
        "dtype": str(dtype).replace("torch.", ""),
        "matrix": matrix,
        "copy": {"bytes": 2 * n_copy, "ms": copy_ms, "gbps": copy_gbps},
        "cases": {},
    }

    def line(name, ms, nbytes, extra=""):
        gbps = nbytes / (ms * 1e-3) / 1e9
        print(f"  {name:<22} {ms:9.4f} ms  {gbps:8.1f} GB/s {extra}", file=file)
        return {"ms": ms, "gbps": gbps}

    print(
        f"colour benchmark: [{T}, 3, {H}, {W}] {result['dtype']} {matrix} on {result['device']}"
        f" (copy bandwidth {copy_gbps:.1f} GB/s)",
        file=file,
    )
    for name, c in cases.items():
        nbytes = c["nbytes"]
        entry = {"bytes": nbytes}
        # correctness first: the kernel must agree with the reference (<= 1 code / 1 ulp)
        got = c["triton"]().clone()
        want = c["ref"]()
        entry["max_abs_diff_vs_reference"] = float((got.float() - want.float()).abs().max().item())
        print(f"{name}: max |triton - reference| = {entry['max_abs_diff_vs_reference']:g}", file=file)
        floor_ms = nbytes / (copy_gbps * 1e9) * 1e3
        entry["floor"] = line("memory floor", floor_ms, nbytes)
        entry["triton"] = line("triton", ms_of(c["triton"]), nbytes)
        if graph_ms_of is not None:
            try:  # replayed from a CUDA graph: kernel time without Python / launch overhead
                entry["triton_cudagraph"] = line("triton (CUDA graph)", graph_ms_of(c["graph"]), nbytes)
            except Exception as e:  # pragma: no cover - depends on the machine
                entry["triton_cudagraph"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        entry["torch_eager"] = line("torch eager (ref)", ms_of(c["ref"]), nbytes)
        if compile_reference:
            fn = compiled(c["ref_fn"])
            try:
                if isinstance(fn, Exception):
                    raise fn
                args = c["ref_args"]
                fn(*args)  # compile outside the timing
                entry["torch_compile"] = line("torch.compile (ref)", ms_of(lambda: fn(*args)), nbytes)
            except Exception as e:  # pragma: no cover - depends on the machine
                entry["torch_compile"] = {"error": f"{type(e).__name__}: {e}"[:500]}
                print(f"  torch.compile (ref)    failed: {entry['torch_compile']['error']}", file=file)
        entry["triton_over_floor"] = entry["triton"]["ms"] / floor_ms
        print(f"  triton / floor         {entry['triton_over_floor']:9.3f}x", file=file)
        result["cases"][name] = entry

    if sweep:
        nbytes = rgb_in_bytes + yuv_bytes
        rows = []
        print("rgb_to_yuv420p config sweep (BLOCK_C, num_warps):", file=file)
        for block_c in (64, 128, 256, 512, 1024):
            for num_warps in (1, 2, 4, 8):
                per_thread = block_c * 2 // (32 * num_warps)  # pixels per thread per row
                if per_thread < 1 or per_thread > 16:
                    continue
                try:
                    ms = ms_of(lambda: colour._rgb_to_yuv420_triton(rgb, yuv_out, matrix, False, block_c, num_warps))
                    r = line(f"BLOCK_C={block_c} w={num_warps}", ms, nbytes)
                    rows.append({"block_c": block_c, "num_warps": num_warps, **r})
                except Exception as e:  # pragma: no cover
                    rows.append({"block_c": block_c, "num_warps": num_warps, "error": str(e)[:300]})
        result["sweep_rgb_to_yuv420p"] = rows
        result["default_config"] = dict(zip(("block_c", "num_warps"), colour._default_config(W // 2)))

    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {json_path}", file=file)
    return result


def main(argv=None) -> int:
    colour = load_colour()
    p = argparse.ArgumentParser(description="Benchmark the Triton colour-conversion kernels (CUDA).")
    p.add_argument("out", nargs="?", metavar="OUT.json", help="write the JSON here (default: stdout)")
    p.add_argument("--json", metavar="PATH", dest="json_path", help="same as OUT.json")
    p.add_argument("--T", type=int, default=12)
    p.add_argument("--H", type=int, default=480)
    p.add_argument("--W", type=int, default=832)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "uint8"])
    p.add_argument("--matrix", default="bt601", choices=sorted(colour.MATRICES))
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    out_path = a.out or a.json_path
    table = sys.stdout if out_path else sys.stderr
    result = benchmark(
        a.T, a.H, a.W, getattr(torch, a.dtype), a.matrix,
        sweep=not a.no_sweep, compile_reference=not a.no_compile, file=table, colour=colour,
    )
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
