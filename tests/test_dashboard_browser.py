"""The live dashboard in a real browser: Voila serves ``dashboards/live.ipynb`` on loopback
and headless Chromium (Debian's ``chromium``) loads it.

Chromium is driven through its DevTools protocol (a websocket, with tornado's client: no
playwright, no browser download); each test polls the page until plotly has drawn the heatmap.

* ``test_live_dashboard_renders_in_chromium``: the notebook replays ART over the SmolLM2
  capture in its kernel (no ``ART_STATS_ADDRESS``) and the page loads once the replay is done:
  the heatmap's axis labels must be the capture's layers and KV heads, hovering a cell must
  show its details for the last step, every figure must show the whole replay, and a
  screenshot must show a heatmap that is not one flat colour.
  ``ART_DASHBOARD_SCREENSHOT=docs/dashboard_live.png`` writes that screenshot there (how the
  committed one was made).
* ``test_live_dashboard_follows_a_stream_in_chromium``: the test process replays the capture
  on a loopback stream that the notebook connects to (``ART_STATS_ADDRESS``), a step every
  0.3 s, and the page loads while it runs: the message count and the hovered heatmap cell's
  step must grow in the page, and the bytes and per-request figures must keep following the
  stream (their newest step read from plotly's data in the page at three times). A page
  loaded on a busy machine leaves some figures' browser models deaf to updates (anywidget's
  2 s limit to load plotly's module, see ``ViewWatch`` in ``art_runtime.dashboards.figures``);
  the dashboard rebuilds those, and this checks that the page then follows.

``.ci/run`` installs chromium, so in CI these tests run; on a machine without chromium they
fail and say what to install.
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
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from art_runtime.dashboards import CaptureReplay, DecodeStatsStreamer, capture_path

from test_notebooks import DASHBOARDS, capture_shape, notebook_env

pytestmark = pytest.mark.browser
WAIT_S = 240  # Voila runs the notebook (kernel start, imports: ~10-40 s on a busy 2-core machine) before widgets load
WINDOW = (1500, 1500)
EMPTY_PLOT_BACKGROUND = (229, 236, 246)  # plotly's default plot area colour: an empty heatmap


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:  # a failure, not a skip: the browser test is part of the suite
        pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
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
  const status = document.body.innerText.match(/(\\d+) messages from/);
  const plot = document.querySelector('.js-plotly-plot');
  const image = plot && plot.querySelector('.heatmaplayer image');
  if (!image) return null;
  const r = image.getBoundingClientRect();
  const ticks = axis => [...plot.querySelectorAll('.' + axis + 'tick text')].map(t => t.textContent);
  return {box: [r.left, r.top, r.width, r.height], x: ticks('x'), y: ticks('y'),
          title: plot.querySelector('.gtitle').textContent, messages: status ? Number(status[1]) : 0};
})()"""


HOVER_JS = "[...document.querySelectorAll('.hoverlayer .hovertext')].map(t => t.textContent).join(' ')"
HOVER_STEP = re.compile(r"layer L\d+, KV head kv\d.*depth [01]\.\d+.*pages visited \d+ / selected \d+.*step (\d+)")


async def poll(page: "DevTools", expression: str, done, timeout_s: float, what: str):
    """Evaluate ``expression`` until ``done(value)``; the value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await page.evaluate(expression)
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s (last: {value!r})")
        await asyncio.sleep(0.5)


async def hover_step(page: "DevTools", shown: dict) -> int:
    """Hover the top-left heatmap cell (after leaving the plot, so that plotly redraws the label);
    the step its label names."""
    left, top, width, height = shown["box"]
    await page.call("Input.dispatchMouseEvent", type="mouseMoved", x=1, y=1)
    await page.call("Input.dispatchMouseEvent", type="mouseMoved", x=left + width / (2 * len(shown["x"])),
                    y=top + height / (2 * len(shown["y"])))
    label = await poll(page, HOVER_JS, HOVER_STEP.search, 10, "the heatmap's hover label")
    return int(HOVER_STEP.search(label).group(1))


class Stream:
    """The capture replay on a loopback stream, one step every ``interval_s`` from ``start()``."""

    def __init__(self, interval_s: float = 0.3):
        self.replay = CaptureReplay()
        self.streamer = DecodeStatsStreamer("tcp://127.0.0.1:*")
        self.interval_s = interval_s
        self.stop, self.error = threading.Event(), None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        replay, step = self.replay, 0
        try:
            while not self.stop.is_set():
                local = step % replay.num_steps
                self.streamer.begin_step(step, replay.seq_lens(local), num_kv_heads=replay.num_kv_heads,
                                         head_dim=replay.head_dim, element_size=replay.element_size,
                                         request_ids=replay.request_ids)
                for item in replay.run_step(local):
                    self.streamer.publish_layer(item.layer, item.stats)
                step += 1
                self.stop.wait(self.interval_s)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.streamer.close()


# The last x of every trace of every figure (null for a trace without data).
LAST_X_JS = "[...document.querySelectorAll('.js-plotly-plot')].map(p => p.data.map(t => (t.x || []).at(-1) ?? null))"


class Browser:
    """Headless Chromium with one page, driven over DevTools (``async with``)."""

    def __init__(self, path: str, profile: Path):
        self.path, self.profile = path, profile

    async def __aenter__(self) -> DevTools:
        self.proc = start([self.path, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--window-size={WINDOW[0]},{WINDOW[1]}", "--remote-debugging-address=127.0.0.1",
                           "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank"],
                          stderr=subprocess.PIPE, text=True)
        port = None
        for line in self.proc.stderr:  # chromium announces the port it picked
            if m := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line):
                port = int(m.group(1))
                break
        assert port, "chromium did not start its DevTools server"
        page = await DevTools.connect(port)
        await page.call("Page.enable")
        return page

    async def __aexit__(self, *exc) -> None:
        stop(self.proc)


async def screenshot(page: DevTools) -> bytes:
    await asyncio.sleep(1)  # let every figure finish drawing
    # The window holds the page: capturing beyond it would resize it and drop the hover label.
    return base64.b64decode((await page.call("Page.captureScreenshot", format="png"))["data"])


def heatmap_has_every_layer(shown) -> bool:
    """Stream data has reached the heatmap for every captured layer (a layer's row appears with its
    first message, so right after the first message some rows may still be missing)."""
    return bool(shown and shown["messages"] and len(shown["y"]) == len(capture_shape(capture_path())[0]))


async def render_replay(url: str, browser: Browser) -> tuple[dict, bytes]:
    async with browser as page:
        await page.call("Page.navigate", url=url)
        shown = await poll(page, HEATMAP_JS, heatmap_has_every_layer, WAIT_S, "a heatmap with every layer's stream data")
        shown["step"] = await hover_step(page, shown)
        shown["last_x"] = await page.evaluate(LAST_X_JS)
        return shown, await screenshot(page)


async def render_stream(url: str, browser: Browser) -> dict:
    async with browser as page:
        await page.call("Page.navigate", url=url)
        shown = await poll(page, HEATMAP_JS, heatmap_has_every_layer, WAIT_S, "a heatmap with every layer's stream data")
        first_step = await hover_step(page, shown)
        first = await page.evaluate(LAST_X_JS)
        # The bytes and per-request figures (2 and 3) move past the step they showed first ...
        later = await poll(page, LAST_X_JS, lambda v: v[2][0] > first[2][0] and v[3][0] > first[3][0], 60,
                           "the bytes and per-request figures to follow the stream")
        # ... and keep following (polled, not a fixed wait: on a loaded 2-core machine one
        # figure's update can land a few seconds after the other's)
        last = await poll(page, LAST_X_JS, lambda v: v[2][0] > later[2][0] and v[3][0] > later[3][0], 60,
                          "the bytes and per-request figures to keep following the stream")
        shown["last_x"] = [first, later, last]
        shown["steps"] = [first_step, await hover_step(page, shown)]
        shown["messages_end"] = (await page.evaluate(HEATMAP_JS))["messages"]
        return shown


def serve(tmp_path: Path, env: dict) -> tuple[subprocess.Popen, str]:
    """Voila serving the live notebook on a free loopback port; the process and the page's URL."""
    port = free_port()
    voila = start([sys.executable, "-m", "voila", "live.ipynb", f"--port={port}", "--no-browser",
                   "--Voila.ip=127.0.0.1"], cwd=DASHBOARDS, env=env, stdout=subprocess.DEVNULL,
                  stderr=open(tmp_path / "voila.log", "w"))
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_http(url + "api", voila, 60)  # not "/": every request of a notebook page starts a kernel
    except BaseException:
        stop(voila)
        raise
    return voila, url


def check_heatmap_axes(shown: dict) -> None:
    layers, num_kv = capture_shape(capture_path())
    assert shown["title"].startswith("termination depth")
    # (tick labels in document order, which for the reversed layer axis is bottom to top)
    assert sorted(shown["y"]) == sorted(f"L{layer}" for layer in layers)
    assert sorted(shown["x"]) == [f"kv{h}" for h in range(num_kv)]


def test_live_dashboard_renders_in_chromium(tmp_path):
    from PIL import Image

    voila, url = serve(tmp_path, notebook_env())
    try:
        shown, png = asyncio.run(render_replay(url, Browser(chromium(), tmp_path / "profile")))
    finally:
        stop(voila)
    if os.environ.get("ART_DASHBOARD_SCREENSHOT"):
        Path(os.environ["ART_DASHBOARD_SCREENSHOT"]).write_bytes(png)

    check_heatmap_axes(shown)
    # The notebook's replay: 4 requests 1/8 of the captured queries apart, one step per query left.
    with safe_open(str(capture_path()), framework="pt") as f:
        captured = f.get_slice(next(k for k in f.keys() if k.endswith(".q_last"))).get_shape()[1]
    last_step = captured - 3 * (captured // 8) - 1
    layers, _ = capture_shape(capture_path())
    assert shown["step"] == last_step and 0 < shown["messages"] <= len(layers) * (last_step + 1), shown
    # Every figure shows the whole replay: histogram depths in 0..1, bytes and requests up to the last step.
    heatmap, histogram, bytes_figure, requests = shown["last_x"]
    assert 0 < histogram[0] <= 1 and bytes_figure == [last_step, last_step] and requests == [last_step], shown
    image = Image.open(io.BytesIO(png)).convert("RGB")
    left, top, width, height = (round(v) for v in shown["box"])
    assert width > 100 and height > 100, shown["box"]
    cells = image.crop((left + 2, top + 2, left + width - 2, top + height - 2))
    colours = {colour for _, colour in cells.getcolors(maxcolors=1 << 20)}
    assert len(colours) >= 2 and EMPTY_PLOT_BACKGROUND not in colours, colours


def test_live_dashboard_follows_a_stream_in_chromium(tmp_path, monkeypatch):
    browser = Browser(chromium(), tmp_path / "profile")
    # The replay runs here: Quest scores on torch as in a user's process, not on the Triton
    # interpreter of the kernel tests; one thread, as the notebooks (small ops, 2 busy cores).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stream = Stream()
    try:
        stream.thread.start()  # the page loads while the stream runs
        voila, url = serve(tmp_path, {**notebook_env(), "ART_STATS_ADDRESS": stream.streamer.address})
        try:
            shown = asyncio.run(render_stream(url, browser))
        finally:
            stop(voila)
    finally:
        stream.close()
        torch.set_num_threads(threads)
    assert stream.error is None
    check_heatmap_axes(shown)
    assert shown["messages_end"] > shown["messages"]
    assert shown["steps"][1] > shown["steps"][0], shown["steps"]  # the heatmap follows the stream
    first, later, last = shown["last_x"]
    for fig in (2, 3):  # bytes (both traces) and per-request figures: newest step shown, three times
        assert all(a < b < c for a, b, c in zip(first[fig], later[fig], last[fig])), shown["last_x"]
    assert 0 < last[1][0] <= 1, shown["last_x"]  # the histogram holds depths
