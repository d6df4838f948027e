"""The DiT node with LongLive's released layout: a base checkpoint (non-EMA `generator`) plus a peft LoRA, merged
at load; LoRA alternatives swapped in place with no recompile and no recapture."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reactor_graph.errors import NodeError
from reactor_graph.loop import Engine
from reactor_graph.models.wan_dit import WanConfig, WanDiT, init_random_
from reactor_graph.plan import load_plan

from ..models.test_lora import peft_lora

torch.set_num_threads(2)

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
TINY = (GRAPHS / "wan_tiny.yaml").read_text()
DIT = "config: tiny, weights: random"


def write_longlive_files(tmp_path: Path) -> tuple[dict, dict]:
    """longlive_base.pt ({generator, generator_ema} of `model.`-prefixed keys, as the release) and lora.pt /
    lora_b.safetensors; returns the base (non-EMA) state dict and the LoRA."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    gen = init_random_(WanDiT(WanConfig.tiny()), 1).state_dict()
    ema = init_random_(WanDiT(WanConfig.tiny()), 2).state_dict()
    torch.save({"generator": {f"model.{k}": v for k, v in gen.items()},
                "generator_ema": {f"model.{k}": v for k, v in ema.items()}}, tmp_path / "longlive_base.pt")
    model = WanDiT(WanConfig.tiny())
    lora = peft_lora(model, rank=4, seed=5)
    # as LongLive's trainer saves it: the critic's LoRA beside the generator's (only the latter is used)
    torch.save({"generator_lora": lora, "critic_lora": peft_lora(model, rank=3, seed=7)}, tmp_path / "lora.pt")
    save_file({k: v.contiguous() for k, v in peft_lora(model, rank=2, seed=6).items()},
              str(tmp_path / "lora_b.safetensors"))
    return gen, lora


def merged(base: dict, lora: dict) -> dict:
    out = {k: v.clone() for k, v in base.items()}
    for k, a in lora.items():
        if k.endswith("lora_A.weight"):
            name = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = lora[k.replace("lora_A", "lora_B")]
            out[f"{name}.weight"] = out[f"{name}.weight"] + b @ a  # alpha = rank: factor 1
    return out


def test_base_plus_lora_loads_as_the_official_merge(write_graph, tmp_path):
    base, lora = write_longlive_files(tmp_path)
    params = "config: tiny, weights: longlive_base.pt, prefer_ema: false, lora: lora.pt"
    engine = Engine(load_plan(write_graph(TINY.replace(DIT, params))), device="cpu").load()
    got = engine.nodes["dit"].model.state_dict()
    want = merged(base, lora)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    res = engine.run_session(lambda b: None, max_blocks=1)
    assert res.ok, res.error


def test_mismatched_lora_fails_load_naming_keys(write_graph, tmp_path):
    write_longlive_files(tmp_path)
    sd = peft_lora(WanDiT(WanConfig.tiny()), rank=4, seed=5)
    sd["base_model.model.blocks.9.ffn.0.lora_A.weight"] = torch.zeros(4, 64)
    sd["base_model.model.blocks.9.ffn.0.lora_B.weight"] = torch.zeros(128, 4)
    torch.save(sd, tmp_path / "wrong.pt")
    params = "config: tiny, weights: longlive_base.pt, prefer_ema: false, lora: wrong.pt"
    with pytest.raises(NodeError, match=r"blocks\.9\.ffn\.0"):
        Engine(load_plan(write_graph(TINY.replace(DIT, params))), device="cpu").load()
    params = "config: tiny, weights: longlive_base.pt, lora: missing.pt"
    with pytest.raises(NodeError, match="missing.pt"):
        Engine(load_plan(write_graph(TINY.replace(DIT, params))), device="cpu").load()


SWAP = """
  use_b:
    description: the second LoRA, in place
    swap: {dit: dit_b}
  use_a:
    description: back to the node's own LoRA
    swap: {dit: dit}

alternatives:
  dit_b:
    type: wan_causal_dit
    params: {config: tiny, weights: longlive_base.pt, prefer_ema: false, lora: lora_b.safetensors, swap_into: dit,
             frames_per_block: 3, latent_size: [8, 8], steps: 4, max_frames: 9, sink_frames: 3, rolling: true}
    in: {cond: text.embeds, noise: noise.noise}
"""


def swap_graph() -> str:
    text = TINY.replace(DIT, "config: tiny, weights: longlive_base.pt, prefer_ema: false, lora: lora.pt, "
                             "lora_swap: device")
    text = text.replace("\nnodes:\n", SWAP.split("\nalternatives:")[0] + "\n\nnodes:\n")
    return text + "\nalternatives:" + SWAP.split("\nalternatives:")[1]


@pytest.mark.slow  # compiles the tiny hot path (about 20 s on 2 cores)
def test_lora_swap_rewrites_weights_in_place_without_recompiles(write_graph, tmp_path):
    write_longlive_files(tmp_path)
    engine = Engine(load_plan(write_graph(swap_graph())), device="cpu", compile="compile",
                    compile_backend="aot_eager").load()
    dit, ex = engine.nodes["dit"], engine.executor
    at_start, regions = dict(ex.compiles), dit.region_compiles
    ptrs = {k: p.data_ptr() for k, p in dit.model.named_parameters()}
    own = {k: v.clone() for k, v in dit.model.state_dict().items()}
    during = {}

    def on_block(b):
        if b.index == 1:
            engine.submit("use_b")
        if b.index == 2:
            during.update({k: v.clone() for k, v in dit.model.state_dict().items()})
        if b.index == 3:
            engine.submit("use_a")

    res = engine.run_session(on_block, max_blocks=6)
    assert res.ok, res.error
    swaps = engine.stats.swaps
    assert [s["now"] for s in swaps] == ["dit_b", "dit"]
    assert all(s["in_place"] and not s["recaptured"] and s["stall_ms"] >= 0 for s in swaps)
    assert ex.recompiles == 0 and ex.compiles == at_start and dit.region_compiles == regions
    assert engine.nodes["dit"] is dit and {k: p.data_ptr() for k, p in dit.model.named_parameters()} == ptrs
    assert all(torch.equal(v, own[k]) for k, v in dit.model.state_dict().items())  # back exactly
    # while dit_b was in: the weights of a node loaded with that LoRA directly
    direct = Engine(load_plan(write_graph(TINY.replace(DIT, "config: tiny, weights: longlive_base.pt, "
                                                            "prefer_ema: false, lora: lora_b.safetensors"),
                                          "direct.yaml")), device="cpu").load()
    want = direct.nodes["dit"].model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in during.items())
    # a session's swaps end with it: the next session starts from the node's own LoRA
    res = engine.run_session(lambda b: b.index == 0 and engine.submit("use_b"), max_blocks=2)
    assert res.ok and engine.stats.swaps[-2]["now"] == "dit_b" and engine.stats.swaps[-1]["now"] == "dit"
    assert not dit.swapped_in_place and all(torch.equal(v, own[k]) for k, v in dit.model.state_dict().items())
    assert ex.recompiles == 0 and ex.compiles == at_start

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lora_swap_under_cudagraph_replays_the_same_graphs(write_graph, tmp_path):
    write_longlive_files(tmp_path)
    engine = Engine(load_plan(write_graph(swap_graph())), device="cuda", dtype="float32", compile="cudagraph").load()
    ex, dit = engine.executor, engine.nodes["dit"]
    graphs = {k: id(g) for k, g in ex.graphs.items()}
    regions = dit.region_compiles

    def on_block(b):
        if b.index == 1:
            engine.submit("use_b")

    during = {}

    def capture(b):
        on_block(b)
        if b.index == 2:
            during.update({k: v.clone() for k, v in dit.model.state_dict().items()})

    res = engine.run_session(capture, max_blocks=4)
    assert res.ok, res.error
    assert engine.stats.swaps[0]["in_place"] and not engine.stats.swaps[0]["recaptured"]
    assert {k: id(g) for k, g in ex.graphs.items()} == graphs and ex.recompiles == 0 and ex.replays == 4
    assert dit.region_compiles == regions
    # the replayed graphs read the rewritten weights: the same as a node loaded with LoRA b, run eagerly
    direct = Engine(load_plan(write_graph(TINY.replace(DIT, "config: tiny, weights: longlive_base.pt, "
                                                            "prefer_ema: false, lora: lora_b.safetensors"),
                                          "direct.yaml")), device="cuda", dtype="float32", compile="eager").load()
    want = direct.nodes["dit"].model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in during.items())
