"""The live dashboard in a real browser: Voila serves ``dashboards/live.ipynb`` on loopback,
headless Chromium (Debian's ``chromium``) loads it, and the page must show the heatmap.

Chromium is driven through its DevTools protocol (a websocket, with tornado's client: no
playwright, no browser download): the page is polled until plotly has drawn the heatmap, the
heatmap's axis labels must be the capture's layers and KV heads, and a screenshot of the page
must show a heatmap that is not one flat colour. ``.ci/run`` installs chromium, so in CI this
test runs; on a machine without chromium it is skipped, unless ``CI`` is set, where a missing
browser fails. ``ART_DASHBOARD_SCREENSHOT=docs/dashboard_live.png`` also writes the
screenshot there (how the committed one was made).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from art_runtime.dashboards import capture_path

from test_notebooks import DASHBOARDS, capture_shape, notebook_env

pytestmark = pytest.mark.browser
WAIT_S = 240  # Voila runs the whole notebook (the replay: ~10-40 s on a busy 2-core machine) before widgets load
WINDOW = (1500, 1500)
EMPTY_PLOT_BACKGROUND = (229, 236, 246)  # plotly's default plot area colour: an empty heatmap


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, **kwargs) -> subprocess.Popen:
    """A process in its own session, so that stopping it also stops its children (the kernel)."""
    return subprocess.Popen(cmd, start_new_session=True, **kwargs)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Until a server answers at ``url`` (any HTTP status)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"nothing answered at {url} within {timeout_s} s")


class DevTools:
    """The few DevTools protocol calls this test needs, on one page target."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    @classmethod
    async def connect(cls, port: int) -> "DevTools":
        from tornado.websocket import websocket_connect

        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10))
        url = next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"]
        return cls(await websocket_connect(url, max_message_size=1 << 28))

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.write_message(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events may come first; this test reads none of them
            msg = json.loads(await self.ws.read_message())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


# What the page shows of the live heatmap (the first plotly figure): its drawn image, its box
# and its tick labels; null until plotly has drawn it.
HEATMAP_JS = """(() => {
  const plot = document.querySelector('.js-plotly-plot');
  const image = plot && plot.querySelector('.heatmaplayer image');
  if (!image) return null;
  const r = image.getBoundingClientRect();
  const ticks = axis => [...plot.querySelectorAll('.' + axis + 'tick text')].map(t => t.textContent);
  return {box: [r.left, r.top, r.width, r.height], x: ticks('x'), y: ticks('y'),
          title: plot.querySelector('.gtitle').textContent, status: document.body.innerText.match(/\\d+ messages from/)};
})()"""


HOVER_JS = "[...document.querySelectorAll('.hoverlayer .hovertext')].map(t => t.textContent).join(' ')"


async def render(url: str, browser: str, profile: Path) -> tuple[dict, bytes]:
    proc = start([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                  f"--window-size={WINDOW[0]},{WINDOW[1]}", "--remote-debugging-address=127.0.0.1",
                  "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
                 stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:  # chromium announces the port it picked
            if m := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line):
                port = int(m.group(1))
                break
        assert port, "chromium did not start its DevTools server"
        page = await DevTools.connect(port)
        await page.call("Page.enable")
        await page.call("Page.navigate", url=url)
        deadline, shown = time.monotonic() + WAIT_S, None
        while time.monotonic() < deadline:
            shown = await page.evaluate(HEATMAP_JS)
            if shown and shown["status"]:
                break
            await asyncio.sleep(1)
        assert shown and shown["status"], f"no heatmap with stream data within {WAIT_S} s: {shown}"
        # Hover over the top-left cell: plotly's hover label must give the cell's details.
        left, top, width, height = shown["box"]
        x, y = left + width / (2 * len(shown["x"])), top + height / (2 * len(shown["y"]))
        await page.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        deadline = time.monotonic() + 10
        while not shown.get("hover") and time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            shown["hover"] = await page.evaluate(HOVER_JS)
        await asyncio.sleep(1)  # let the other figures finish drawing for the screenshot
        shot = await page.call("Page.captureScreenshot", format="png")  # the window holds the page; a resize would drop the hover label
        return shown, base64.b64decode(shot["data"])
    finally:
        stop(proc)


def test_live_dashboard_renders_in_chromium(tmp_path):
    from PIL import Image

    browser = chromium()
    port = free_port()
    voila = start([sys.executable, "-m", "voila", "live.ipynb", f"--port={port}", "--no-browser",
                   "--Voila.ip=127.0.0.1"], cwd=DASHBOARDS, env=notebook_env(),
                  stdout=subprocess.DEVNULL, stderr=open(tmp_path / "voila.log", "w"))
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_http(url + "api", voila, 60)  # not "/": every request of a notebook page starts a kernel
        shown, png = asyncio.run(render(url, browser, tmp_path / "profile"))
    finally:
        stop(voila)
    if os.environ.get("ART_DASHBOARD_SCREENSHOT"):
        Path(os.environ["ART_DASHBOARD_SCREENSHOT"]).write_bytes(png)

    layers, num_kv = capture_shape(capture_path())
    assert shown["title"].startswith("termination depth")
    # (tick labels in document order, which for the reversed layer axis is bottom to top)
    assert sorted(shown["y"]) == sorted(f"L{layer}" for layer in layers)
    assert sorted(shown["x"]) == [f"kv{h}" for h in range(num_kv)]
    assert re.search(r"layer L\d+, KV head kv\d.*depth 0\.\d+.*pages visited \d+ / selected \d+.*step \d+",
                     shown["hover"]), shown["hover"]
    image = Image.open(io.BytesIO(png)).convert("RGB")
    left, top, width, height = (round(v) for v in shown["box"])
    assert width > 100 and height > 100, shown["box"]
    heatmap = image.crop((left + 2, top + 2, left + width - 2, top + height - 2))
    colours = {colour for _, colour in heatmap.getcolors(maxcolors=1 << 20)}
    assert len(colours) >= 2 and EMPTY_PLOT_BACKGROUND not in colours, colours
