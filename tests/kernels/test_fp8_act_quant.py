"""kernels/fp8_act_quant.py: the fused FP8 activation quantisation kernels against their torch references.

On the CPU the kernels run in Triton's interpreter: a second copy of the module imported with TRITON_INTERPRET=1
(the kernels are decorated at import). Sizes are awkward on purpose: rows and widths that are not multiples of the
blocks, a single row, the FFN's 8960-wide rows (walked in chunks), modulation slices of a [B, F, 6, D] tensor.
"""
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

aq = importlib.import_module("reactor_graph.kernels.fp8_act_quant")

REPO = Path(__file__).resolve().parents[2]
HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_CUDA = torch.cuda.is_available()
FP8 = torch.float8_e4m3fn


def _load_interpreted():
    name = "_fp8_act_quant_interpreted"
    if name in sys.modules:
        return sys.modules[name]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        spec = importlib.util.spec_from_file_location(name, REPO / "kernels" / "fp8_act_quant.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # before exec: triton.jit looks the module up
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    return mod


@pytest.fixture(scope="module")
def interp():
    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    mod = _load_interpreted()
    assert mod.backend_for(torch.zeros(1)) == "triton-interpret"
    return mod


def _dequant(q, s):
    return q.float() * s


def assert_same_quant(got, want, exact_frac=0.999):
    """Two (e4m3, scale) results agree: scales to float32 rounding, almost every code identical (a sum taken in
    another order may move a value across a rounding boundary), and any other code one e4m3 step away."""
    (q, s), (rq, rs) = got, want
    assert q.dtype == FP8 and rq.dtype == FP8
    assert q.shape == rq.shape and s.shape == rs.shape == (*q.shape[:-1], 1)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=0)
    same = (q.view(torch.uint8) == rq.view(torch.uint8)).float().mean().item()
    assert same >= exact_frac, same
    # one e4m3 step is 1/8 of the value's binade at most (and 2^-9 in the subnormals)
    a, b = q.float(), rq.float()
    assert ((a - b).abs() <= torch.maximum(a.abs(), b.abs()) / 8 + 2.0**-9).all()


def _mods(b, f, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(b, f, 6, d, generator=g) * 0.5  # [B, F, 6, D]; shift = m[:, :, 0:1], scale = m[:, :, 1:2]
    return m[:, :, 0:1], m[:, :, 1:2]


# ------------------------------------------------------------------------------------ e4m3 rounding


def test_e4m3_rounding_matches_torch_on_every_code_and_the_ties_between_them(interp):
    codes = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    codes = codes[torch.isfinite(codes)]
    pos = codes[codes >= 0].unique().sort().values  # 0 .. 448
    mids = (pos[1:] + pos[:-1]) / 2  # ties: round to the even code
    near = torch.cat([mids * (1 + 2.0**-20), mids * (1 - 2.0**-20)])
    g = torch.Generator().manual_seed(0)
    rand = (torch.rand(20000, generator=g) * 2 - 1) * 448 * torch.rand(20000, generator=g) ** 6
    v = torch.cat([codes, mids, -mids, near, -near, rand, torch.tensor([2.0**-12, -2.0**-11, 1e-30])])
    v = v.clamp(-448, 448)
    # an amax of 448 makes the kernel's factor exactly 1: what it stores is the rounding of v itself
    y = torch.cat([v, torch.full((1,), 448.0)])[None]  # one row
    q, s = interp.quantize_rows(y)
    assert s.item() == 1.0
    want = y.to(FP8)
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))


# ---------------------------------------------------------------------------------- norm + modulation


@pytest.mark.parametrize("b,n,d,frames", [(1, 6, 64, 3), (2, 15, 96, 5), (1, 7, 1536, 1), (1, 1, 40, 1)])
def test_modulate_quant_matches_the_reference(interp, b, n, d, frames):
    g = torch.Generator().manual_seed(n * d)
    x = torch.randn(b, n, d, generator=g) * 3 + 1
    shift, scale = _mods(b, frames, d, seed=d)
    got = interp.modulate_quant(x, shift, scale, frames)
    want = aq.norm_quant_reference(x, shift=shift, scale=scale, frames=frames)
    assert_same_quant(got, want)


def test_the_reference_is_wans_layernorm_and_modulation():
    from reactor_graph.models.wan_dit import WanLayerNorm, _modulate

    b, n, d, frames = 2, 12, 64, 3
    x = torch.randn(b, n, d) * 2
    shift, scale = _mods(b, frames, d)
    q, s = aq.norm_quant_reference(x, shift=shift, scale=scale, frames=frames)
    h = _modulate(WanLayerNorm(d)(x), shift, scale, frames)
    err = (q.float() * s - h).abs()
    # e4m3 keeps 3 mantissa bits: half a step is 1/16 of a value, or 2^-10 of the row's scale in the subnormals
    assert (err <= h.abs() / 16 + s * 2.0**-10 * 448 * 1.001).all()
    assert (q.float() * s - h).norm() / h.norm() < 0.04


def test_layernorm_quant_affine_matches_the_reference(interp):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 9, 200, generator=g)
    w, bias = torch.randn(200, generator=g).to(torch.bfloat16), torch.randn(200, generator=g).to(torch.bfloat16)
    got = interp.layernorm_quant(x, w, bias)
    want = aq.norm_quant_reference(x, w, bias)
    assert_same_quant(got, want)


def test_modulate_quant_reads_strided_inputs(interp):
    x = torch.randn(1, 8, 128)[:, :, :64]  # row stride 128
    shift, scale = _mods(1, 2, 64)
    assert not x.is_contiguous() and not shift.is_contiguous()
    assert_same_quant(interp.modulate_quant(x, shift, scale, 2),
                      aq.norm_quant_reference(x.contiguous(), shift=shift.contiguous(), scale=scale.contiguous(),
                                              frames=2))


def test_a_zero_row_quantises_to_zero_with_a_finite_scale(interp):
    x = torch.randn(1, 4, 64)
    x[0, 2] = 3.0  # constant row: LayerNorm gives 0
    q, s = interp.layernorm_quant(x)
    assert torch.isfinite(s).all() and (q[0, 2].float() == 0).all()
    y = torch.zeros(3, 50, dtype=torch.bfloat16)
    q, s = interp.quantize_rows(y)
    assert torch.isfinite(s).all() and (q.float() == 0).all()


# ------------------------------------------------------------------------------------------ GELU


@pytest.mark.parametrize("m,n,bias", [(3, 8960, True), (5, 1000, True), (1, 1536, False), (7, 33, True)])
def test_gelu_quant_matches_the_reference(interp, m, n, bias):
    g = torch.Generator().manual_seed(m * n)
    y = (torch.randn(m, n, generator=g) * 2).to(torch.bfloat16)
    b = (torch.randn(n, generator=g) * 0.5).to(torch.bfloat16) if bias else None
    assert_same_quant(interp.gelu_quant(y, b), aq.act_quant_reference(y, b, gelu=True))


def test_gelu_quant_handles_large_and_small_values(interp):
    y = torch.tensor([[-60.0, -10.0, -0.75, -1e-4, 0.0, 1e-4, 3.0, 60.0, 300.0]], dtype=torch.bfloat16)
    q, s = interp.gelu_quant(y)
    want = aq.act_quant_reference(y, gelu=True)
    assert_same_quant((q, s), want, exact_frac=1.0)
    ref = F.gelu(y.float(), approximate="tanh")
    assert torch.isfinite(q.float()).all()
    assert (q.float() * s - ref).abs().max() <= ref.abs().max() / 16


def test_quantize_rows_of_a_3d_attention_output(interp):
    a = torch.randn(2, 11, 4, 16).to(torch.bfloat16).flatten(-2)  # [B, L, H*D]
    got = interp.quantize_rows(a)
    assert got[0].shape == (2, 11, 64) and got[1].shape == (2, 11, 1)
    assert_same_quant(got, aq.quantize_rows_reference(a))


def test_public_functions_fall_back_to_the_reference_on_cpu():
    if aq.backend_for(torch.zeros(1)) != "torch":
        pytest.skip("this process interprets triton kernels")
    x = torch.randn(1, 6, 32)
    shift, scale = _mods(1, 3, 32)
    q, s = aq.modulate_quant(x, shift, scale, 3)
    rq, rs = aq.norm_quant_reference(x, shift=shift, scale=scale, frames=3)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)


def test_bad_inputs_are_refused():
    x = torch.randn(1, 7, 32)
    shift, scale = _mods(1, 3, 32)
    with pytest.raises(ValueError, match="frames"):
        aq.modulate_quant(x, shift, scale, 3)
    with pytest.raises(ValueError, match="bias"):
        aq.gelu_quant(torch.randn(2, 8), torch.randn(9))


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA or not HAVE_TRITON, reason="needs CUDA and triton")
@pytest.mark.parametrize("emulate", [False, True])
def test_gpu_kernels_match_the_reference(emulate):
    dev = "cuda"
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 4680, 1536, generator=g) * 2).to(dev)
    m = torch.randn(1, 3, 6, 1536, generator=g).to(dev) * 0.3
    shift, scale = m[:, :, 0:1], m[:, :, 1:2]
    got = aq._norm_quant_triton(x, None, None, shift, scale, 3, 1e-6, emulate=emulate)
    assert got[0].dtype == FP8
    assert_same_quant(got, aq.norm_quant_reference(x, shift=shift, scale=scale, frames=3), exact_frac=0.995)
    w, b = torch.randn(1536, device=dev).bfloat16(), torch.randn(1536, device=dev).bfloat16()
    assert_same_quant(aq._norm_quant_triton(x, w, b, None, None, 1, 1e-6, emulate=emulate),
                      aq.norm_quant_reference(x, w, b), exact_frac=0.995)
    y = (torch.randn(4680, 8960, generator=g) * 2).to(dev, torch.bfloat16)
    bias = torch.randn(8960, generator=g).to(dev, torch.bfloat16)
    assert_same_quant(aq._act_quant_triton(y, bias, True, emulate=emulate),
                      aq.act_quant_reference(y, bias, gelu=True), exact_frac=0.995)
    assert_same_quant(aq._act_quant_triton(y[:, :1536], None, False, emulate=emulate),
                      aq.quantize_rows_reference(y[:, :1536]), exact_frac=0.995)


# ------------------------------------------------------------------------------ compiled for Hopper


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_kernels_compile_for_sm90_with_vector_loads_and_no_spills():
    """The interpreter runs the kernels' logic; this compiles them for an H100/H200 (CPU-only: Triton's own ptxas)
    with the alignment a real launch specialises on, catching what only the compiler sees (the e4m3 conversion,
    register spills at the FFN's width, loads that do not vectorise)."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if aq._INTERPRET:
        pytest.skip("this process interprets triton kernels")

    def ptx(fn, sig, consts, warps, aligned):
        names = list(sig)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        try:
            return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
        except FileNotFoundError as exc:  # a triton without its bundled ptxas
            pytest.skip(f"cannot compile for sm90 here: {exc}")

    norm = {"x_ptr": "*fp32", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "w_ptr": "*bf16", "b_ptr": "*bf16",
            "sh_ptr": "*fp32", "sc_ptr": "*fp32", "L": "i32", "D": "i32", "tokens_per_frame": "i32", "sx_b": "i32",
            "sx_l": "i32", "sx_d": "constexpr", "ssh_b": "i32", "ssh_f": "i32", "ssh_d": "constexpr", "ssc_b": "i32",
            "ssc_f": "i32", "ssc_d": "constexpr", "eps": "fp32", "HAS_AFFINE": "constexpr", "HAS_MOD": "constexpr",
            "EMULATE": "constexpr", "BLOCK_D": "constexpr"}
    aligned = [n for n, t in norm.items() if t.startswith("*")] + ["L", "D", "sx_b", "sx_l", "ssh_b", "ssh_f",
                                                                 "ssc_b", "ssc_f"]
    for affine, mod in ((False, True), (True, False)):
        code = ptx(aq._norm_quant_kernel, norm, {"HAS_AFFINE": affine, "HAS_MOD": mod, "EMULATE": False,
                                                 "BLOCK_D": 2048, "sx_d": 1, "ssh_d": 1, "ssc_d": 1}, 8, aligned)
        assert "cvt.rn.satfinite.e4m3x2.f32" in code and ".local" not in code
        assert "ld.global.v4" in code
    act = {"y_ptr": "*bf16", "bias_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "N": "i32", "sy_m": "i32",
           "sy_n": "constexpr", "HAS_BIAS": "constexpr", "GELU": "constexpr", "EMULATE": "constexpr",
           "BLOCK_N": "constexpr", "CHUNKS": "constexpr"}
    for emulate in (False, True):
        if emulate:
            act = {**act, "q_ptr": "*fp32"}
        consts = {"HAS_BIAS": True, "GELU": True, "EMULATE": emulate, "BLOCK_N": 1024, "CHUNKS": 9, "sy_n": 1}
        code = ptx(aq._act_quant_kernel, act, consts, 4, ["y_ptr", "bias_ptr", "q_ptr", "s_ptr", "N", "sy_m"])
        assert ".local" not in code and "ld.global.v4" in code
        assert ("cvt.rn.satfinite.e4m3x2.f32" in code) != emulate
        assert re.search(r"ex2\.approx", code)  # the GELU's exp
