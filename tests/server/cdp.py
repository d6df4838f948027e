"""A small headless-Chromium driver over the DevTools protocol (websocket, via aiohttp). Test helper only."""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--no-default-browser-check", "--mute-audio",
         "--autoplay-policy=no-user-gesture-required", "--allow-loopback-in-peer-connection",
         "--remote-debugging-port=0",
         # a camera for getUserMedia (Chromium's test pattern), granted without a prompt
         "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", "chromium", "chromium-browser",
                 "google-chrome", "google-chrome-stable"):
        if name and (path := shutil.which(name) or (name if os.path.isfile(name) else None)):
            return path
    return None


class CDPError(RuntimeError):
    pass


class Chromium:
    def __init__(self, binary: str):
        self.binary = binary
        self.proc: subprocess.Popen | None = None
        self.profile: str | None = None
        self.http: aiohttp.ClientSession | None = None
        self.ws = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self.console: list[str] = []

    async def __aenter__(self) -> Chromium:
        self.profile = tempfile.mkdtemp(prefix="rg-chromium-")
        self._log = open(Path(self.profile) / "stderr.log", "wb")
        self.proc = subprocess.Popen([self.binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise CDPError(f"chromium did not start: {self.stderr()[-2000:]}")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
        target = None
        while target is None:
            async with self.http.get(f"http://127.0.0.1:{port}/json/list") as r:
                target = next((t for t in await r.json() if t.get("type") == "page"), None)
            if target is None:
                if time.monotonic() > deadline:
                    raise CDPError("no page target")
                await asyncio.sleep(0.1)
        self.ws = await self.http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.send("Runtime.enable")
        await self.send("Page.enable")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def stderr(self) -> str:
        try:
            return (Path(self.profile) / "stderr.log").read_text(errors="replace")
        except OSError:
            return ""

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            fut = self._waiting.pop(data.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append("exception: " + json.dumps(data["params"]["exceptionDetails"])[:500])
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(CDPError("the DevTools connection closed"))

    async def send(self, method: str, params: dict | None = None, timeout: float = 20) -> dict:
        i = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[i] = fut
        await self.ws.send_str(json.dumps({"id": i, "method": method, "params": params or {}}))
        reply = await asyncio.wait_for(fut, timeout)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})

    async def js(self, expression: str, timeout: float = 20) -> Any:
        res = await self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                   "returnByValue": True}, timeout)
        if "exceptionDetails" in res:
            raise CDPError(f"{expression[:80]}: {res['exceptionDetails'].get('exception', {}).get('description')}")
        return res.get("result", {}).get("value")

    async def wait_js(self, expression: str, timeout: float = 30, what: str | None = None) -> Any:
        end = time.monotonic() + timeout
        while True:
            try:
                value = await self.js(expression)
            except CDPError:
                value = None
            if value:
                return value
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what or expression}; console: {self.console[-15:]}")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        try:
            if self.ws is not None and not self.ws.closed:
                try:
                    await asyncio.wait_for(self.send("Browser.close", timeout=5), 5)
                except Exception:  # noqa: BLE001
                    pass
                await self.ws.close()
            if self._reader is not None:
                self._reader.cancel()
                await asyncio.gather(self._reader, return_exceptions=True)
            if self.http is not None:
                await self.http.close()
        finally:
            if self.proc is not None:
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    try:  # the browser and its helpers share the session we started it in
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    except OSError:
                        self.proc.kill()
                    self.proc.wait(5)
            if getattr(self, "_log", None):
                self._log.close()
            if self.profile:
                shutil.rmtree(self.profile, ignore_errors=True)
