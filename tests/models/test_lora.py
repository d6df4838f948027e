"""LoRA: parsing the released formats, the merge against the official (peft) computation, errors that name keys.

The reference is peft's LoRA forward as LongLive runs it (no merge): y = base(x) + (alpha / r) * B(A(x)) on every
nn.Linear of the DiT blocks (LongLive's `configure_lora_for_model`: rank 256, alpha 256), written here in float64.
"""
from __future__ import annotations

import pytest
import torch

from reactor_graph.models.wan_dit import WanDiT, WanConfig, init_random_
from reactor_graph.weights import lora_base, merge_lora_, parse_lora

torch.set_num_threads(2)


def tiny(seed=0) -> WanDiT:
    torch.manual_seed(seed)
    return init_random_(WanDiT(WanConfig.tiny()).eval(), seed)


def block_linears(model) -> list[str]:
    """LongLive's targets: every Linear inside the attention blocks."""
    return [n for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)]


def peft_lora(model, rank=4, seed=1, std=0.05) -> dict[str, torch.Tensor]:
    """A LongLive-style `lora.pt` payload: peft's saved keys (adapter name dropped, `base_model.model.` prefix)."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    sd = {}
    for n in block_linears(model):
        out_f, in_f = mods[n].weight.shape
        sd[f"base_model.model.{n}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * std
        sd[f"base_model.model.{n}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * std
    return sd


def peft_forward_reference(model, sd, alpha, x, t, ctx):
    """The unmerged LoRA forward (peft's LoraLayer): forward hooks add (alpha/r) * B(A(x)) in float64."""
    ref = tiny(0).double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    mods = dict(ref.named_modules())
    hooks = []
    for n in block_linears(ref):
        A = sd[f"base_model.model.{n}.lora_A.weight"].double()
        B = sd[f"base_model.model.{n}.lora_B.weight"].double()
        s = alpha / A.shape[0]
        hooks.append(mods[n].register_forward_hook(
            lambda m, inp, out, A=A, B=B, s=s: out + s * (inp[0].double() @ A.t() @ B.t())))
    try:
        return ref(x.double(), t, ctx.double())
    finally:
        for h in hooks:
            h.remove()


def inputs(cfg):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(1, 16, 2, 4, 6, generator=g), torch.tensor([500.0]),
            torch.randn(1, cfg.text_len, cfg.text_dim, generator=g))


@pytest.mark.parametrize("alpha", [None, 8.0])  # None: alpha = rank (LongLive's 256/256); 8/4: a factor 2
def test_peft_merge_equals_the_unmerged_peft_forward(alpha):
    model = tiny()
    sd = {"generator_lora": peft_lora(model)}  # LongLive's inference.py accepts this wrapper too
    x, t, ctx = inputs(model.cfg)
    want = peft_forward_reference(model, sd["generator_lora"], alpha or 4.0, x, t, ctx)
    before = model(x, t, ctx)
    written = merge_lora_(model, parse_lora(sd), alpha=alpha)
    assert len(written) == len(block_linears(model)) == 2 * 10
    got = model(x, t, ctx)
    err = ((got.double() - want).norm() / want.norm()).item()
    moved = ((before.double() - want).norm() / want.norm()).item()
    assert err < 1e-6 and moved > 1e-2, (err, moved)


def test_wan_kohya_style_with_alpha_underscores_and_diffs():
    model = tiny()
    ref = tiny()
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    diff_b = torch.randn(128, generator=g)
    sd = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": A,
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": B,
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(1.0),  # scale alpha / r = 0.5
        "lora_unet_blocks_1_cross_attn_o.lora_down.weight": A,
        "lora_unet_blocks_1_cross_attn_o.lora_up.weight": B,
        "diffusion_model.blocks.1.ffn.0.diff_b": diff_b,
    }
    merge_lora_(model, parse_lora(sd), scale=2.0)
    p, r = dict(model.named_parameters()), dict(ref.named_parameters())
    torch.testing.assert_close(p["blocks.0.self_attn.q.weight"], r["blocks.0.self_attn.q.weight"] + B @ A)
    torch.testing.assert_close(p["blocks.1.cross_attn.o.weight"], r["blocks.1.cross_attn.o.weight"] + 2 * B @ A)
    torch.testing.assert_close(p["blocks.1.ffn.0.bias"], r["blocks.1.ffn.0.bias"] + 2 * diff_b)
    assert torch.equal(p["blocks.0.self_attn.k.weight"], r["blocks.0.self_attn.k.weight"])


def test_bf16_merge_rounds_once_and_a_base_copy_swaps_back_exactly():
    model = tiny().to(torch.bfloat16)
    lora = parse_lora(peft_lora(model))
    exact = {k: v.double() for k, v in model.state_dict().items()}
    base = lora_base(model, [lora])
    for _ in range(5):  # merge, swap away, merge again: always from the base, never accumulating
        merge_lora_(model, lora, base=base)
        merge_lora_(model, parse_lora(peft_lora(model, seed=9)), base=base)
    merge_lora_(model, lora, base=base)
    w = dict(model.named_parameters())["blocks.0.ffn.2.weight"]
    A = lora["blocks.0.ffn.2"].down.double()
    B = lora["blocks.0.ffn.2"].up.double()
    want = (exact["blocks.0.ffn.2.weight"] + B @ A).to(torch.bfloat16)
    assert torch.equal(w, want)  # the float32 sum rounded to bf16 once
    with torch.no_grad():
        for k, v in base.items():
            dict(model.named_parameters())[k].copy_(v)
    assert all(torch.equal(v.double(), exact[k]) for k, v in model.state_dict().items())


def test_errors_name_the_keys():
    model = tiny()
    sd = peft_lora(model)
    bad = dict(sd)
    bad["base_model.model.blocks.7.self_attn.q.lora_A.weight"] = torch.zeros(4, 64)
    bad["base_model.model.blocks.7.self_attn.q.lora_B.weight"] = torch.zeros(64, 4)
    bad["base_model.model.blocks.0.self_attn.k.lora_B.weight"] = torch.zeros(32, 4)
    with pytest.raises(ValueError) as exc:
        merge_lora_(model, parse_lora(bad), what="LoRA x.pt")
    msg = str(exc.value)
    assert "LoRA x.pt" in msg and "blocks.7.self_attn.q" in msg and "blocks.0.self_attn.k" in msg
    assert "[32, 4]" in msg
    assert torch.equal(model.state_dict()["blocks.0.self_attn.q.weight"], tiny().state_dict()["blocks.0.self_attn.q.weight"])
    lone = {k: v for k, v in sd.items() if not k.endswith("blocks.1.ffn.2.lora_B.weight")}
    with pytest.raises(ValueError, match=r"only one of the two factors: blocks\.1\.ffn\.2"):
        parse_lora(lone)
    with pytest.raises(ValueError, match=r"not LoRA keys.*blocks\.0\.self_attn\.q\.weight"):
        parse_lora({**sd, "blocks.0.self_attn.q.weight": torch.zeros(1)})
