"""Helpers for the Reactor-API compatibility tests: the example models' folder, hosts that are always stopped,
a block collector with bounded waits."""
import threading
from pathlib import Path

import pytest

from reactor_graph.compat import ModelHost, install_shim, instantiate, load_class
from reactor_graph.errors import SessionError

MODELS = Path(__file__).parent / "models"
WAIT = 5.0  # the most any wait in these tests blocks

install_shim()  # the example models do `from reactor_runtime import ...`


class Collector:
    """on_block/on_end for a host session, with waits that time out instead of hanging."""

    def __init__(self):
        self.blocks = []
        self.result = None
        self.ended = threading.Event()
        self._cond = threading.Condition()

    def on_block(self, block):
        with self._cond:
            self.blocks.append(block)
            self._cond.notify_all()

    def on_end(self, result):
        self.result = result
        self.ended.set()

    def wait_blocks(self, n, timeout=WAIT):
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.blocks) >= n, timeout)
        assert ok, f"only {len(self.blocks)} of {n} blocks arrived within {timeout}s"
        return self.blocks

    def wait_end(self, timeout=WAIT):
        assert self.ended.wait(timeout), f"the session did not end within {timeout}s"
        return self.result

    def start(self, host, max_blocks=None):
        host.start_session(self.on_block, self.on_end, max_blocks)
        return self


@pytest.fixture
def models_dir():
    return MODELS


@pytest.fixture
def make_host():
    hosts = []

    def make(spec, args=None, **kw):
        cls = load_class(spec, MODELS)
        host = ModelHost(instantiate(cls, args or {}), **kw)
        hosts.append(host)
        return host

    yield make
    for h in hosts:
        try:
            h.stop(timeout=WAIT)
        except SessionError:
            pass


@pytest.fixture
def collector():
    return Collector()
