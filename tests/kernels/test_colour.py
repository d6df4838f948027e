"""Tests for reactor_graph.kernels.colour (RGB <-> 4:2:0 YUV).

The Triton kernels are exercised on CPU through Triton's interpreter. ``colour`` decorates its
kernels once, at definition, with ``@triton.jit``, which picks interpreted or compiled mode from
``TRITON_INTERPRET`` when the module is imported. The fixtures ``interpreted`` / ``compiled`` give
the module in each mode: ``reactor_graph.kernels.colour`` itself where the process was started in
that mode (e.g. ``TRITON_INTERPRET=1 python -m pytest tests/kernels``), else a second copy of
``kernels/colour.py`` imported with ``TRITON_INTERPRET`` set (or unset) for that import only.
"""

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

colour = importlib.import_module("reactor_graph.kernels.colour")

REPO = Path(__file__).resolve().parents[2]
HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_CUDA = torch.cuda.is_available()

DTYPES = [torch.uint8, torch.float32, torch.float16, torch.bfloat16]
MATRICES = ["bt601", "bt709"]
# (T, H, W): non-powers of two, a single 2x2 quad, W/2 odd, more than one chroma row per frame
SIZES = [(1, 2, 2), (2, 6, 10), (3, 18, 34), (1, 34, 66)]


def _dt_id(dt):
    return str(dt).replace("torch.", "")


def _load_by_path(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # registered before exec: triton.jit / inspect look the module up
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


_MODES = {}


def colour_module(interpret: bool):
    """``colour`` with its kernels decorated interpreted (``interpret``) or compiled."""
    if colour._INTERPRET == interpret:
        return colour
    if interpret not in _MODES:
        with pytest.MonkeyPatch.context() as mp:  # TRITON_INTERPRET as set before an import
            if interpret:
                mp.setenv("TRITON_INTERPRET", "1")
            else:
                mp.delenv("TRITON_INTERPRET", raising=False)
            name = "_colour_interpreted" if interpret else "_colour_compiled"
            _MODES[interpret] = _load_by_path(name, REPO / "kernels" / "colour.py")
    return _MODES[interpret]


@pytest.fixture
def interpreted():
    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    mod = colour_module(True)
    assert mod._backend_for(torch.zeros(1)) == "triton-interpret"
    return mod


@pytest.fixture
def compiled():
    return colour_module(False) if HAVE_TRITON else colour


@pytest.fixture(scope="module")
def bench():
    try:
        yield _load_by_path("_bench_colour", REPO / "bench" / "bench_colour.py")
    finally:
        sys.modules.pop("_bench_colour", None)


def make_rgb(t, h, w, dtype, seed=0):
    """Random RGB; float values deliberately overshoot [-1, 1] a little to exercise the clamp."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (t, 3, h, w), generator=g, dtype=torch.uint8)
    return (torch.rand((t, 3, h, w), generator=g) * 2.2 - 1.1).to(dtype)


def smooth_rgb01(t, h, w, step=1.0 / 255):
    """Smooth colour ramps (float32 [T, 3, H, W] in [0.05, 0.95]): neighbouring pixels differ by
    about ``step`` per channel, i.e. about one uint8 code by default."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    frames = []
    for k in range(t):
        frames.append(torch.stack([
            0.3 + step * xx,
            0.6 - step * (0.5 * yy + 0.3 * xx) + 0.05 * k,
            0.2 + step * (0.7 * yy + 0.5 * xx),
        ]))
    return torch.stack(frames).clamp(0.05, 0.95)


def max_code_diff(a, b):
    return (a.to(torch.int32) - b.to(torch.int32)).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Triton (interpreter) vs the torch reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["yuv420p", "nv12"])
@pytest.mark.parametrize("matrix", MATRICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
def test_forward_triton_matches_reference(interpreted, dtype, matrix, fmt):
    fwd = interpreted.rgb_to_yuv420p if fmt == "yuv420p" else interpreted.rgb_to_nv12
    ref = colour.rgb_to_yuv420p_reference if fmt == "yuv420p" else colour.rgb_to_nv12_reference
    # every size for uint8 / bf16; fp32 / fp16 differ from bf16 only in the load, so they skip
    # the T=3 case to keep the (slow) interpreter run short
    sizes = SIZES if dtype in (torch.uint8, torch.bfloat16) else [s for s in SIZES if s[0] != 3]
    for i, (t, h, w) in enumerate(sizes):
        rgb = make_rgb(t, h, w, dtype, seed=i)
        got = fwd(rgb, matrix)
        want = ref(rgb, matrix)
        assert got.shape == want.shape == (t, h * 3 // 2, w)
        assert got.dtype == torch.uint8
        assert max_code_diff(got, want) <= 1, (t, h, w)


@pytest.mark.parametrize("nv12", [False, True])
def test_forward_triton_multiple_column_tiles_and_strides(interpreted, nv12):
    ref = colour.rgb_to_nv12_reference if nv12 else colour.rgb_to_yuv420p_reference
    # several column tiles with a masked tail (W/2 = 33 with BLOCK_C = 16)
    rgb = make_rgb(2, 6, 66, torch.bfloat16, seed=3)
    out = torch.empty(2, 9, 66, dtype=torch.uint8)
    interpreted._rgb_to_yuv420_triton(rgb, out, "bt601", nv12, block_c=16, num_warps=1)
    assert max_code_diff(out, ref(rgb)) <= 1
    # non-contiguous inputs are read through their strides: channels-last and a cropped view
    fwd = interpreted.rgb_to_nv12 if nv12 else interpreted.rgb_to_yuv420p
    cl = make_rgb(2, 10, 14, torch.uint8, seed=4).contiguous(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    assert max_code_diff(fwd(cl), ref(cl.contiguous())) <= 1
    crop = make_rgb(1, 12, 20, torch.float32, seed=5)[:, :, 1:11, 3:17]
    assert max_code_diff(fwd(crop), ref(crop.contiguous())) <= 1


@pytest.mark.parametrize("matrix", MATRICES)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=_dt_id)
def test_inverse_triton_matches_reference(interpreted, out_dtype, matrix):
    g = torch.Generator().manual_seed(7)
    for t, h, w in SIZES[:3]:
        yuv = torch.randint(0, 256, (t, h * 3 // 2, w), generator=g, dtype=torch.uint8)  # incl. out-of-range codes
        got = interpreted.yuv420p_to_rgb(yuv, matrix, out_dtype)
        want = colour.yuv420p_to_rgb_reference(yuv, matrix, out_dtype)
        assert got.shape == want.shape == (t, 3, h, w)
        assert got.dtype == out_dtype
        if out_dtype == torch.uint8:
            assert max_code_diff(got, want) <= 1
        else:
            # the interpreter truncates fp32 -> bf16 (compiled Triton and torch round to
            # nearest even), so allow one bf16 ulp in [-1, 1]; fp32 / fp16 agree exactly
            tol = 2.0 ** -7 if out_dtype == torch.bfloat16 else 1e-6
            assert (got.float() - want.float()).abs().max().item() <= tol


def test_inverse_triton_strided_out_and_non_contiguous_yuv(interpreted):
    yuv = colour.rgb_to_yuv420p_reference(make_rgb(2, 6, 66, torch.uint8, seed=8))
    want = colour.yuv420p_to_rgb_reference(yuv)
    out = torch.empty(2, 6, 66, 3, dtype=torch.uint8).permute(0, 3, 1, 2)  # channels-last view
    interpreted._yuv420p_to_rgb_triton(yuv, out, "bt601", block_c=16, num_warps=1)
    assert max_code_diff(out, want) <= 1
    big = torch.zeros(2, 9, 70, dtype=torch.uint8)
    big[:, :, 2:68] = yuv
    view = big[:, :, 2:68]  # not contiguous within a frame: copied by the launcher
    assert max_code_diff(interpreted.yuv420p_to_rgb(view), want) <= 1


def test_public_functions_take_the_triton_path_under_the_interpreter(interpreted, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the torch reference ran instead of the Triton kernel")

    for name in ("rgb_to_yuv420p_reference", "rgb_to_nv12_reference", "yuv420p_to_rgb_reference"):
        monkeypatch.setattr(interpreted, name, boom)
    rgb = make_rgb(1, 4, 6, torch.float32)
    interpreted.rgb_to_yuv420p(rgb)
    interpreted.rgb_to_nv12(rgb)
    interpreted.yuv420p_to_rgb(torch.full((1, 6, 6), 128, dtype=torch.uint8))


def test_dispatch_without_interpreter_uses_reference(compiled):
    assert compiled._backend_for(torch.zeros(1)) == "torch"
    rgb = make_rgb(2, 6, 10, torch.float16)
    assert torch.equal(compiled.rgb_to_yuv420p(rgb), colour.rgb_to_yuv420p_reference(rgb))
    assert torch.equal(compiled.rgb_to_nv12(rgb, "bt709"), colour.rgb_to_nv12_reference(rgb, "bt709"))


# ---------------------------------------------------------------------------------------------
# reference sanity: known values and layout
# ---------------------------------------------------------------------------------------------
def _solid(value, dtype, h=4, w=6):
    return torch.tensor(value, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, h, w).to(dtype).contiguous()


def _planes(yuv, h, w):
    flat = yuv.reshape(yuv.shape[0], -1)
    n, c = h * w, (h // 2) * (w // 2)
    return flat[:, :n].reshape(-1, h, w), flat[:, n:n + c].reshape(-1, h // 2, w // 2), flat[:, n + c:].reshape(-1, h // 2, w // 2)


@pytest.mark.parametrize("matrix", MATRICES)
def test_reference_known_values(matrix):
    cases = [
        # (uint8 rgb, float rgb, Y, U, V)
        ((255, 255, 255), (1.0, 1.0, 1.0), 235, 128, 128),
        ((0, 0, 0), (-1.0, -1.0, -1.0), 16, 128, 128),
        ((128, 128, 128), None, 126, 128, 128),   # 16 + 219 * 128/255 = 125.93
        (None, (0.0, 0.0, 0.0), 126, 128, 128),   # 16 + 219 * 0.5 = 125.5 -> rounds half up
    ]
    for u8, fl, y, u, v in cases:
        for value, dtype in ((u8, torch.uint8), (fl, torch.float32)):
            if value is None:
                continue
            ys, us, vs = _planes(colour.rgb_to_yuv420p_reference(_solid(value, dtype), matrix), 4, 6)
            assert (ys == y).all() and (us == u).all() and (vs == v).all(), (value, dtype)
    red = _solid((255, 0, 0), torch.uint8)
    ys, us, vs = _planes(colour.rgb_to_yuv420p_reference(red, matrix), 4, 6)
    # BT.601 red: Y = 16 + 219*0.299 = 81.5, U = 128 - 112*0.299/0.886 = 90.2, V = 240
    # BT.709 red: Y = 16 + 219*0.2126 = 62.6, U = 128 - 112*0.2126/0.9278 = 102.3, V = 240
    expect = {"bt601": (81, 90, 240), "bt709": (63, 102, 240)}[matrix]
    assert (ys == expect[0]).all() and (us == expect[1]).all() and (vs == expect[2]).all()
    # out-of-range float input is clamped like the nearest legal colour
    assert torch.equal(
        colour.rgb_to_yuv420p_reference(_solid((3.0, -7.0, 1.5), torch.float32), matrix),
        colour.rgb_to_yuv420p_reference(_solid((1.0, -1.0, 1.0), torch.float32), matrix),
    )


def test_reference_chroma_is_the_quad_mean_and_layout_matches_pyav():
    av = pytest.importorskip("av")
    h, w = 4, 6
    rgb = make_rgb(1, h, w, torch.uint8, seed=11)
    yuv = colour.rgb_to_yuv420p_reference(rgb)
    ys, us, vs = _planes(yuv, h, w)
    # chroma of each quad == chroma of the quad's mean colour
    x = rgb.float() / 255.0
    mean = (x[:, :, 0::2, 0::2] + x[:, :, 1::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 1::2]) / 4
    kr, kb = colour.MATRICES["bt601"]
    kg = 1 - kr - kb
    yp = kr * mean[:, 0] + kg * mean[:, 1] + kb * mean[:, 2]
    u_exp = torch.floor(128 + 112 * (mean[:, 2] - yp) / (1 - kb) + 0.5)
    v_exp = torch.floor(128 + 112 * (mean[:, 0] - yp) / (1 - kr) + 0.5)
    assert max_code_diff(us, u_exp) <= 1 and max_code_diff(vs, v_exp) <= 1
    # planes land where PyAV's yuv420p / nv12 frames read them
    frame = av.VideoFrame.from_ndarray(yuv[0].numpy(), format="yuv420p")
    for plane, want in zip(frame.planes, (ys[0], us[0], vs[0])):
        got = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]
        assert np.array_equal(got, want.numpy())
    nv12 = colour.rgb_to_nv12_reference(rgb)
    assert torch.equal(nv12[0, :h], ys[0])
    assert torch.equal(nv12[0, h:, 0::2], us[0]) and torch.equal(nv12[0, h:, 1::2], vs[0])
    frame = av.VideoFrame.from_ndarray(nv12[0].numpy(), format="nv12")
    uv = frame.planes[1]
    got = np.frombuffer(uv, np.uint8).reshape(uv.height, uv.line_size)[:, :w]
    assert np.array_equal(got, nv12[0, h:].numpy())


# ---------------------------------------------------------------------------------------------
# round trips and PyAV agreement (PyAV/swscale defaults to BT.601 limited range)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("matrix", MATRICES)
def test_round_trip_smooth_image(matrix):
    x01 = smooth_rgb01(2, 24, 40)
    u8 = torch.floor(x01 * 255 + 0.5).to(torch.uint8)
    back = colour.yuv420p_to_rgb_reference(colour.rgb_to_yuv420p_reference(u8, matrix), matrix)
    d = (back.int() - u8.int()).abs()
    assert d.max().item() <= 3 and d.float().mean().item() <= 1.0
    xf = (x01 * 2 - 1).to(torch.bfloat16)
    backf = colour.yuv420p_to_rgb_reference(colour.rgb_to_yuv420p_reference(xf, matrix), matrix, torch.float32)
    assert (backf - xf.float()).abs().max().item() <= 0.03


def test_round_trip_smooth_image_triton(interpreted):
    u8 = torch.floor(smooth_rgb01(1, 8, 20) * 255 + 0.5).to(torch.uint8)
    back = interpreted.yuv420p_to_rgb(interpreted.rgb_to_yuv420p(u8, "bt709"), "bt709")
    assert (back.int() - u8.int()).abs().max().item() <= 3


@pytest.mark.parametrize("matrix,sws", [("bt601", None), ("bt709", "ITU709")])
def test_pyav_agreement(matrix, sws):
    av = pytest.importorskip("av")
    x01 = smooth_rgb01(1, 48, 64, step=2.0 / 255)
    u8 = torch.floor(x01 * 255 + 0.5).to(torch.uint8)
    rgb24 = u8[0].permute(1, 2, 0).numpy().astype(np.int32)
    kw = {} if sws is None else {"src_colorspace": sws, "dst_colorspace": sws}
    for fmt, fwd in (("yuv420p", colour.rgb_to_yuv420p_reference), ("nv12", colour.rgb_to_nv12_reference)):
        arr = fwd(u8, matrix)[0].numpy()
        frame = av.VideoFrame.from_ndarray(arr, format=fmt)
        back = frame.reformat(format="rgb24", **kw).to_ndarray() if kw else frame.to_ndarray(format="rgb24")
        d = np.abs(back.astype(np.int32) - rgb24)
        assert d.max() <= 8 and d.mean() <= 2.5, (fmt, d.max(), d.mean())
    # our yuv420p -> rgb agrees with swscale's (which interpolates chroma; ours is nearest)
    yuv = colour.rgb_to_yuv420p_reference(u8, matrix)
    frame = av.VideoFrame.from_ndarray(yuv[0].numpy(), format="yuv420p")
    sw = frame.reformat(format="rgb24", **kw).to_ndarray() if kw else frame.to_ndarray(format="rgb24")
    ours = colour.yuv420p_to_rgb_reference(yuv, matrix)[0].permute(1, 2, 0).numpy()
    assert np.abs(sw.astype(np.int32) - ours.astype(np.int32)).max() <= 6
    # and swscale's rgb -> yuv420p agrees with ours to a code or so
    src = av.VideoFrame.from_ndarray(u8[0].permute(1, 2, 0).numpy().copy(), format="rgb24")
    theirs = (src.reformat(format="yuv420p", **kw) if kw else src.reformat(format="yuv420p")).to_ndarray()
    assert np.abs(theirs.astype(np.int32) - yuv[0].numpy().astype(np.int32)).max() <= 2


# ---------------------------------------------------------------------------------------------
# validation and out=
# ---------------------------------------------------------------------------------------------
FORWARD = [colour.rgb_to_yuv420p, colour.rgb_to_nv12, colour.rgb_to_yuv420p_reference, colour.rgb_to_nv12_reference]


@pytest.mark.parametrize("fn", FORWARD, ids=lambda f: f.__name__)
def test_forward_rejects_bad_input(fn):
    with pytest.raises(ValueError, match=r"height=7, width=10.*even height and an even width.*6x10"):
        fn(torch.zeros(1, 3, 7, 10))
    with pytest.raises(ValueError, match=r"height=8, width=5.*even.*8x4"):
        fn(torch.zeros(2, 3, 8, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\].*got shape \(3, 8, 8\)"):
        fn(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"3 channels.*got shape \(1, 4, 8, 8\)"):
        fn(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"got dtype torch.float64; accepted: torch.uint8"):
        fn(torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"got dtype torch.int32"):
        fn(torch.zeros(1, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"matrix='bt2020'; accepted: \['bt601', 'bt709'\]"):
        fn(torch.zeros(1, 3, 8, 8), "bt2020")
    with pytest.raises(ValueError, match=r"expected a torch.Tensor"):
        fn(np.zeros((1, 3, 8, 8), np.float32))


@pytest.mark.parametrize("fn", [colour.yuv420p_to_rgb, colour.yuv420p_to_rgb_reference], ids=lambda f: f.__name__)
def test_inverse_rejects_bad_input(fn):
    with pytest.raises(ValueError, match=r"multiple of 3"):
        fn(torch.zeros(1, 10, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"height=6, width=7.*even"):
        fn(torch.zeros(1, 9, 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"rank 3"):
        fn(torch.zeros(9, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"got dtype torch.float32; accepted: torch.uint8"):
        fn(torch.zeros(1, 9, 8))
    with pytest.raises(ValueError, match=r"out_dtype=torch.int16"):
        fn(torch.zeros(1, 9, 8, dtype=torch.uint8), "bt601", torch.int16)


@pytest.mark.parametrize("mode", ["torch", "interpret"])
def test_out_parameter(mode, request):
    mod = request.getfixturevalue("interpreted" if mode == "interpret" else "compiled")
    rgb = make_rgb(2, 6, 10, torch.bfloat16, seed=12)
    for fwd, ref in ((mod.rgb_to_yuv420p, colour.rgb_to_yuv420p_reference), (mod.rgb_to_nv12, colour.rgb_to_nv12_reference)):
        out = torch.zeros(2, 9, 10, dtype=torch.uint8)
        ptr = out.data_ptr()
        res = fwd(rgb, out=out)
        assert res is out and out.data_ptr() == ptr
        assert max_code_diff(out, ref(rgb)) <= 1
        # a slice along T of a bigger buffer (frame stride != frame size) is accepted
        big = torch.zeros(5, 9, 10, dtype=torch.uint8)
        fwd(rgb, out=big[1:5:2])
        assert max_code_diff(big[1:5:2], ref(rgb)) <= 1
        assert (big[0] == 0).all() and (big[2] == 0).all() and (big[4] == 0).all()
        with pytest.raises(ValueError, match=r"out must have shape \(2, 9, 10\)"):
            fwd(rgb, out=torch.zeros(2, 10, 10, dtype=torch.uint8))
        with pytest.raises(ValueError, match=r"dtype torch.uint8"):
            fwd(rgb, out=torch.zeros(2, 9, 10, dtype=torch.float32))
        with pytest.raises(ValueError, match=r"contiguous within each frame"):
            fwd(rgb, out=torch.zeros(2, 10, 9, dtype=torch.uint8).transpose(1, 2))
    yuv = colour.rgb_to_yuv420p_reference(rgb)
    out = torch.empty(2, 3, 6, 10, dtype=torch.float16)
    assert mod.yuv420p_to_rgb(yuv, out_dtype=torch.float16, out=out) is out
    assert torch.equal(out, colour.yuv420p_to_rgb_reference(yuv, out_dtype=torch.float16))
    with pytest.raises(ValueError, match=r"out must have shape \(2, 3, 6, 10\), dtype torch.uint8"):
        mod.yuv420p_to_rgb(yuv, out=out)


def test_empty_batch(interpreted):
    assert interpreted.rgb_to_yuv420p(torch.zeros(0, 3, 4, 4)).shape == (0, 6, 4)
    assert interpreted.yuv420p_to_rgb(torch.zeros(0, 6, 4, dtype=torch.uint8)).shape == (0, 3, 4, 4)


# ---------------------------------------------------------------------------------------------
# packaging: import without triton, bench/bench_colour.py (file-path fallback, smoke run)
# ---------------------------------------------------------------------------------------------
def test_module_works_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        mod = _load_by_path("_colour_without_triton", REPO / "kernels" / "colour.py")
        assert not mod._HAVE_TRITON and mod._backend_for(torch.zeros(1)) == "torch"
        rgb = make_rgb(1, 4, 6, torch.uint8)
        assert torch.equal(mod.rgb_to_yuv420p(rgb), colour.rgb_to_yuv420p_reference(rgb))
    finally:
        sys.modules.pop("_colour_without_triton", None)


def test_bench_script_loads_colour_by_file_path(bench, monkeypatch):
    try:
        assert bench.load_colour() is colour  # installed package preferred
        monkeypatch.setitem(sys.modules, "reactor_graph.kernels", None)  # as if not installed
        mod = bench.load_colour()
        assert mod is not colour and callable(mod._rgb_to_yuv420_triton) and callable(mod.rgb_to_yuv420p)
        assert callable(bench.benchmark) and not hasattr(colour, "benchmark")
    finally:
        sys.modules.pop("reactor_graph_kernels_colour", None)


def test_benchmark_smoke_on_cpu(bench, interpreted, tmp_path):
    path = tmp_path / "colour.json"
    res = bench.benchmark(2, 4, 20, torch.bfloat16, sweep=False, compile_reference=False,
                          json_path=str(path), file=open(os.devnull, "w"), device="cpu", colour=interpreted)
    data = json.loads(path.read_text())
    assert data["shape"] == [2, 3, 4, 20] and set(data["cases"]) == set(res["cases"])
    for case in data["cases"].values():
        assert case["max_abs_diff_vs_reference"] <= 1
        assert {"floor", "triton", "triton_cudagraph", "torch_eager", "triton_over_floor"} <= set(case)


def test_bench_main_writes_the_json(bench, monkeypatch, tmp_path, capsys):
    calls = []

    def fake_benchmark(*args, **kw):
        calls.append((args, kw))
        return {"cases": {}, "shape": [args[0], 3, args[1], args[2]]}

    monkeypatch.setattr(bench, "benchmark", fake_benchmark)
    path = tmp_path / "out.json"
    assert bench.main([str(path), "--T", "2", "--H", "4", "--W", "6", "--dtype", "uint8", "--no-sweep"]) == 0
    assert json.loads(path.read_text()) == {"cases": {}, "shape": [2, 3, 4, 6]}
    assert capsys.readouterr().out == f"wrote {path}\n"
    args, kw = calls[-1]
    assert args == (2, 4, 6, torch.uint8, "bt601") and kw["sweep"] is False and kw["compile_reference"] is True
    assert bench.main(["--no-compile"]) == 0  # no path: JSON on stdout, table on stderr
    assert json.loads(capsys.readouterr().out)["shape"] == [12, 3, 480, 832]
    assert calls[-1][1]["compile_reference"] is False and calls[-1][1]["file"] is sys.stderr


def test_benchmark_refuses_cpu_without_interpreter(bench, compiled):
    with pytest.raises(RuntimeError):
        bench.benchmark(1, 2, 2, device="cpu" if HAVE_TRITON else "cuda", colour=compiled)


# ---------------------------------------------------------------------------------------------
# CUDA only (skipped here)
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_CUDA and HAVE_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt_id)
def test_cuda_matches_reference(dtype, compiled):
    for t, h, w in SIZES + [(12, 480, 832), (2, 720, 1280)]:
        rgb = make_rgb(t, h, w, dtype).cuda()
        for matrix in MATRICES:
            assert max_code_diff(compiled.rgb_to_yuv420p(rgb, matrix), colour.rgb_to_yuv420p_reference(rgb, matrix)) <= 1
            assert max_code_diff(compiled.rgb_to_nv12(rgb, matrix), colour.rgb_to_nv12_reference(rgb, matrix)) <= 1
            yuv = colour.rgb_to_yuv420p_reference(rgb, matrix)
            got = compiled.yuv420p_to_rgb(yuv, matrix, dtype)
            want = colour.yuv420p_to_rgb_reference(yuv, matrix, dtype)
            tol = 1 if dtype == torch.uint8 else 2.0 ** -7
            assert (got.float() - want.float()).abs().max().item() <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_CUDA and HAVE_TRITON), reason="needs CUDA and triton")
def test_cuda_graph_capture_with_out(compiled):
    rgb = make_rgb(2, 64, 96, torch.bfloat16).cuda()
    out = torch.empty(2, 96, 96, dtype=torch.uint8, device="cuda")
    compiled.rgb_to_yuv420p(rgb, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        compiled.rgb_to_yuv420p(rgb, out=out)
    rgb.copy_(make_rgb(2, 64, 96, torch.bfloat16, seed=1).cuda())
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert max_code_diff(out, colour.rgb_to_yuv420p_reference(rgb)) <= 1
