"""The demo's procedural data set: short clips of one coloured shape moving on a plain background, with the
sentence that describes them. Made on the fly with torch, batched (fast on a GPU, fine on a CPU).

A clip is `blocks` blocks of `frames_per_block` frames. Every block has its own attributes (colour, shape,
size, motion, background), and so its own prompt: most clips keep one description throughout, some switch
at a block boundary (what a prompt change in the demo asks for). The shape's position carries over a switch;
it moves at a constant speed and wraps around the frame edges (the frame is a torus), so motion goes on for
ever and the demo can stream without end.

Also here: `parse_prompt` (words -> attributes, the inverse of `describe`) and the measures the tests and the
training script's evaluation apply to frames (background and shape colours, circular centroid, fill ratio).
"""
from __future__ import annotations

import math
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# -- the vocabulary ------------------------------------------------------------------------------------------
# Canonical names first; the values are RGB in [0, 1].
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.15, 0.35, 1.00),
    "yellow": (0.98, 0.88, 0.10),
    "white": (0.96, 0.96, 0.96),
    "purple": (0.60, 0.20, 0.88),
    "orange": (1.00, 0.50, 0.05),
    "cyan": (0.10, 0.85, 0.90),
    "pink": (1.00, 0.45, 0.72),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.02, 0.02, 0.02),
    "dark blue": (0.04, 0.07, 0.32),
    "grey": (0.42, 0.42, 0.42),
    "green": (0.08, 0.36, 0.12),
    "white": (0.92, 0.92, 0.92),
}
SHAPES = ["circle", "square", "triangle"]
SIZES = {"small": 9.0, "medium": 15.0, "big": 23.0}  # the shape's radius in pixels at 128x128
MOTIONS = {"still": (0.0, 0.0), "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPEED = 3.0  # pixels per frame at 128 px (48 px/s at 16 fps), scaled with the frame width

# What an omitted attribute means: "a red circle" is a medium red circle, still, on black.
DEFAULTS = {"colour": "white", "size": "medium", "motion": "still", "background": "black"}
# Shape colours that would vanish into a background of the same colour.
CLASHES = {("green", "green"), ("white", "white")}

SYNONYMS = {  # word -> (attribute, canonical value)
    "red": ("colour", "red"), "green": ("colour", "green"), "blue": ("colour", "blue"),
    "yellow": ("colour", "yellow"), "white": ("colour", "white"), "purple": ("colour", "purple"),
    "violet": ("colour", "purple"), "orange": ("colour", "orange"), "cyan": ("colour", "cyan"),
    "pink": ("colour", "pink"),
    "circle": ("shape", "circle"), "ball": ("shape", "circle"), "disc": ("shape", "circle"),
    "square": ("shape", "square"), "box": ("shape", "square"), "triangle": ("shape", "triangle"),
    "small": ("size", "small"), "little": ("size", "small"), "tiny": ("size", "small"),
    "medium": ("size", "medium"), "big": ("size", "big"), "large": ("size", "big"), "huge": ("size", "big"),
    "left": ("motion", "left"), "right": ("motion", "right"), "up": ("motion", "up"), "down": ("motion", "down"),
    "still": ("motion", "still"), "static": ("motion", "still"),
}
BG_WORDS = {"black": "black", "navy": "dark blue", "grey": "grey", "gray": "grey", "green": "green",
            "white": "white", "blue": "dark blue"}  # after "on": "on a dark blue background"
# Every word the prompts use, so a test can check the tokenizer gives each its own id.
FILLER = ["a", "an", "the", "moving", "going", "to", "that", "moves", "standing", "not", "on", "background",
          "dark", "is"]
VOCABULARY = sorted(set(SYNONYMS) | set(BG_WORDS) | set(FILLER))

COLOUR_NAMES, BG_NAMES, SIZE_NAMES, MOTION_NAMES = list(COLOURS), list(BACKGROUNDS), list(SIZES), list(MOTIONS)
FIELDS = ("colour", "shape", "size", "motion", "background")
NAMES = {"colour": COLOUR_NAMES, "shape": SHAPES, "size": SIZE_NAMES, "motion": MOTION_NAMES,
         "background": BG_NAMES}


# -- prompts ---------------------------------------------------------------------------------------------
def describe(attrs: dict[str, str], rng: random.Random | None = None) -> str:
    """A sentence for these attributes. With `rng`, phrasing varies (synonyms, omitted defaults, word order,
    unrelated words) the way a newcomer's prompts would; without it, the one canonical sentence."""
    a = attrs
    if rng is None:
        size = "" if a["size"] == "medium" else a["size"] + " "
        motion = "" if a["motion"] == "still" else f" moving {a['motion']}"
        return f"a {size}{a['colour']} {a['shape']}{motion} on a {a['background']} background"

    def pick(canonical: str, field: str) -> str:
        words = [w for w, (f, v) in SYNONYMS.items() if f == field and v == canonical]
        return canonical if rng.random() < 0.7 else rng.choice(words)

    parts = [rng.choice(["a", "a", "an", "the", ""])]
    if a["size"] != DEFAULTS["size"] or rng.random() < 0.1:
        parts.append(pick(a["size"], "size"))
    if a["colour"] != DEFAULTS["colour"] or rng.random() < 0.8:
        parts.append(pick(a["colour"], "colour"))
    parts.append(pick(a["shape"], "shape"))
    if a["motion"] == "still":
        motion = rng.choice(["", "", "", "still", "standing still", "not moving", "static"])
    else:
        forms = ["moving {}", "moving {}", "going {}", "that moves {}"]
        if a["motion"] in ("left", "right"):
            forms.append("moving to the {}")
        motion = rng.choice(forms).format(a["motion"])
    bg = a["background"]
    if bg != DEFAULTS["background"] or rng.random() < 0.7:
        name = {"grey": rng.choice(["grey", "gray"]), "dark blue": rng.choice(["dark blue", "dark blue", "navy"])
                }.get(bg, bg)
        where = rng.choice([f"on a {name} background", f"on a {name} background", f"on {name}"])
    else:
        where = ""
    if rng.random() < 0.2:
        parts += [where, motion]
    else:
        parts += [motion, where]
    words = " ".join(p for p in parts if p).split()
    if rng.random() < 0.15:  # a word the model never learnt must not change what it draws
        words.insert(rng.choice([0, len(words)]), random_word(rng))
    return " ".join(words)


def random_word(rng: random.Random) -> str:
    while True:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
        if w not in VOCABULARY:
            return w


def parse_prompt(text: str) -> dict[str, str]:
    """The attributes a prompt names (omitted ones take DEFAULTS). `describe`'s inverse on its own sentences."""
    words = re.findall(r"[a-z]+", text.lower())
    out = dict(DEFAULTS, shape="circle")
    if "on" in words:  # "on a dark blue background", "on navy"; what follows the phrase is read as usual
        i = words.index("on")
        j = i + 1
        while j < len(words) and words[j] in ("a", "an", "the", "dark"):
            j += 1
        if j < len(words) and words[j] in BG_WORDS:
            out["background"] = "dark blue" if words[j - 1] == "dark" else BG_WORDS[words[j]]
            j += 1
        if j < len(words) and words[j] == "background":
            j += 1
        words = words[:i] + words[j:]
    for w in words:
        if w in SYNONYMS:
            field, value = SYNONYMS[w]
            out[field] = value
    return out


def token_id(word: str, vocab_size: int) -> int:
    """The id nodes/text_encoder.py's WordTokenizer gives a word."""
    return 1 + zlib.crc32(word.encode()) % (vocab_size - 1)


# -- sampling attributes ---------------------------------------------------------------------------------------
def sample_attrs(batch: int, blocks: int, rng: random.Random, switch_prob: float = 0.3,
                 shape_only: float = 0.0) -> list[list[dict]]:
    """[batch][blocks] attribute dicts. A clip keeps its attributes, or (with `switch_prob`) changes some of
    them at one block boundary, as a prompt change would; `shape_only` of those switches change the shape
    alone (the change a model that copies its context misses)."""
    def one() -> dict[str, str]:
        while True:
            a = {f: rng.choice(NAMES[f]) for f in FIELDS}
            if rng.random() < 0.15:
                a["motion"] = "still"
            if (a["colour"], a["background"]) not in CLASHES:
                return a

    clips = []
    for _ in range(batch):
        a = one()
        seq = [a] * blocks
        if blocks > 1 and rng.random() < switch_prob:
            at = rng.randrange(1, blocks)
            if shape_only > 0 and rng.random() < shape_only:  # (no extra draw without: old streams stay)
                b = dict(a, shape=rng.choice([v for v in NAMES["shape"] if v != a["shape"]]))
            else:
                while True:
                    b = dict(a)
                    fresh = one()
                    for f in FIELDS:
                        if rng.random() < 0.5:
                            b[f] = fresh[f]
                    if b != a and (b["colour"], b["background"]) not in CLASHES:
                        break
            seq = [a] * at + [b] * (blocks - at)
        clips.append(seq)
    return clips


# -- rendering ---------------------------------------------------------------------------------------------------
@dataclass
class Clips:
    frames: torch.Tensor  # [B, T, 3, H, W] float in [-1, 1]
    alpha: torch.Tensor  # [B, T, H, W] shape coverage in [0, 1]
    centre: torch.Tensor  # [B, T, 2] (x, y) of the shape in pixels, wrapped into the frame
    attrs: list[list[dict]]  # [B][blocks]
    prompts: list[list[str]]  # [B][blocks]
    start: torch.Tensor | None = None  # [B] bool: the clip is a session's beginning (shape starts centred)


def _index(attrs: list[list[dict]], field: str, frames_per_block: int, device) -> torch.Tensor:
    ids = [[NAMES[field].index(blk[field]) for blk in clip] for clip in attrs]
    return torch.tensor(ids, device=device).repeat_interleave(frames_per_block, dim=1)  # [B, T]


def render(attrs: list[list[dict]], frames_per_block: int, size: tuple[int, int], start: torch.Tensor,
           device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frames [B, T, 3, H, W] in [-1, 1], coverage [B, T, H, W], centres [B, T, 2] for these attributes.

    start: [B, 2] position (x, y) in pixels of the first frame's centre."""
    h, w = size
    scale = w / 128.0
    colour_tab = torch.tensor(list(COLOURS.values()), device=device)
    bg_tab = torch.tensor(list(BACKGROUNDS.values()), device=device)
    size_tab = torch.tensor(list(SIZES.values()), device=device) * scale
    motion_tab = torch.tensor(list(MOTIONS.values()), device=device) * SPEED * scale
    colour = colour_tab[_index(attrs, "colour", frames_per_block, device)]  # [B, T, 3]
    bg = bg_tab[_index(attrs, "background", frames_per_block, device)]
    radius = size_tab[_index(attrs, "size", frames_per_block, device)]  # [B, T]
    shape = _index(attrs, "shape", frames_per_block, device)  # [B, T]
    vel = motion_tab[_index(attrs, "motion", frames_per_block, device)]  # [B, T, 2]
    # Position of frame t: the start plus the moves of frames 1..t (a frame moves by its own block's velocity).
    steps = torch.cat([torch.zeros_like(vel[:, :1]), vel[:, 1:]], dim=1).cumsum(1)
    centre = start.to(device)[:, None] + steps
    centre = torch.stack([centre[..., 0] % w, centre[..., 1] % h], dim=-1)  # [B, T, 2]

    ys = torch.arange(h, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=device, dtype=torch.float32) + 0.5
    # Offsets on the torus: the shape that leaves one edge comes back at the other.
    dx = (xs[None, None, None, :] - centre[..., 0, None, None] + w / 2) % w - w / 2  # [B, T, 1, W]
    dy = (ys[None, None, :, None] - centre[..., 1, None, None] + h / 2) % h - h / 2  # [B, T, H, 1]
    r = radius[..., None, None]
    d_circle = torch.sqrt(dx * dx + dy * dy) - r
    d_square = torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
    u = -dy  # up is +u; an upright equilateral triangle, inradius 0.75 r, centred on its centroid
    d_tri = torch.maximum(torch.maximum(-u, 0.866 * dx + 0.5 * u), -0.866 * dx + 0.5 * u) - 0.75 * r
    d = torch.where(shape[..., None, None] == 0, d_circle, torch.where(shape[..., None, None] == 1, d_square, d_tri))
    alpha = (0.5 - d).clamp(0, 1)  # one pixel of anti-aliasing
    img = bg[..., None, None] * (1 - alpha[:, :, None]) + colour[..., None, None] * alpha[:, :, None]
    return img * 2 - 1, alpha, centre


def make_clips(batch: int, blocks: int, frames_per_block: int = 2, size: tuple[int, int] = (128, 128),
               rng: random.Random | None = None, generator: torch.Generator | None = None, device="cpu",
               switch_prob: float = 0.3, vary_text: bool = True, attrs: list[list[dict]] | None = None,
               start_prob: float = 0.0, shape_only: float = 0.0) -> Clips:
    """A batch of clips with their per-block prompts. `rng` drives attributes and phrasing, `generator`
    (a CPU generator) the start positions; both default to fixed seeds.

    With `start_prob`, that share of clips are a session's first blocks: the shape starts at the centre of
    the frame (so the first block, which has nothing before it, is one picture and not a guess among
    positions that a few denoising steps would blur). The others are windows from later in a session: the
    shape is anywhere."""
    rng = rng or random.Random(0)
    attrs = attrs or sample_attrs(batch, blocks, rng, switch_prob, shape_only)
    h, w = size
    n = len(attrs)
    start = torch.rand(n, 2, generator=generator) * torch.tensor([float(w), float(h)])
    first = torch.rand(n, generator=generator) < start_prob
    start[first] = torch.tensor([w / 2, h / 2])
    frames, alpha, centre = render(attrs, frames_per_block, size, start, device)
    prompts = [[describe(a, rng if vary_text else None) for a in clip] for clip in attrs]
    return Clips(frames, alpha, centre, attrs, prompts, first.to(device))


def clip_for_prompt(prompt: str, blocks: int, frames_per_block: int = 2, size=(128, 128), start=(64.0, 64.0),
                    device="cpu") -> Clips:
    a = parse_prompt(prompt)
    attrs = [[a] * blocks]
    frames, alpha, centre = render(attrs, frames_per_block, size, torch.tensor([start]), device)
    return Clips(frames, alpha, centre, attrs, [[prompt] * blocks])


# -- measures on frames (tests and evaluation) ---------------------------------------------------------------
def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[T, 3, H, W] in [-1, 1] -> [T, H, W, 3] uint8."""
    return ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def background(frame: np.ndarray) -> np.ndarray:
    """The background colour of an [H, W, 3] uint8 frame: the per-channel median (the shape covers < 15%)."""
    return np.median(frame.reshape(-1, 3), axis=0)


def foreground(frame: np.ndarray, threshold: float = 90.0) -> np.ndarray:
    """[H, W] bool: pixels far (L1 over channels, 0..765) from the background colour."""
    return np.abs(frame.astype(np.float32) - background(frame)).sum(-1) > threshold


def nearest(rgb: np.ndarray, table: dict[str, tuple]) -> np.ndarray:
    """Names of the nearest table colour for rgb [..., 3] uint8."""
    names = list(table)
    tab = np.array(list(table.values()), dtype=np.float32) * 255.0
    d = ((rgb[..., None, :].astype(np.float32) - tab) ** 2).sum(-1)
    return np.array(names)[d.argmin(-1)]


def shape_colour_share(frame: np.ndarray, colour: str) -> float:
    """Share of the foreground pixels whose nearest palette colour is `colour` (0 if there is no foreground)."""
    fg = foreground(frame)
    if fg.sum() < 10:
        return 0.0
    return float((nearest(frame[fg], COLOURS) == colour).mean())


def background_name(frame: np.ndarray) -> str:
    return str(nearest(background(frame), BACKGROUNDS))


def circular_centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of a mask on the torus (a shape split across an edge has one centre), in pixels."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return float("nan"), float("nan")

    def mean(v, n):
        a = 2 * np.pi * (v + 0.5) / n
        return (math.atan2(np.sin(a).mean(), np.cos(a).mean()) * n / (2 * np.pi) - 0.5) % n

    return mean(xs, w), mean(ys, h)


def circular_delta(a: float, b: float, n: int) -> float:
    """b - a on a circle of length n, in (-n/2, n/2]."""
    return (b - a + n / 2) % n - n / 2


def fill_ratio(mask: np.ndarray) -> float:
    """Area over bounding-box area, after centring the mask on the torus: circle ~0.79, square ~1, triangle ~0.5."""
    h, w = mask.shape
    cx, cy = circular_centroid(mask)
    if math.isnan(cx):
        return float("nan")
    m = np.roll(mask, (int(round(h / 2 - cy)), int(round(w / 2 - cx))), axis=(0, 1))
    ys, xs = np.nonzero(m)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return float(m.sum() / box)


def motion_of(frames: np.ndarray) -> tuple[float, float]:
    """Mean per-frame (dx, dy) of the foreground's circular centroid over [T, H, W, 3] uint8 frames."""
    h, w = frames.shape[1:3]
    cs = [circular_centroid(foreground(f)) for f in frames]
    dxs = [circular_delta(a[0], b[0], w) for a, b in zip(cs, cs[1:])]
    dys = [circular_delta(a[1], b[1], h) for a, b in zip(cs, cs[1:])]
    return float(np.nanmean(dxs)), float(np.nanmean(dys))


# -- running the demo graph (tests and evaluation) ---------------------------------------------------------
def graph_with_weights(graph_yaml: str | Path, weights: str | Path, out_yaml: str | Path, device: str = "cpu",
                       rgb: bool = True) -> Path:
    """A copy of a graph file whose text encoder, denoiser and decoder read `weights` (prefixes text., dit.,
    decoder.), on `device`, emitting rgb24 (exact pixels) when `rgb`."""
    import yaml

    spec = yaml.safe_load(Path(graph_yaml).read_text())
    prefixes = {"text_encoder": "text.", "causal_denoiser": "dit.", "latent_decoder": "decoder."}
    for node in spec["nodes"].values():
        if node["type"] in prefixes:
            node.setdefault("params", {}).update(weights=str(Path(weights).resolve()),
                                                 weights_prefix=prefixes[node["type"]])
        if node["type"] == "emit" and rgb:
            node.setdefault("params", {})["format"] = "rgb24"
    spec["device"] = device
    out_yaml = Path(out_yaml)
    out_yaml.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out_yaml


def run_prompt(engine, prompt: str, blocks: int, changes: dict[int, str] | None = None, seed: int = 0) -> np.ndarray:
    """RGB frames [blocks * T, H, W, 3] uint8 of one session of `engine` showing `prompt`; `changes` maps a
    block index to a prompt sent while that block plays (so it shows from the next block on)."""
    frames = []
    engine.submit("set_prompt", {"prompt": prompt})  # applied before the session's first block
    if seed and "set_seed" in engine.plan.commands:
        engine.submit("set_seed", {"seed": seed})

    def on_block(b):
        frames.append(b.rgb().copy())
        if changes and b.index in changes:
            engine.submit("set_prompt", {"prompt": changes[b.index]})

    res = engine.run_session(on_block, max_blocks=blocks)
    if not res.ok:
        raise RuntimeError(res.error)
    return np.concatenate(frames)
