"""Long streams of the demo model, many at once, scored as bench/bench_demo_stream.py scores them: the measure
stage 3 of tools/train_demo.py logs while it trains (and keeps its best weights by), and a quick look at any
weights file without the engine.

The sessions run through train_demo's PoolCache (the node's rolling KV cache, batched; a test checks it is the
node's own inference), so a dozen 20-s streams take seconds on a GPU. Its prompts are NOT the bench's: the
bench stays an independent measurement of what this probe picked.

  python tools/demo_stream_probe.py WEIGHTS [--seconds 20] [--bench-prompts]   # CPU, a minute or two
"""
from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_data as data  # noqa: E402
import frame_analyser as fa  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    """bench/bench_demo_stream.py's scoring (held seconds, blocks to show), loaded by path: bench/ is no package."""
    name = "bench_demo_stream"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "bench_demo_stream.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def probe_sessions(seed: int = 123, prompts: int = 12, switch_streams: int = 2, every_blocks: int = 24):
    """[(kind, [(block, prompt), ...])]: fixed prompts (every shape, size and motion, several colours and
    backgrounds, canonical sentences) and streams that switch one attribute or all every `every_blocks`."""
    rng = random.Random(seed)
    combos = [(s, z, m) for s in data.SHAPES for z in data.SIZE_NAMES for m in data.MOTION_NAMES]
    rng.shuffle(combos)
    out = []
    for shape, size, motion in combos[:prompts]:
        while True:
            a = dict(shape=shape, size=size, motion=motion, colour=rng.choice(data.COLOUR_NAMES),
                     background=rng.choice(data.BG_NAMES))
            if (a["colour"], a["background"]) not in data.CLASHES:
                break
        out.append(("hold", [(0, data.describe(a))]))
    kinds = ["shape", "colour", "motion", "background", "everything", "shape", "size"]
    for _ in range(switch_streams):
        a = data.sample_attrs(1, 1, rng, 0.0)[0][0]
        seq = [(0, data.describe(a))]
        for k, kind in enumerate(kinds):
            while True:
                fresh = data.sample_attrs(1, 1, rng, 0.0)[0][0]
                b = fresh if kind == "everything" else dict(a, **{kind: fresh[kind]})
                if b != a and (b["colour"], b["background"]) not in data.CLASHES:
                    break
            a = b
            seq.append(((k + 1) * every_blocks, data.describe(a)))
        out.append(("switch", seq))
    return out


@torch.no_grad()
def render_streams(text, dit, dec, tok, pool_cls, cfg: dict, sessions, blocks: int, device, seed: int = 0
                   ) -> np.ndarray:
    """uint8 frames [S, blocks * T, H, W, 3] of each session's stream (a prompt switch at block b shows from
    block b on, as the engine applies a set_prompt at the block boundary)."""
    was = text.training, dit.training
    text.eval(), dit.eval()
    s = len(sessions)
    pool = pool_cls(dit, cfg["cache_blocks"], cfg["steps"], cfg["shift"], s, device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    fpb = cfg["dit"]["frames"]
    out = []
    ids = None
    on_gpu = torch.device(device).type == "cuda"  # bf16 there, as training runs
    for k in range(blocks):
        now = [[p for b, p in seq if b <= k][-1] for _, seq in sessions]
        if ids is None or any(any(b == k for b, _ in seq) for _, seq in sessions):
            ids = torch.stack([tok(p) for p in now]).to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
                emb = text(ids)
        pool.begin_block()
        noise = torch.randn(s, dit.channels, fpb, *dit.size, generator=gen).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
            x = pool.denoise(noise, emb)[-1]
            pool.write(x, emb)
            frames = dec(x.transpose(1, 2).flatten(0, 1)).float()  # [S*T, 3, H, W]
        out.append(data.to_uint8(frames).reshape(s, fpb, frames.shape[2], frames.shape[3], 3))
    text.train(was[0]), dit.train(was[1])
    return np.concatenate(out, axis=1)


def score(frames: np.ndarray, sessions, device=None) -> dict:
    """Per session: seconds held (bench rule), blank frames; per switch: blocks until it shows (None: not
    within the segment). `score` is the mean held share, less the share of switches missed or later than 4.
    With a CUDA `device` the frames are read there (frame_analyser.analyse_batch; on a CPU the per-frame
    reader is quicker)."""
    bench = _bench()
    fpb, fps = bench.FPB, bench.FPS
    rows, shows, blank, total = [], [], 0, 0
    if device is not None and torch.device(device).type == "cuda":
        flat = fa.analyse_batch(frames.reshape(-1, *frames.shape[2:]), device=device)
        per = frames.shape[1]
        readings = [flat[i * per:(i + 1) * per] for i in range(len(frames))]
    else:
        readings = [[fa.analyse(f) for f in fr] for fr in frames]
    for (kind, seq), got in zip(sessions, readings):
        blank += sum(f.blank for f in got)
        total += len(got)
        held = []
        for i, (b, prompt) in enumerate(seq):
            end = seq[i + 1][0] if i + 1 < len(seq) else len(got) // fpb
            attrs = data.parse_prompt(prompt)
            skip = fps if kind == "switch" else 0  # a switch's own first second is for following, not holding
            held += bench.seconds_held(got[b * fpb + skip:end * fpb], attrs)
            if i > 0:
                old = data.parse_prompt(seq[i - 1][1])
                changed = [f for f in data.FIELDS if attrs[f] != old[f]]
                shows.append(bench.blocks_to_show(got, b - 1, attrs, changed, end - b))
        rows.append({"kind": kind, "prompt": seq[0][1], "held": float(np.mean(held)) if held else 0.0,
                     "blank": float(np.mean([f.blank for f in got]))})
    late = sum(n is None or n > 4 for n in shows)
    held = float(np.mean([r["held"] for r in rows]))
    return {"score": held - late / max(len(shows), 1), "held": held,
            "held_min": float(min(r["held"] for r in rows)), "blank_share": blank / max(total, 1),
            "switch_blocks": shows, "switches_late": late, "sessions": rows}


def main() -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", type=Path)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--bench-prompts", action="store_true", help="the bench's prompts and switches instead")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--graph", type=Path, default=ROOT / "graphs" / "demo.yaml",
                    help="the graph the weights go with (its sizes and node params)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    import train_demo as td
    from safetensors.torch import load_file

    from reactor_graph.nodes.text_encoder import WordTokenizer

    cfg = td.graph_config(args.graph)
    text, dit, dec = td.build_models(cfg)
    sd = load_file(str(args.weights))
    for prefix, m in (("text.", text), ("dit.", dit), ("decoder.", dec)):
        m.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    dec.eval()
    tok = WordTokenizer(cfg["text"]["vocab_size"], cfg["text"]["max_tokens"])
    if args.bench_prompts:
        bench = _bench()
        per = 5 * bench.FPS // bench.FPB
        sessions = [("hold", [(0, p)]) for p in bench.PROMPTS]
        sessions.append(("switch", [(k * per, p) for k, (_, p) in enumerate(bench.SWITCHES)]))
    else:
        sessions = probe_sessions()
    blocks = args.seconds * 16 // cfg["dit"]["frames"]
    frames = render_streams(text, dit, dec, tok, td.PoolCache, cfg, sessions, blocks, "cpu")
    res = score(frames, sessions)
    for r in res["sessions"]:
        print(f"{r['held'] * 100:5.1f}% held  blank {r['blank'] * 100:4.1f}%  {r['kind']:6s} {r['prompt']}")
    print(f"score {res['score']:.3f} held {res['held']:.3f} (min {res['held_min']:.3f}) blank "
          f"{res['blank_share'] * 100:.2f}% switches {res['switch_blocks']}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
