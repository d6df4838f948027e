"""Wan model families as nodes: the shipped graphs validate, the tiny graph streams with the right frame counts,
compiled equals eager with no recompiles, phases are bounded, weights errors name the path, UMT5 (our model; against
transformers' where installed)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reactor_graph.compile import CompiledHotPath
from reactor_graph.errors import GraphError, NodeError
from reactor_graph.loop import Engine
from reactor_graph.plan import build_plan, load_plan
from reactor_graph.spec import load_spec

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"
TINY = (GRAPHS / "wan_tiny.yaml").read_text()


def tiny_text(**replace: str) -> str:
    text = TINY
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def run(engine: Engine, blocks: int, change_at: int | None = None) -> list[np.ndarray]:
    out = []

    def on_block(b):
        out.append(b.video().astype(np.int16))
        if b.index == change_at:
            engine.submit("set_prompt", {"prompt": "a blue square moving right"})

    res = engine.run_session(on_block, max_blocks=blocks)
    assert res.ok, res.error
    return out


def test_shipped_graphs_validate_with_bounded_phases():
    sf = load_plan(GRAPHS / "self_forcing.yaml")
    assert list(sf.on_change) == ["text"] and list(sf.hot) == ["noise", "dit", "decode", "out"]
    assert sf.nodes["dit"].num_phases() == 8 and sf.nodes["decode"].num_phases() == 2
    assert len(Engine(sf, device="cpu").phase_keys()) == 8  # 7 filling blocks + 1 rolling: 8 captured graphs
    ll = load_plan(GRAPHS / "longlive.yaml")  # 4 filling + rolling, and 4 re-cache twins (recache: true)
    assert ll.nodes["dit"].num_phases() == 9 and len(Engine(ll, device="cpu").phase_keys()) == 9
    tiny = load_plan(GRAPHS / "wan_tiny.yaml")
    assert len(Engine(tiny, device="cpu").phase_keys()) == 4


def test_shape_mismatch_between_size_and_latents_is_reported(write_graph):
    text = (GRAPHS / "self_forcing.yaml").read_text().replace("size: [480, 832]", "size: [512, 512]")
    with pytest.raises(GraphError) as err:
        load_plan(write_graph(text))
    assert "decode" in str(err.value) and "latents" in str(err.value)


def test_phases_bounded_and_non_rolling_cache_is_finite(write_graph):
    dit = load_plan(GRAPHS / "self_forcing.yaml").nodes["dit"]
    assert {dit.phase_for_block(b) for b in range(200)} == set(range(8)) and dit.max_blocks() is None
    plan = load_plan(write_graph(tiny_text(**{"rolling: true": "rolling: false"})))
    dit, dec = plan.nodes["dit"], plan.nodes["decode"]
    assert dit.num_phases() == 3 and dit.max_blocks() == 3
    assert [dit.phase_for_block(b) for b in range(5)] == [0, 1, 2, 2, 2]
    assert [dec.phase_for_block(b) for b in range(3)] == [0, 1, 1]
    engine = Engine(plan, device="cpu").load()
    assert [b.shape[0] for b in run(engine, 4)] == [9, 12, 12, 9]  # after 3 blocks the sequence restarts


@pytest.mark.parametrize("decoder", ["taehv", "wan_vae"])
def test_tiny_graph_streams_with_first_block_shorter(write_graph, decoder):
    text = TINY if decoder == "taehv" else tiny_text(**{
        "type: taehv_decoder\n    params: {channels: [16, 8, 8, 8], weights: random}":
        "type: wan_vae_decoder\n    params: {dim: 4, weights: random}"})
    engine = Engine(load_plan(write_graph(text)), device="cpu").load()
    n = 4 if decoder == "taehv" else 2  # block 3 runs the rolling phase (3 cached blocks, a 3-frame sink)
    blocks = run(engine, n)
    assert [b.shape for b in blocks] == [(9, 96, 64)] + [(12, 96, 64)] * (n - 1)  # yuv420p [T, H*3/2, W]
    assert engine.stats.frames == 9 + (n - 1) * 12
    if decoder == "taehv":
        again = run(engine, 2)  # a new session starts from phase 0 again: the same frames
        assert np.array_equal(again[0], blocks[0]) and np.array_equal(again[1], blocks[1])


@pytest.mark.slow  # compiles the tiny DiT's regions and whole hot path
def test_compiled_equals_eager_without_recompiles_across_a_prompt_change(write_graph):
    # phases: 2 filling + rolling; the roll keeps 1 sink frame and moves 2 (a chunk shorter than a block)
    old, new = "max_frames: 9,\n             sink_frames: 3", "max_frames: 6,\n             sink_frames: 1"
    path = write_graph(tiny_text(**{old: new}))
    eager = run(Engine(load_plan(path), device="cpu").load(), 4, change_at=1)
    engine = Engine(load_plan(path), device="cpu", compile="compile", compile_backend="aot_eager").load()
    ex, dit = engine.executor, engine.nodes["dit"]
    assert isinstance(ex, CompiledHotPath) and ex.prologue == [] and "noise" in ex.captured and len(ex.states) == 3
    at_start, regions = dict(ex.compiles), dit.region_compiles
    assert regions == 2  # qkv, finish: once each for all layers and all phases (the roll is plain copies)
    compiled = run(engine, 4, change_at=1)  # blocks 2 and 3 roll the cache
    assert ex.recompiles == 0 and ex.compiles == at_start and dit.region_compiles == regions
    for a, b in zip(eager, compiled, strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1


def _log_recaches(engine) -> list[bool]:
    gen, log = engine.nodes["dit"].gen, []
    plain = gen.generate_block

    def logged(*args, recache=False, **kw):
        log.append(recache)
        return plain(*args, recache=recache, **kw)

    gen.generate_block = logged
    return log


@pytest.mark.slow  # compiles the tiny DiT's regions and whole hot path
def test_prompt_switch_recache_runs_once_in_its_block_compiled_as_eager(write_graph):
    path = write_graph(tiny_text(**{"rolling: true": "rolling: true, recache: true"}))
    plan = load_plan(path)
    dit = plan.nodes["dit"]
    assert dit.num_phases() == 7  # 3 filling + rolling, and a re-cache twin of each phase with a cache
    assert [dit.phase_on_change(p, frozenset({"cond"})) for p in range(4)] == [0, 4, 5, 6]
    assert dit.phase_on_change(2, frozenset({"noise"})) == 2
    eager_engine = Engine(plan, device="cpu").load()
    log = _log_recaches(eager_engine)
    eager = run(eager_engine, 5, change_at=2)  # submitted after block 2: lands at block 3 (rolling)
    assert log == [False, False, False, True, False]
    assert run(eager_engine, 2) and log[5:] == [False, False]  # a new session: its first prompt is no switch
    engine = Engine(load_plan(path), device="cpu", compile="compile", compile_backend="aot_eager").load()
    assert len(engine.executor.states) == 7 and engine.nodes["dit"].region_compiles == 2
    log = _log_recaches(engine)
    compiled = run(engine, 5, change_at=2)
    assert log == [False, False, False, True, False] and engine.executor.recompiles == 0
    for a, b in zip(eager, compiled, strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1
    plain = run(Engine(load_plan(write_graph(TINY)), device="cpu").load(), 5, change_at=2)
    assert np.array_equal(plain[3], eager[3]) is False and np.array_equal(plain[2], eager[2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cudagraph_matches_eager_on_gpu(write_graph):
    path = write_graph(TINY)
    eager = run(Engine(load_plan(path), device="cuda", dtype="float32", compile="eager").load(), 5, change_at=1)
    engine = Engine(load_plan(path), device="cuda", dtype="float32", compile="cudagraph").load()
    ex = engine.executor
    assert len(ex.graphs) == 4 and engine.nodes["dit"].region_compiles == 2
    graphed = run(engine, 5, change_at=1)
    assert ex.recompiles == 0 and ex.replays == 5 and engine.nodes["dit"].region_compiles == 2
    for a, b in zip(eager, graphed, strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() <= 4 and np.abs(a - b).mean() < 0.5


def test_node_output_is_the_models_block_with_per_step_noise():
    from reactor_graph.models.wan_dit import BlockCausalWan, FlowMatchSchedule, KVCache

    plan = load_plan(GRAPHS / "wan_tiny.yaml")
    node = plan.nodes["dit"]
    node.load(torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(8, 32, generator=g)
    noise = [torch.randn(16, 12, 8, 8, generator=g) for _ in range(4)]
    cache = KVCache(node.cfg, batch_size=1, latent_hw=(8, 8), max_frames=9, frames_per_block=3, sink_frames=3,
                    dtype=torch.float32)
    ref = BlockCausalWan(node.model, cache, FlowMatchSchedule((1000.0, 750.0, 500.0, 250.0)))
    node.reset()
    with torch.inference_mode():
        for b in range(4):
            node.phase = node.phase_for_block(b)
            got = node.forward(cond, noise[b])["latents"].clone()
            steps = torch.stack(noise[b].split(3, dim=1))[:, None]  # [S, 1, C, T, h, w]
            want = ref.generate_block(steps, cond[None], ref.phase_for_block(b))[0]
            assert torch.allclose(got, want, atol=1e-5), (b, (got - want).abs().max())


@pytest.mark.parametrize("node_type,params", [
    ("wan_causal_dit", "{config: tiny, latent_size: [8, 8], max_frames: 9, weights: missing/dit.pt}"),
    ("taehv_decoder", "{weights: missing/taew2_1.pth}"),
    ("wan_vae_decoder", "{weights: missing/Wan2.1_VAE.pth}"),
])
def test_missing_weights_file_fails_load_naming_the_path(write_graph, tmp_path, node_type, params):
    old = {"wan_causal_dit": "{config: tiny, weights: random, frames_per_block: 3, latent_size: [8, 8], steps: 4, "
                             "max_frames: 9,\n             sink_frames: 3, rolling: true}",
           "taehv_decoder": "{channels: [16, 8, 8, 8], weights: random}",
           "wan_vae_decoder": "{channels: [16, 8, 8, 8], weights: random}"}[node_type]
    text = tiny_text(**{old: params}) if node_type != "wan_vae_decoder" else tiny_text(**{
        "type: taehv_decoder\n    params: {channels: [16, 8, 8, 8], weights: random}":
        f"type: wan_vae_decoder\n    params: {params}"})
    with pytest.raises(GraphError) as err:  # validation finds the missing file, at its line
        load_plan(write_graph(text))
    msg = str(err.value)
    assert str(tmp_path / "missing") in msg and "does not exist" in msg and "weights: random" in msg
    assert "graph.yaml:" in msg and "params.weights" in msg


def test_random_weights_override(write_graph):
    from reactor_graph.weights import use_random_weights

    text = tiny_text(**{"params: {dim: 32, max_tokens: 8, heads: 2}":
                        "params: {dim: 32, max_tokens: 8, heads: 2, weights: te.safetensors}",
                        "{channels: [16, 8, 8, 8], weights: random}": "{channels: [16, 8, 8, 8], weights: x.pth}"})
    ls = load_spec(write_graph(text))
    assert sorted(use_random_weights(ls)) == ["decode", "dit", "text"]
    assert ls.spec.nodes["decode"].params["weights"] == "random" and "weights" not in ls.spec.nodes["text"].params
    build_plan(ls)


def test_cross_attention_kv_is_a_small_part_of_a_block():
    from reactor_graph.nodes.wan_causal_dit import block_flops

    f = block_flops("tiny", (8, 8), 3, 9, 4)
    assert 0 < f["cross_kv"] < 0.05 * f["block_fill0@0"] < f["block_rolling@6"]


# ------------------------------------------------------------------------------------------------ UMT5
UMT5_TEXT = "type: umt5_encoder\n    params: {config: tiny, max_tokens: 8}"
TINY_TEXT_ENCODER = ("type: text_encoder      # `{type: umt5_encoder, params: {config: tiny, max_tokens: 8}}`\n"
                     "    params: {dim: 32, max_tokens: 8, heads: 2}")


def test_umt5_graph_loads_and_runs_without_transformers(write_graph, monkeypatch):
    """Our own UMT5 model: with the built-in word tokenizer the node needs no `transformers` at all."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    plan = load_plan(write_graph(tiny_text(**{TINY_TEXT_ENCODER: UMT5_TEXT})))
    assert plan.nodes["text"].ports()[1]["embeds"].shape == (8, 32)
    engine = Engine(plan, device="cpu").load()
    enc = engine.nodes["text"]
    a, b = enc.forward("a red circle")["embeds"], enc.forward("a blue square moving right")["embeds"]
    assert a.shape == (8, 32) and torch.isfinite(a).all()
    assert a[:3].abs().sum(-1).min() > 0 and a[3:].abs().sum() == 0  # zero after the prompt's 3 tokens
    assert not torch.allclose(a[:3], b[:3])
    assert torch.isfinite(enc.forward("")["embeds"]).all()  # every key masked: still no NaN
    blocks = run(engine, 2, change_at=0)
    assert [x.shape[0] for x in blocks] == [9, 12] and engine.stats.on_change_runs["text"] == 2


def test_umt5_tokenizer_folder_without_transformers_says_how(tmp_path, monkeypatch):
    from reactor_graph.node import GraphInfo
    from reactor_graph.nodes.umt5_encoder import UMT5Encoder

    monkeypatch.setitem(sys.modules, "transformers", None)
    (tmp_path / "tok").mkdir()
    node = UMT5Encoder("t", UMT5Encoder.Params(config="tiny", max_tokens=8, tokenizer="tok"),
                       GraphInfo(64, 64, 16, root=tmp_path))
    with pytest.raises(RuntimeError) as err:
        node.load(torch.device("cpu"), torch.float32)
    assert "tokenizer" in str(err.value) and "pip install 'transformers" in str(err.value)


def test_umt5_import_and_tiny_load_import_neither_transformers_nor_dynamo():
    """Each costs seconds of every start (transformers pulls in FSDP, sympy and Dynamo)."""
    import subprocess

    code = ("import sys, torch\n"
            "import reactor_graph.nodes.umt5_encoder as m\n"
            "from reactor_graph.node import GraphInfo\n"
            "node = m.UMT5Encoder('t', m.UMT5Encoder.Params(config='tiny', max_tokens=8), GraphInfo(64, 64, 16))\n"
            "node.load(torch.device('cpu'), torch.float32)\n"
            "assert node.forward('a red circle')['embeds'].shape == (8, 32)\n"
            "print(sorted(n for n in ('transformers', 'torch._dynamo') if n in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_umt5_model_masks_padding_and_buckets_as_t5():
    from reactor_graph.models.umt5 import UMT5Config, UMT5EncoderModel, relative_position_buckets
    from reactor_graph.nodes.umt5_encoder import PRESETS, init_random_t5_

    # key - query distance -> bucket, UMT5-XXL's 32 buckets / 128: 16 a side, 8 exact, log-spaced to 128
    b = relative_position_buckets(300, 32, 128)  # [L_q, L_k]
    assert [b[0, 0], b[1, 0], b[7, 0], b[8, 0], b[16, 0], b[127, 0], b[299, 0]] == [0, 1, 7, 8, 10, 15, 15]
    assert [b[0, 1], b[0, 7], b[0, 8], b[0, 299]] == [17, 23, 24, 31]
    cfg = UMT5Config.from_dict(PRESETS["tiny"])
    model = UMT5EncoderModel(cfg).eval()
    init_random_t5_(model, cfg, 0)
    biases = [blk.layer[0].SelfAttention.relative_attention_bias.weight for blk in model.encoder.block]
    assert len(biases) == 2 and not torch.equal(*biases)  # one table per layer (T5 would share layer 0's)
    ids = torch.randint(1, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.zeros(1, 20, dtype=torch.long)], 1)  # [1, 25]
    mask = (padded != 0).long()
    with torch.no_grad():
        alone, with_pad, unmasked = model(ids), model(padded, mask), model(padded)
    assert torch.allclose(with_pad[:, :5], alone, atol=1e-5)  # masked padding changes nothing
    assert not torch.allclose(unmasked[:, :5], alone, atol=1e-3)


def test_umt5_matches_transformers(tmp_path):
    """Reference: Hugging Face's UMT5EncoderModel with the same weights, on a padded batch longer than
    max_distance; and a folder HF saved (sharded) loads into the node unchanged."""
    pytest.importorskip("transformers")
    from transformers import UMT5Config as HFConfig
    from transformers import UMT5EncoderModel as HFModel

    from reactor_graph.models.umt5 import UMT5Config, UMT5EncoderModel
    from reactor_graph.node import GraphInfo
    from reactor_graph.nodes.umt5_encoder import PRESETS, UMT5Encoder

    torch.manual_seed(0)
    hf = HFModel(HFConfig(**PRESETS["tiny"], is_encoder_decoder=False, use_cache=False)).eval()
    with torch.no_grad():  # HF's init leaves the biases tiny: make them matter
        for blk in hf.encoder.block:
            blk.layer[0].SelfAttention.relative_attention_bias.weight.normal_(0.0, 1.0)
    ours = UMT5EncoderModel(UMT5Config.from_dict(PRESETS["tiny"])).eval()
    sd = hf.state_dict()
    assert list(ours.state_dict()) == [k for k in sd if k != "encoder.embed_tokens.weight"]  # names and order
    ours.load_state_dict({k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"})
    ids = torch.randint(1, 512, (3, 40))  # [B, L]; tiny's max_distance is 16
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    mask[2, 4:] = 0
    ids = ids * mask
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, D]
        got = ours(ids, mask)
    err = (got - want).abs().max().item()
    assert err < 1e-5, err

    hf.save_pretrained(str(tmp_path / "hf"), max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    node = UMT5Encoder("t", UMT5Encoder.Params(config="hf", weights="hf", max_tokens=8),
                       GraphInfo(64, 64, 16, root=tmp_path))
    node.load(torch.device("cpu"), torch.float32)
    ids, mask = node.tokenize("hello brave new world")
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state[0] * mask[0, :, None]
    assert torch.allclose(node.forward("hello brave new world")["embeds"], want, atol=1e-5)


def test_umt5_loads_hf_and_wan_named_files(tmp_path):
    from safetensors.torch import save_file

    from reactor_graph.node import GraphInfo
    from reactor_graph.nodes.umt5_encoder import _WAN_BLOCK, UMT5Encoder

    info = GraphInfo(64, 64, 16, root=tmp_path)
    src = UMT5Encoder("t", UMT5Encoder.Params(config="tiny", max_tokens=8, seed=3), info)
    src.load(torch.device("cpu"), torch.float32)
    want = src.forward("hello brave new world")["embeds"]
    hf = {k: v.clone() for k, v in src.model.state_dict().items()}
    inverse = {v: k for k, v in _WAN_BLOCK.items()}
    wan = {}
    for k, v in hf.items():
        if k == "shared.weight":
            wan["token_embedding.weight"] = v
        elif k == "encoder.final_layer_norm.weight":
            wan["norm.weight"] = v
        else:
            i, rest = k.removeprefix("encoder.block.").split(".", 1)
            wan[f"blocks.{i}.{inverse[rest]}"] = v
    tied = {**hf, "encoder.embed_tokens.weight": hf["shared.weight"].clone()}  # as HF's state_dict() has it
    only_tied = {k: v for k, v in tied.items() if k != "shared.weight"}
    for name, sd in (("hf.safetensors", hf), ("tied.safetensors", tied), ("only_tied.safetensors", only_tied),
                     ("wan.pth", wan)):
        (save_file(sd, str(tmp_path / name)) if name.endswith("safetensors") else torch.save(sd, tmp_path / name))
        node = UMT5Encoder("t", UMT5Encoder.Params(config="tiny", max_tokens=8, weights=name), info)
        node.load(torch.device("cpu"), torch.float32)
        assert torch.allclose(node.forward("hello brave new world")["embeds"], want, atol=1e-6), name
    save_file({k: v for k, v in hf.items() if "block.1." not in k}, str(tmp_path / "short.safetensors"))
    short = UMT5Encoder("t", UMT5Encoder.Params(config="tiny", max_tokens=8, weights="short.safetensors"), info)
    with pytest.raises(ValueError, match=r"short.safetensors do not fit .*missing keys: encoder\.block\.1\."):
        short.load(torch.device("cpu"), torch.float32)
    bad = UMT5Encoder("t", UMT5Encoder.Params(config="tiny", max_tokens=8, weights="nope.pth"), info)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.pth")):
        bad.load(torch.device("cpu"), torch.float32)


def test_umt5_loads_from_pretrained_folders(tmp_path):
    """HF's save_pretrained layouts, written here without transformers: one model.safetensors, two safetensors
    shards and their index, pytorch_model.bin; the folder's config.json must agree with the node's config."""
    import json

    from safetensors.torch import save_file

    from reactor_graph.node import GraphInfo
    from reactor_graph.nodes.umt5_encoder import PRESETS, UMT5Encoder

    info = GraphInfo(64, 64, 16, root=tmp_path)
    src = UMT5Encoder("t", UMT5Encoder.Params(config="tiny", max_tokens=8, seed=5), info)
    src.load(torch.device("cpu"), torch.float32)
    want = src.forward("hello brave new world")["embeds"]
    sd = {k: v.clone() for k, v in src.model.state_dict().items()}
    keys = list(sd)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}

    def folder(name, config=PRESETS["tiny"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**config, "architectures": ["UMT5EncoderModel"]}))
        return tmp_path / name

    save_file(sd, str(folder("single") / "model.safetensors"))
    sharded = folder("sharded")
    for shard, names in halves.items():
        save_file({k: sd[k] for k in names}, str(sharded / shard))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {k: s for s, names in halves.items() for k in names}}))
    torch.save(sd, folder("bin") / "pytorch_model.bin")
    for name in ("single", "sharded", "bin"):
        node = UMT5Encoder("t", UMT5Encoder.Params(config=name, weights=name, max_tokens=8), info)
        node.load(torch.device("cpu"), torch.float32)
        assert torch.allclose(node.forward("hello brave new world")["embeds"], want, atol=1e-6), name

    (sharded / "model-00002-of-00002.safetensors").unlink()  # a shard the index names is gone
    node = UMT5Encoder("t", UMT5Encoder.Params(config="tiny", weights="sharded", max_tokens=8), info)
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        node.load(torch.device("cpu"), torch.float32)
    other = folder("other", {**PRESETS["tiny"], "relative_attention_max_distance": 64})
    save_file(sd, str(other / "model.safetensors"))  # fits every shape, but the buckets would differ
    node = UMT5Encoder("t", UMT5Encoder.Params(config="tiny", weights="other", max_tokens=8), info)
    with pytest.raises(ValueError, match="relative_attention_max_distance: 64 there, 16 in config 'tiny'"):
        node.load(torch.device("cpu"), torch.float32)
    folder("empty")
    node = UMT5Encoder("t", UMT5Encoder.Params(config="tiny", weights="empty", max_tokens=8), info)
    with pytest.raises(FileNotFoundError, match="holds none of model.safetensors"):
        node.load(torch.device("cpu"), torch.float32)


def test_umt5_refuses_an_ffn_it_does_not_have(tmp_path):
    import json

    from reactor_graph.node import GraphInfo
    from reactor_graph.nodes.umt5_encoder import PRESETS, UMT5Encoder

    (tmp_path / "t5v1.json").write_text(json.dumps({**PRESETS["tiny"], "feed_forward_proj": "relu"}))
    with pytest.raises(ValueError, match="feed_forward_proj is 'relu'"):
        UMT5Encoder("t", UMT5Encoder.Params(config="t5v1.json"), GraphInfo(64, 64, 16, root=tmp_path))


def test_umt5_local_tokenizer_folder(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("ftfy")  # a real tokenizer cleans prompts as Wan does
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from reactor_graph.node import GraphInfo
    from reactor_graph.nodes.umt5_encoder import UMT5Encoder

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "red": 4, "circle": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(tmp_path / "tok"))
    node = UMT5Encoder("t", UMT5Encoder.Params(config="tiny", max_tokens=8, tokenizer="tok"),
                       GraphInfo(64, 64, 16, root=tmp_path))
    node.load(torch.device("cpu"), torch.float32)
    ids, mask = node.tokenize("a   red circle")
    assert ids[0, :3].tolist() == [3, 4, 5] and mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    out = node.forward("a red circle")["embeds"]
    assert out.shape == (8, 32) and out[3:].abs().sum() == 0
    missing = UMT5Encoder("t", UMT5Encoder.Params(config="tiny", tokenizer="nowhere"),
                          GraphInfo(64, 64, 16, root=tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        missing.load(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("raw, want", [
    ("Tom &amp; Jerry", "Tom & Jerry"),
    ("cafÃ©  au\tlait", "café au lait"),
    ("&amp;lt;3 ", "<3"),
    ("&lt;3", "<3"),
])
def test_umt5_prompt_clean_up_as_wan(raw, want):
    """Wan's tokenizer cleans with ftfy.fix_text, html.unescape twice, then whitespace (wan/modules/tokenizers.py)."""
    ftfy = pytest.importorskip("ftfy")
    from reactor_graph.nodes.umt5_encoder import clean_prompt

    assert clean_prompt(raw, ftfy.fix_text) == want


def test_attention_param_resolves_and_fa3_off_hopper_fails_the_load(write_graph):
    plan = load_plan(write_graph(TINY))
    engine = Engine(plan, device="cpu").load()
    dit = engine.nodes["dit"]
    assert dit.params.attention == "auto" and dit.attention_path == "sdpa"  # no Hopper, no FA3 here
    assert dit.set_attention("math") == "math" and dit.attention_path == "math"
    sizes = "latent_size: [8, 8], steps: 4,"
    for choice in ("fa3", "fa3_fp8"):
        text = tiny_text(**{sizes: f"{sizes} attention: {choice},"})
        with pytest.raises(NodeError) as err:
            Engine(load_plan(write_graph(text)), device="cpu").load()
        assert f"attention: {choice}" in str(err.value) and "CUDA" in str(err.value)
    with pytest.raises(GraphError) as err:
        load_plan(write_graph(tiny_text(**{sizes: f"{sizes} attention: sage,"})))
    assert "attention" in str(err.value)


def test_an_fp8_kernel_gets_its_e4m3_cache_copy_at_once_and_another_kernel_drops_it(write_graph, monkeypatch):
    from reactor_graph.models import attention as A

    plan = load_plan(write_graph(TINY))
    engine = Engine(plan, device="cpu").load()
    dit = engine.nodes["dit"]
    assert dit.cache.fp8 is None
    # fa3_fp8 cannot run on a CPU; its torch reference reads the same copy
    monkeypatch.setattr(A, "resolve_attention", lambda choice, device: choice)
    monkeypatch.setattr(A, "make_attention", lambda path, per="head": A.Fp8ReferenceAttention(per))
    dit.set_attention("fa3_fp8")
    assert dit.cache.fp8 is not None and dit.cache.fp8.per == dit.params.fp8_scale
    monkeypatch.undo()
    dit.set_attention("sdpa")
    assert dit.cache.fp8 is None
