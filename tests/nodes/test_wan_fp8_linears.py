"""The wan_causal_dit node's `linears: bf16 | fp8` param: validated, converts the blocks' linears after the
weights load, streams close to bf16, switches in place for benches, compiles regionally."""
from pathlib import Path

import pytest
import torch

from reactor_graph.errors import GraphError, NodeError
from reactor_graph.loop import Engine
from reactor_graph.plan import load_plan

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
TINY = (GRAPHS / "wan_tiny.yaml").read_text()
DIT = "max_frames: 9,"


def graph(write_graph, extra: str):
    assert DIT in TINY
    return write_graph(TINY.replace(DIT, f"{DIT} {extra}"))


def dit_latents(engine, blocks: int) -> list[torch.Tensor]:
    out = []
    dit = engine.nodes["dit"]

    def on_block(b):
        out.append(dit.out.float().clone())

    res = engine.run_session(on_block, max_blocks=blocks)
    assert res.ok, res.error
    return out


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_a_bad_linears_value_is_refused_naming_the_choices(write_graph):
    with pytest.raises(GraphError) as err:
        load_plan(graph(write_graph, "linears: int8,"))
    msg = str(err.value)
    assert "linears" in msg and "bf16" in msg and "fp8" in msg


def test_fp8_with_an_in_place_lora_swap_is_refused(write_graph):
    with pytest.raises((GraphError, NodeError, ValueError)) as err:
        Engine(load_plan(graph(write_graph, "linears: fp8, lora_swap: device,")), device="cpu").load()
    assert "lora_swap" in str(err.value)


def test_fp8_linears_load_and_stream_close_to_bf16(write_graph):
    from reactor_graph.models.fp8_linear import FP8_LINEARS, Fp8Linear, _get

    bf16 = Engine(load_plan(write_graph(TINY)), device="cpu").load()
    fp8 = Engine(load_plan(graph(write_graph, "linears: fp8,")), device="cpu").load()
    node = fp8.nodes["dit"]
    assert node.linears_path == "fp8" and bf16.nodes["dit"].linears_path == "bf16"
    assert all(isinstance(_get(blk, p), Fp8Linear) for blk in node.model.blocks for p in FP8_LINEARS)
    assert node._bf16_linears == {}  # converted at load: the bf16 layers are freed
    with pytest.raises(ValueError, match="without keeping"):
        node.set_linears("bf16")
    want, got = dit_latents(bf16, 4), dit_latents(fp8, 4)  # 3 filling blocks, then a roll
    errs = [rel(g, w) for g, w in zip(got, want)]
    assert max(errs) < 0.05 and min(errs) > 0, errs


def test_set_linears_switches_in_place_and_back(write_graph):
    engine = Engine(load_plan(write_graph(TINY)), device="cpu").load()
    node = engine.nodes["dit"]
    want = dit_latents(engine, 2)
    with pytest.raises(ValueError, match="not one of"):
        node.set_linears("fp16")
    assert node.set_linears("fp8") == "fp8" and len(node._bf16_linears) > 0
    fp8 = dit_latents(engine, 2)
    assert 0 < rel(fp8[1], want[1]) < 0.05
    assert node.set_linears("bf16") == "bf16"
    again = dit_latents(engine, 2)
    assert all(torch.equal(a, b) for a, b in zip(again, want))


@pytest.mark.slow  # compiles the tiny DiT's regions
def test_fp8_linears_compile_regionally_as_eager(write_graph):
    path = graph(write_graph, "linears: fp8,")
    eager = dit_latents(Engine(load_plan(path), device="cpu").load(), 4)
    engine = Engine(load_plan(path), device="cpu", compile="compile", compile_backend="aot_eager").load()
    assert engine.nodes["dit"].region_compiles == 2
    compiled = dit_latents(engine, 4)
    assert engine.executor.recompiles == 0 and engine.nodes["dit"].region_compiles == 2
    for a, b in zip(eager, compiled, strict=True):
        assert rel(b, a) < 1e-2
