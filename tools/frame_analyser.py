"""What a demo frame shows, read back from its pixels: background, foreground, the shape's colour, kind, size
and position, and (over frames) its motion. The data generator (tools/demo_data.py) knows what each frame
should show, so the analyser is checked on its ground-truth frames first (`accuracy`, tests/test_demo_model.py)
and then measures what the model draws (bench/bench_demo_stream.py).

  python tools/frame_analyser.py            # its accuracy on generated ground-truth frames
"""
from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_data as data  # noqa: E402

MIN_AREA = 60  # pixels of foreground below which a frame has no shape ("blank"); a small shape is ~240
# Fill ratio (area over bounding box): circle 0.785, square 1.0, triangle 0.5.
FILL_SQUARE, FILL_TRIANGLE = 0.895, 0.64
# Area is ~3 r^2 for all three shapes (circle pi r^2, square (1.7 r)^2, triangle 3 sqrt(3) (0.75 r)^2).
SIZE_EDGES = (12.0, 19.0)  # radius (px at 128) between small (9) / medium (15) / big (23)


@dataclass
class Frame:
    background: str
    blank: bool  # no shape at all
    area: int
    colour: str | None
    shape: str | None
    size: str | None
    x: float
    y: float


def analyse(frame: np.ndarray) -> Frame:
    """One [H, W, 3] uint8 frame."""
    h, w = frame.shape[:2]
    bg = data.background_name(frame)
    fg = data.foreground(frame)
    area = int(fg.sum())
    if area < MIN_AREA * (w / 128.0) ** 2:
        return Frame(bg, True, area, None, None, None, float("nan"), float("nan"))
    names, counts = np.unique(data.nearest(frame[fg], data.COLOURS), return_counts=True)
    colour = str(names[counts.argmax()])
    fill = data.fill_ratio(fg)
    shape = "square" if fill > FILL_SQUARE else "circle" if fill > FILL_TRIANGLE else "triangle"
    r = math.sqrt(area / 3.0) * 128.0 / w
    size = "small" if r < SIZE_EDGES[0] else "medium" if r < SIZE_EDGES[1] else "big"
    x, y = data.circular_centroid(fg)
    return Frame(bg, False, area, colour, shape, size, x, y)


def analyse_batch(frames, device=None, chunk: int = 256) -> list[Frame]:
    """`analyse` for many frames at once, in torch (on `device`: a GPU reads thousands in a fraction of a
    second): uint8 [N, H, W, 3] tensor or array. The same readings as `analyse`, frame for frame
    (tests/test_demo_model.py checks), so the training's probe scores what the bench would."""
    import torch

    f = torch.as_tensor(frames)
    out = []
    for i in range(0, f.shape[0], chunk):
        out += _analyse_chunk(f[i:i + chunk].to(device) if device is not None else f[i:i + chunk])
    return out


def _analyse_chunk(f) -> list[Frame]:
    import torch

    n, h, w, _ = f.shape
    dev = f.device
    px = f.reshape(n, h * w, 3).to(torch.float64)
    srt = px.sort(dim=1).values  # np.median: the mean of the two middle values of an even count
    m = h * w
    med = (srt[:, (m - 1) // 2] + srt[:, m // 2]) / 2 if m % 2 == 0 else srt[:, m // 2]  # [N, 3]
    bg_tab = torch.tensor(list(data.BACKGROUNDS.values()), dtype=torch.float32, device=dev) * 255.0
    bg = ((med.float()[:, None] - bg_tab) ** 2).sum(-1).argmin(-1)  # [N]
    fg = (px - med[:, None]).abs().sum(-1) > 90.0  # [N, H*W]
    area = fg.sum(1)
    pal = torch.tensor(list(data.COLOURS.values()), dtype=torch.float32, device=dev) * 255.0
    near = ((px.float()[:, :, None] - pal) ** 2).sum(-1).argmin(-1)  # [N, H*W]
    counts = torch.zeros(n, len(pal), dtype=torch.long, device=dev).scatter_add_(1, near, fg.long())
    # np.unique orders names alphabetically: a tie in counts goes to the first name in that order
    alpha = sorted(range(len(pal)), key=lambda i: list(data.COLOURS)[i])
    colour = torch.tensor(alpha, device=dev)[counts[:, alpha].argmax(1)]
    mask = fg.view(n, h, w)

    def circ(v, size):  # circular mean along one axis, weighted by the mask's pixel counts [N, size]
        a = 2 * math.pi * (torch.arange(size, device=dev, dtype=torch.float64) + 0.5) / size
        cnt = v.to(torch.float64)
        tot = cnt.sum(1).clamp(min=1)
        ang = torch.atan2((cnt * a.sin()).sum(1) / tot, (cnt * a.cos()).sum(1) / tot)
        return (ang * size / (2 * math.pi) - 0.5) % size

    cx, cy = circ(mask.sum(1), w), circ(mask.sum(2), h)
    # fill ratio: area over the bounding box once the shape is rolled to the centre of the torus
    sy, sx = torch.round(h / 2 - cy).long(), torch.round(w / 2 - cx).long()
    rows = (torch.arange(h, device=dev)[None] + sy[:, None]) % h  # where each row lands
    cols = (torch.arange(w, device=dev)[None] + sx[:, None]) % w
    rany, cany = mask.any(2), mask.any(1)
    big = 1 << 20
    y0 = torch.where(rany, rows, big).min(1).values
    y1 = torch.where(rany, rows, -1).max(1).values
    x0 = torch.where(cany, cols, big).min(1).values
    x1 = torch.where(cany, cols, -1).max(1).values
    fill = area.double() / ((y1 - y0 + 1) * (x1 - x0 + 1)).clamp(min=1).double()
    out = []
    names_bg, names_c = list(data.BACKGROUNDS), list(data.COLOURS)
    for i, (b, a, c, fl, x, y) in enumerate(zip(bg.tolist(), area.tolist(), colour.tolist(), fill.tolist(),
                                                cx.tolist(), cy.tolist())):
        if a < MIN_AREA * (w / 128.0) ** 2:
            out.append(Frame(names_bg[b], True, a, None, None, None, float("nan"), float("nan")))
            continue
        shape = "square" if fl > FILL_SQUARE else "circle" if fl > FILL_TRIANGLE else "triangle"
        r = math.sqrt(a / 3.0) * 128.0 / w
        size = "small" if r < SIZE_EDGES[0] else "medium" if r < SIZE_EDGES[1] else "big"
        out.append(Frame(names_bg[b], False, a, names_c[c], shape, size, x, y))
    return out


def motion(frames: list[Frame], width: int = 128, height: int = 128) -> tuple[float, float]:
    """Median per-frame (dx, dy) of the shape's centre over consecutive frames with a shape (wraps around)."""
    dxs, dys = [], []
    for a, b in zip(frames, frames[1:]):
        if a.blank or b.blank:
            continue
        dxs.append(data.circular_delta(a.x, b.x, width))
        dys.append(data.circular_delta(a.y, b.y, height))
    if not dxs:
        return float("nan"), float("nan")
    return float(np.median(dxs)), float(np.median(dys))


def direction(dx: float, dy: float, still_below: float = 0.75) -> str | None:
    """The motion word for a per-frame displacement (None if there is none to read)."""
    if math.isnan(dx):
        return None
    if math.hypot(dx, dy) < still_below:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


FIELDS = ("background", "colour", "shape", "size")


def matches(f: Frame, attrs: dict) -> dict[str, bool]:
    """Per attribute: does the frame show what `attrs` asks for (False for every shape attribute if blank)."""
    return {"background": f.background == attrs["background"], "colour": f.colour == attrs["colour"],
            "shape": f.shape == attrs["shape"], "size": f.size == attrs["size"]}


def accuracy(clips: int = 200, blocks: int = 8, seed: int = 0) -> dict[str, float]:
    """Accuracy of every reading on ground-truth clips from the data generator (random attributes, start
    positions anywhere, so shapes cross the edges; prompt switches included): per frame for background,
    colour, shape, size, blank (a generated frame always has a shape) and position (within 1.5 px); per
    block pair (4 frames, one attribute set) for the motion direction."""
    import torch

    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    c = data.make_clips(clips, blocks, 2, (128, 128), rng, gen, switch_prob=0.3)
    frames = data.to_uint8(c.frames.flatten(0, 1)).reshape(clips, blocks * 2, 128, 128, 3)
    hits = {k: [] for k in (*FIELDS, "not_blank", "position", "motion")}
    for i in range(clips):
        got = [analyse(f) for f in frames[i]]
        for t, f in enumerate(got):
            a = c.attrs[i][t // 2]
            for k, v in matches(f, a).items():
                hits[k].append(v)
            hits["not_blank"].append(not f.blank)
            cx, cy = c.centre[i, t].tolist()
            hits["position"].append(not f.blank and abs(data.circular_delta(cx, f.x, 128)) < 1.5
                                    and abs(data.circular_delta(cy, f.y, 128)) < 1.5)
        for k in range(0, blocks - 1, 2):  # block pairs with one attribute set
            if c.attrs[i][k] == c.attrs[i][k + 1]:
                hits["motion"].append(direction(*motion(got[2 * k:2 * k + 4])) == c.attrs[i][k]["motion"])
    return {k: float(np.mean(v)) for k, v in hits.items()}


if __name__ == "__main__":
    for k, v in accuracy().items():
        print(f"{k:12s} {v:.4f}")
