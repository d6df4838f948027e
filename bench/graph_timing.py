"""Time a short GPU function the way the engine runs it: `reps` calls captured in one CUDA graph, the graph
replayed `replays` times, the median per call. Launch overhead is what a captured block does not pay, so timing
eager calls would charge a microsecond-scale kernel for its launch (the benches' micro-measurements use this)."""
from __future__ import annotations

import torch


def graph_ms(fn, reps: int, replays: int = 10) -> float:
    """Median ms per call of `fn` over `replays` replays of a graph holding `reps` calls (one uncaptured call first,
    on a side stream: Triton compiles and cuBLAS picks its kernels outside the capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    ms = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b) / reps)
    del g
    return sorted(ms)[len(ms) // 2]
