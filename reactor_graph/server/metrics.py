"""Counters and the Prometheus text exposition (format 0.0.4) for `GET /metrics`. No client library needed."""
from __future__ import annotations

import math
import threading
from collections import defaultdict
from typing import Any, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BLOCK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    def __init__(self, buckets: Iterable[float] = BLOCK_BUCKETS):
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * len(self.bounds)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1


class Metrics:
    """Server-side counters. Engine-side ones (blocks, frames, errors, sessions) are read from `host.stats`."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = defaultdict(float)
        self.block_seconds = Histogram()
        self.last_block_s = 0.0
        self.retired: dict[str, int] = defaultdict(int)  # counters of tracks whose sessions ended

    def inc(self, name: str, n: float = 1, **labels: str) -> None:
        with self._lock:
            self.counters[(name, tuple(sorted(labels.items())))] += n

    def get(self, name: str, **labels: str) -> float:
        return self.counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def observe_block(self, seconds: float) -> None:
        """Generation time of one block (its start to leaving the hot path); called on the engine thread."""
        with self._lock:
            self.block_seconds.observe(seconds)
            self.last_block_s = seconds

    def retire(self, track_counters: dict[str, int]) -> None:
        with self._lock:
            for key, value in track_counters.items():
                self.retired[key] += value

    def render(self, host: Any, live_tracks: list[Any], active: bool, waiting: int, clients: int,
               queue_depth: int, stuck: bool) -> str:
        stats = host.stats
        tracks = dict(self.retired)
        for t in live_tracks:
            for key, value in t.counters().items():
                tracks[key] = tracks.get(key, 0) + value
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float]]):
            out.append(f"# HELP reactor_graph_{name} {help_}")
            out.append(f"# TYPE reactor_graph_{name} {kind}")
            for labels, value in samples:
                out.append(f"reactor_graph_{name}{_labels(labels)} {_num(value)}")

        metric("info", "gauge", "The model being served.",
               [({"model": str(host.name), "version": str(getattr(host, "version", "") or "")}, 1)])
        metric("blocks_total", "counter", "Blocks generated.", [({}, stats.blocks)])
        metric("frames_generated_total", "counter", "Frames generated.", [({}, stats.frames)])
        metric("frames_sent_total", "counter", "Frames handed to the video encoder, by kind.",
               [({"kind": k}, tracks.get(k, 0)) for k in ("fresh", "repeats", "idle")])
        metric("frames_dropped_total", "counter", "Frames dropped by the `latest` queue policy.",
               [({}, tracks.get("drops", 0))])
        metric("frames_skipped_total", "counter", "Clock slots skipped after the sender fell behind.",
               [({}, tracks.get("skipped", 0))])
        with self._lock:
            hist = self.block_seconds
            buckets = list(zip(hist.bounds, hist.counts))
            count, total, last = hist.count, hist.sum, self.last_block_s
            counters = dict(self.counters)
        out.append("# HELP reactor_graph_block_seconds Time to generate one block.")
        out.append("# TYPE reactor_graph_block_seconds histogram")
        for bound, n in buckets:
            out.append(f'reactor_graph_block_seconds_bucket{{le="{_num(bound)}"}} {n}')
        out.append(f'reactor_graph_block_seconds_bucket{{le="+Inf"}} {count}')
        out.append(f"reactor_graph_block_seconds_sum {_num(total)}")
        out.append(f"reactor_graph_block_seconds_count {count}")
        metric("last_block_seconds", "gauge", "Generation time of the latest block.",
               [({}, last or getattr(stats, "last_block_s", 0.0))])
        metric("frame_queue_depth", "gauge", "Frames waiting in the session's queue.", [({}, queue_depth)])
        metric("sessions_total", "counter", "Sessions started by the engine.", [({}, stats.sessions)])
        metric("session_active", "gauge", "1 while a client is in session.", [({}, int(active))])
        metric("clients_waiting", "gauge", "Clients waiting in line.", [({}, waiting)])
        metric("clients", "gauge", "Known clients (in session, waiting or about to connect).", [({}, clients)])
        metric("engine_stuck", "gauge", "1 when the watchdog gave up on a session that would not stop.",
               [({}, int(stuck))])
        metric("errors_total", "counter", "Sessions ended by a node error.", [({}, stats.errors)])
        for name, kind, help_ in (
                ("sessions_ended_total", "counter", "Sessions and waits ended, by reason."),
                ("commands_total", "counter", "Commands received, by result."),
                ("messages_rejected_total", "counter", "Data-channel messages refused, by code."),
                ("http_errors_total", "counter", "HTTP requests answered with an error, by route kind."),
                ("input_frames_total", "counter", "Frames received on published tracks, by track and result."),
                ("uploads_total", "counter", "File uploads, by result.")):
            samples = [(dict(labels), v) for (n, labels), v in sorted(counters.items()) if n == name]
            metric(name, kind, help_, samples or [({}, 0)])
        return "\n".join(out) + "\n"


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))
