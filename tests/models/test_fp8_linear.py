"""reactor_graph/models/fp8_linear.py: FP8 linear layers of the Wan DiT (CPU: the torch reference of the FP8
product; GPU: torch._scaled_mm, the fused quantisation kernels, CUDA-graph capture and inductor)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reactor_graph.models import fp8_linear as fl
from reactor_graph.models.wan_dit import (BlockCausalWan, FlowMatchSchedule, KVCache, WanBlock, WanConfig, WanDiT,
                                          init_random_, rope_tables)

HAVE_CUDA = torch.cuda.is_available()
FP8 = torch.float8_e4m3fn


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _linear(k=96, n=80, bias=True, seed=0, dtype=torch.bfloat16, device="cpu"):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, k ** -0.5)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin.to(device, dtype)


def test_weight_is_quantised_per_output_channel():
    w = torch.randn(40, 64) * torch.linspace(0.01, 10, 40)[:, None]  # channels of very different ranges
    q, s = fl.quantize_weight(w)
    assert q.dtype == FP8 and q.is_contiguous() and s.shape == (1, 40) and s.is_contiguous()
    torch.testing.assert_close(s[0], w.abs().amax(dim=1) / 448)
    assert (q.float().abs().amax(dim=1) == 448).all()  # every channel uses e4m3's full range
    deq = q.float() * s.t()
    assert ((deq - w).abs() <= w.abs() / 16 + s.t() * 2.0**-10 * 448).all()


def test_fp8_linear_is_within_e4m3_error_of_the_bf16_linear():
    lin = _linear()
    x = torch.randn(3, 37, 96).to(torch.bfloat16)
    f8 = fl.Fp8Linear.from_linear(lin)
    y, want = f8(x), F.linear(x.float(), lin.weight.float(), lin.bias.float())
    assert y.shape == (3, 37, 80) and y.dtype == torch.bfloat16
    err = rel(y, want)
    # both operands rounded to 3 mantissa bits (~2-3% each, independent): a few %, and not zero
    assert 0.005 < err < 0.06, err


def test_fp8_linear_computes_the_dequantised_product_exactly_as_documented():
    lin = _linear(k=64, n=48)
    f8 = fl.Fp8Linear.from_linear(lin)
    x = torch.randn(2, 5, 64)
    a8, sa = fl._kernels().quantize_rows_reference(x)
    want = ((a8.float() * sa) @ f8.dequantized_weight().t() + lin.bias.float()).to(torch.bfloat16)
    torch.testing.assert_close(f8(x), want, rtol=1e-2, atol=1e-2)  # bf16 rounding of the same float32 sum
    # a pre-quantised input (what the fused kernels hand over) gives the same as quantising inside
    assert torch.equal(f8(fl.Fp8Act(a8, sa)), f8(x))
    torch.testing.assert_close(f8(x, bias=False) + lin.bias, f8(x), rtol=2e-2, atol=2e-2)  # bias added after


def _tiny(seed=0):
    cfg = WanConfig.tiny()
    with torch.device("meta"):
        model = WanDiT(cfg).to(torch.bfloat16)
    model.to_empty(device="cpu")
    init_random_(model, seed=seed)
    return cfg, model.eval().requires_grad_(False)


def _inputs(cfg, frames=3, hw=(8, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_dim, frames, *hw, generator=g)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(torch.bfloat16)
    return x, torch.tensor([700.0]), ctx


def test_conversion_replaces_the_block_linears_and_restores_them():
    cfg, model = _tiny()
    before = {n: m for n, m in model.named_modules()}
    kept = fl.convert_linears_(model, keep=True)
    assert len(kept) == cfg.num_layers * len(fl.FP8_LINEARS)
    for blk in model.blocks:
        assert all(isinstance(fl._get(blk, p), fl.Fp8Linear) for p in fl.FP8_LINEARS)
        # the text cross-attention k/v (once per prompt) stay bf16
        assert isinstance(blk.cross_attn.k, nn.Linear) and isinstance(blk.cross_attn.v, nn.Linear)
    assert fl.convert_linears_(model) == {}  # already converted: nothing to do
    fl.restore_linears_(model, kept)
    assert all(before[n] is m for n, m in model.named_modules())


def test_tiny_dit_in_fp8_stays_close_to_bf16():
    cfg, model = _tiny()
    x, t, ctx = _inputs(cfg)
    with torch.no_grad():
        want = model(x, t, ctx)
        f8 = copy.deepcopy(model)
        fl.convert_linears_(f8)
        got = f8(x, t, ctx)
    err = rel(got, want)
    assert 1e-4 < err < 0.04, err


@pytest.mark.slow  # four blocks of two models on the CPU
def test_block_causal_stream_in_fp8_stays_close_to_bf16():
    cfg, model = _tiny()
    f8 = copy.deepcopy(model)
    fl.convert_linears_(f8)
    outs = []
    for m in (model, f8):
        cache = KVCache(cfg, batch_size=1, latent_hw=(8, 8), max_frames=6, frames_per_block=3, rolling=True,
                        dtype=torch.bfloat16)
        gen = BlockCausalWan(m, cache, FlowMatchSchedule())
        _, _, ctx = _inputs(cfg)
        res = []
        for i in range(4):  # fill 2 blocks, then roll
            noise = torch.randn(4, 1, cfg.in_dim, 3, 8, 8, generator=torch.Generator().manual_seed(i))
            res.append(gen.generate_block(noise, ctx if i == 0 else None, gen.phase_for_block(i)))
        outs.append(res)
    errs = [rel(b, a) for a, b in zip(*outs)]
    assert max(errs) < 0.05, errs


def test_dynamo_traces_the_fp8_block_pieces_in_one_graph():
    """The regional compile traces WanBlock.qkv and .finish: the quantisation ops must not break the graph."""
    cfg, model = _tiny()
    fl.convert_linears_(model)
    x, t, ctx = _inputs(cfg)
    blk = model.blocks[0]
    grid = model.grid(x)
    with torch.no_grad():
        tok = model.patchify(x)
        cos, sin = rope_tables(cfg, grid[0], grid[1:])
        _, e0 = model.time_embed(t, 1, grid[0])
        m = blk.mods(e0)
        ck, cv = model.cross_kv(ctx)[0]
        torch._dynamo.reset()
        qkv = torch.compile(WanBlock.qkv, backend="eager", fullgraph=True)
        finish = torch.compile(WanBlock.finish, backend="eager", fullgraph=True)
        q, k, v = WanBlock.qkv(blk, tok, m, grid[0], cos, sin)
        for a, b in zip((q, k, v), qkv(blk, tok, m, grid[0], cos, sin)):
            assert torch.equal(a, b)
        a = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                             v.transpose(1, 2)).transpose(1, 2)
        want = WanBlock.finish(blk, tok, a, m, grid[0], ck, cv)
        assert torch.equal(finish(blk, tok, a, m, grid[0], ck, cv), want)


def test_fake_impls_give_the_real_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 12, 64)
        m = torch.empty(2, 3, 6, 64)
        q, s = fl.norm_quant_op(x, None, None, m[:, :, 0:1], m[:, :, 1:2], 3, 1e-6)
        assert q.shape == (2, 12, 64) and q.dtype == FP8 and s.shape == (2, 12, 1) and s.dtype == torch.float32
        q, s = fl.act_quant_op(torch.empty(24, 160, dtype=torch.bfloat16), None, True)
        assert q.shape == (24, 160) and s.shape == (24, 1)


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_scaled_mm_matches_the_reference(bias):
    if fl.fp8_matmul_unavailable("cuda"):
        pytest.skip(fl.fp8_matmul_unavailable("cuda"))
    lin = _linear(k=1536, n=8960, bias=bias, device="cuda")
    f8 = fl.Fp8Linear.from_linear(lin)
    x = torch.randn(1, 4680, 1536, device="cuda")
    act = fl.Fp8Act(*fl._kernels().quantize_rows_reference(x))
    y = f8(act)
    want = fl.fp8_linear_reference(act.data.reshape(-1, 1536), act.scale.reshape(-1, 1), f8.weight8,
                                   f8.weight_scale, f8.bias, torch.bfloat16).view(1, 4680, 8960)
    assert rel(y, want) < 5e-3  # the same e4m3 operands: only accumulation order and bf16 rounding differ
    assert rel(y, F.linear(x, lin.weight.float(), None if lin.bias is None else lin.bias.float())) < 0.06


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs CUDA")
def test_gpu_fp8_dit_is_captured_in_a_cuda_graph():
    """A block of the block-causal generator (static, capture-friendly: `forward_block` on the cache) with FP8
    linears, captured and replayed: the quantisation kernels and the FP8 matmuls are in the graph and replay what
    eager computed. (Inductor over the FP8 regions: bench/gpu/fp8_linears.sh's engine bench compiles them.)"""
    if fl.fp8_matmul_unavailable("cuda"):
        pytest.skip(fl.fp8_matmul_unavailable("cuda"))
    cfg = WanConfig(dim=256, ffn_dim=896, num_heads=2, num_layers=2, text_dim=64, text_len=16, freq_dim=32)
    with torch.device("cuda"):
        model = WanDiT(cfg).to(torch.bfloat16)
    init_random_(model)
    model.eval().requires_grad_(False)
    ref = copy.deepcopy(model)
    fl.convert_linears_(model)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 1, cfg.in_dim, 3, 16, 16, generator=g).cuda()
    ctx = torch.randn(1, 16, 64, generator=g).cuda().bfloat16()
    outs = {}
    with torch.no_grad():
        for name, m in (("bf16", ref), ("fp8", model)):
            cache = KVCache(cfg, batch_size=1, latent_hw=(16, 16), max_frames=6, frames_per_block=3,
                            dtype=torch.bfloat16, device="cuda")
            gen = BlockCausalWan(m, cache, FlowMatchSchedule())
            gen.set_context(ctx)
            phase = gen.phase_for_block(0)  # reads only the slot it writes: every replay computes the same
            outs[name] = gen.generate_block(noise, None, phase).clone()
        gen_out = torch.empty_like(outs["fp8"])
        assert rel(outs["fp8"], outs["bf16"]) < 0.04
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            gen.generate_block(noise, None, phase, out=gen_out)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            gen.generate_block(noise, None, phase, out=gen_out)
        gen_out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(gen_out, outs["fp8"])
