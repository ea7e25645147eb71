"""Drive a real headless Chromium over the Chrome DevTools Protocol (its websocket).

Clicks and typing go through `Input.dispatchMouseEvent` / `Input.insertText` at the element's
place on the rendered page, as a user's would; `eval` is for reading the page back.
Owns: starting Chromium (own profile dir, loopback debugging port), stopping it by pid.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import websockets

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class CDPError(Exception):
    pass


class Browser:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.ws: Any = None
        self.session = ""
        self._id = 0
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader: asyncio.Task[None] | None = None

    def _launch(self, width: int, height: int) -> Path:
        assert CHROMIUM
        profile = self.workdir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        self.log = self.workdir / "chromium.log"
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                 "--disable-sync", "--metrics-recording-only", "--disable-component-update",
                 "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return profile

    async def start(self, width: int = 1280, height: int = 860) -> Browser:
        profile = await asyncio.to_thread(self._launch, width, height)
        assert self.proc is not None
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise CDPError(f"chromium did not start: {self.log.read_text(errors='replace')[-2000:]}")
            await asyncio.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        self.ws = await websockets.connect(f"ws://127.0.0.1:{port}{path}", max_size=64 * 1024 * 1024)
        self._reader = asyncio.create_task(self._read())
        target = (await self.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        self.session = (await self.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
        for domain in ("Page", "Runtime"):
            await self.page(f"{domain}.enable")
        await self.page("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        return self

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg:
                fut = self._pending.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    if "error" in msg:
                        fut.set_exception(CDPError(str(msg["error"])))
                    else:
                        fut.set_result(msg.get("result", {}))
            else:
                self.events.append(msg)

    async def send(self, method: str, params: dict[str, Any] | None = None, session: str = "") -> Any:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._id] = fut
        await self.ws.send(json.dumps(msg))
        return await asyncio.wait_for(fut, 30)

    async def page(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return await self.send(method, params, self.session)

    # -- the page ---------------------------------------------------------------------------
    async def goto(self, url: str) -> None:
        await self.page("Page.navigate", {"url": url})
        await self.wait("document.readyState === 'complete' && location.href !== 'about:blank'")

    async def eval(self, expr: str) -> Any:
        r = await self.page("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise CDPError(f"{expr}: {r['exceptionDetails'].get('text')} {r['exceptionDetails'].get('exception')}")
        return r["result"].get("value")

    async def wait(self, expr: str, timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = await self.eval(expr)
                if last:
                    return last
            except CDPError as e:  # the page is navigating
                last = e
            await asyncio.sleep(0.1)
        url = await self.eval("location.href")
        text = await self.eval("document.body ? document.body.innerText.slice(0, 1500) : ''")
        raise TimeoutError(f"waited {timeout}s for {expr!r} (last {last!r}) on {url}:\n{text}")

    async def _center(self, selector: str) -> tuple[float, float]:
        sel = json.dumps(selector)
        await self.wait(f"!!document.querySelector({sel})")
        await self.eval(f"document.querySelector({sel}).scrollIntoView({{block: 'center'}})")
        r = await self.eval(f"(() => {{ const r = document.querySelector({sel}).getBoundingClientRect();"
                            " return [r.x + r.width / 2, r.y + r.height / 2, r.width, r.height]; })()")
        if not r or r[2] == 0 or r[3] == 0:
            raise CDPError(f"{selector} is not visible")
        return r[0], r[1]

    async def click(self, selector: str) -> None:
        x, y = await self._center(selector)
        await self.page("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for kind in ("mousePressed", "mouseReleased"):
            await self.page("Input.dispatchMouseEvent",
                            {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    async def type(self, selector: str, text: str, clear: bool = True) -> None:
        await self.click(selector)
        if clear:
            await self.eval(f"document.querySelector({json.dumps(selector)}).select && "
                            f"document.querySelector({json.dumps(selector)}).select()")
            await self.page("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Backspace", "code": "Backspace",
                                                       "windowsVirtualKeyCode": 8})
            await self.page("Input.dispatchKeyEvent", {"type": "keyUp", "key": "Backspace", "code": "Backspace",
                                                       "windowsVirtualKeyCode": 8})
        if text:
            await self.page("Input.insertText", {"text": text})

    async def choose(self, selector: str, value: str) -> None:
        """Pick an option of a <select> with the keyboard, as a user would (focus, type)."""
        await self.click(selector)
        await self.page("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Escape", "code": "Escape",
                                                   "windowsVirtualKeyCode": 27})
        for ch in value:
            await self.page("Input.dispatchKeyEvent", {"type": "char", "text": ch})
        await self.wait(f"document.querySelector({json.dumps(selector)}).value === {json.dumps(value)}", 5)

    async def screenshot(self, path: Path) -> Path:
        data = (await self.page("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False}))["data"]
        await asyncio.to_thread(path.write_bytes, base64.b64decode(data))
        return path

    def dialogs(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("method") == "Page.javascriptDialogOpening"]

    def console_errors(self) -> list[str]:
        out = []
        for e in self.events:
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(str(e["params"]["exceptionDetails"].get("exception", {}).get("description")))
        return out

    async def stop(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


__all__ = ["CHROMIUM", "Browser", "CDPError", "png_size", "re"]
