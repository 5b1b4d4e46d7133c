"""The live dashboard: ipywidgets + plotly ``FigureWidget``s fed by a stats stream.

A background thread owns a :class:`~art_runtime.stats.StatsSubscriber` (ZMQ sockets belong
to one thread) and feeds every message to a :class:`~art_runtime.dashboards.state.LiveState`;
at most every ``refresh_s`` seconds, when something changed, it asks for a re-render, so a
fast stream (a message per layer per step) costs the browser a few updates a second, not
thousands. In a Jupyter kernel the re-render runs on the kernel's event loop, the thread
that also handles the browser's replies to figure updates (plotly's ``FigureWidget`` is not
thread-safe); outside an event loop (a script, a test) the receiver thread renders. Controls
re-render at once from the state, paused or not.

A figure whose browser view stops applying updates (plotly's ``FigureWidget`` on anywidget:
a page that loads while the kernel is busy, e.g. on a running stream, can leave some figures
frozen at the data they loaded with; see :class:`~art_runtime.dashboards.figures.ViewWatch`)
is rebuilt as a new widget in its place, ``view_timeout_s`` after its view stopped
acknowledging edits; ``views_rebuilt`` counts them.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import ipywidgets as widgets

from art_runtime.stats import DEFAULT_ADDRESS, StatsSubscriber

from .figures import ViewWatch, figure, heatmap_figure, sync_late_views
from .state import LiveState, Snapshot

ALL = "all requests"
FIGURES = ("heatmap", "histogram", "bytes_figure", "request_figure")
_MIB = 1 << 20


def _gaps(rows):
    """NaN as None: plotly draws a gap, and NaN is not JSON, which carries the figure to the browser."""
    return [[None if math.isnan(v) else v for v in row] for row in rows]


class LiveDashboard:
    """Live ART termination statistics from a stream address.

    Parameters
    ----------
    address : str
        A :class:`~art_runtime.stats.StatsPublisher` endpoint (e.g. ``DecodeStatsStreamer.address``).
    refresh_s : float
        Shortest time between two figure updates from the stream.
    history : int
        Steps kept in the time series.
    start : bool
        Connect and start receiving now (else call :meth:`start`).
    view_timeout_s : float
        How long a figure's browser view may leave an update unacknowledged before the figure
        is rebuilt (see the module docstring).

    Attributes
    ----------
    state : LiveState
        Everything received (testable without a UI).
    heatmap, histogram, bytes_figure, request_figure : plotly.graph_objects.FigureWidget
        (a rebuilt figure replaces the attribute)
    views_rebuilt : int
        Figures rebuilt because their browser view had stopped applying updates.
    pause, request, layers, heads : ipywidgets controls
    widget : ipywidgets.VBox
        The whole dashboard; displaying the object displays it.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, *, refresh_s: float = 1.0, history: int = 500,
                 start: bool = True, view_timeout_s: float = 5.0):
        if not isinstance(address, str):
            raise ValueError(f"address must be a str, got {address!r}")
        if not isinstance(refresh_s, (int, float)) or not refresh_s > 0:
            raise ValueError(f"refresh_s must be a number > 0, got {refresh_s!r}")
        if not isinstance(view_timeout_s, (int, float)) or not view_timeout_s > 0:
            raise ValueError(f"view_timeout_s must be a number > 0, got {view_timeout_s!r}")
        self.address, self.refresh_s = address, float(refresh_s)
        self.state = LiveState(history)
        self._views = ViewWatch(view_timeout_s)
        self.views_rebuilt = 0
        self._render_lock = threading.Lock()  # the receiver thread and control callbacks both render
        self._rendered_version = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        try:  # the kernel's loop when made in a notebook cell
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self._run_on_ui = (lambda fn: loop.call_soon_threadsafe(fn)) if loop is not None else (lambda fn: fn())

        self.heatmap = heatmap_figure(
            "termination depth (pages visited / selected), latest step",
            "layer %{y}, KV head %{x}<br>depth %{z:.3f}<br>pages visited %{customdata[0]} / selected "
            "%{customdata[1]}<br>%{customdata[2]}, step %{customdata[3]}<extra></extra>")
        self.histogram = figure("depth of every (request, layer, KV head)", "depth", "count", bargap=0.05)
        self.histogram.add_histogram(x=[], xbins=dict(start=0, end=1.0001, size=0.05), marker_color="#440154",
                                     hovertemplate="depth %{x}<br>%{y} (request, layer, head)<extra></extra>")
        self.histogram.update_xaxes(range=[0, 1.02])
        self.bytes_figure = figure("KV bytes per step (sum over the layers received)", "step", "MiB")
        self.bytes_figure.add_scatter(x=[], y=[], name="saved", mode="lines+markers", line_color="#21918c")
        self.bytes_figure.add_scatter(x=[], y=[], name="read", mode="lines", line_color="#bbbbbb")
        # One heatmap trace, rows of requests: no traces added and removed as requests come and go.
        self.request_figure = heatmap_figure(
            "mean depth per request and step",
            "request %{y}, step %{x}<br>mean depth %{z:.3f}<extra></extra>", xtitle="step", ytitle="request")
        sync_late_views(*self._figures())
        for fig in self._figures():
            self._views.watch(fig)

        self.pause = widgets.ToggleButton(value=False, description="pause", icon="pause",
                                          tooltip="freeze the figures; messages keep being received")
        self.request = widgets.Dropdown(options=[ALL], value=ALL, description="request")
        self.layers = widgets.SelectMultiple(options=[], description="layers", rows=4,
                                             tooltip="none selected: all layers")
        self.heads = widgets.SelectMultiple(options=[], description="KV heads", rows=4,
                                            tooltip="none selected: all heads")
        self.status = widgets.HTML()
        for control in (self.request, self.layers, self.heads):
            control.observe(lambda _: self.refresh(), names="value")
        self.pause.observe(self._on_pause, names="value")
        controls = widgets.HBox([widgets.VBox([self.pause, self.request, self.status]), self.layers, self.heads])
        self._rows = (widgets.HBox([self.heatmap, self.histogram]),
                      widgets.HBox([self.bytes_figure, self.request_figure]))
        self.widget = widgets.VBox([controls, *self._rows])
        if start:
            self.start()

    # -- receiving ------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to the stream and receive in a background thread."""
        if self._thread is not None:
            raise ValueError("start: the dashboard is already receiving")
        self._thread = threading.Thread(target=self._receive, name="art-dashboard", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        try:
            with StatsSubscriber(self.address) as sub:
                last_tick = 0.0
                while not self._stop.is_set():
                    msg = sub.recv(timeout_s=self.refresh_s / 2)
                    if msg is not None:
                        self.state.add(msg)
                    now = time.monotonic()
                    if now - last_tick >= self.refresh_s:
                        last_tick = now
                        self._run_on_ui(self._tick)
        except BaseException as exc:  # shown in the status line: a thread cannot raise to the user
            self._error = exc
            self.status.value = f"<b>stream error:</b> {exc!r}"

    def wait(self, messages: int = 1, timeout_s: float = 60.0) -> int:
        """Block until ``messages`` messages arrived in all (or ``timeout_s``); the count received."""
        deadline = time.monotonic() + timeout_s
        while self.state.messages < messages and time.monotonic() < deadline and self._error is None:
            time.sleep(0.02)
        return self.state.messages

    def close(self) -> None:
        """Stop receiving (the figures stay as they are)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2 * self.refresh_s + 1.0)

    # -- rendering ------------------------------------------------------------------------
    def _figures(self) -> list:
        return [getattr(self, name) for name in FIGURES]

    def _tick(self) -> None:
        """Every refresh period, on the UI thread: render what arrived, rebuild frozen figures."""
        if not self.pause.value:
            self.refresh(force=False)
        self._rebuild_frozen_figures()

    def _rebuild_frozen_figures(self) -> None:
        with self._render_lock:
            self.views_rebuilt += self._views.rebuild_stale(self, FIGURES, self._rows)

    def _on_pause(self, change) -> None:
        self.pause.icon = "play" if change["new"] else "pause"
        self.pause.description = "resume" if change["new"] else "pause"
        if not change["new"]:
            self.refresh()

    def _sync_options(self) -> None:
        """New request ids, layers and heads appear in the controls as they arrive."""
        requests = [ALL, *self.state.request_ids]
        if list(self.request.options) != requests:
            self.request.options = requests  # keeps the value: it stays among the options
        layers = self.state.layers
        if list(self.layers.options) != layers:
            self.layers.options = layers
        heads = list(range(self.state.num_heads))
        if list(self.heads.options) != heads:
            self.heads.options = heads

    def snapshot(self) -> Snapshot:
        """The state as the controls select it."""
        request = None if self.request.value == ALL else self.request.value
        return self.state.snapshot(request, self.layers.value, self.heads.value)

    def refresh(self, force: bool = True) -> None:
        """Re-render the figures from the state now (``force=False``: only if it changed)."""
        with self._render_lock:
            version = self.state.version
            if not force and version == self._rendered_version:
                return
            self._rendered_version = version
            self._sync_options()
            self._render(self.snapshot())

    def _render(self, snap: Snapshot) -> None:
        who = "all requests" if snap.request is None else f"request {snap.request}"
        custom = [[[v, s, who, step] for v, s in zip(vr, sr)]
                  for vr, sr, step in zip(snap.visited, snap.selected, snap.layer_steps)]
        with self.heatmap.batch_update():
            hm = self.heatmap.data[0]
            hm.z, hm.customdata = _gaps(snap.depth), custom
            hm.x = [f"kv{h}" for h in snap.heads]
            hm.y = [f"L{layer}" for layer in snap.layers]
        self.histogram.data[0].x = snap.histogram
        with self.bytes_figure.batch_update():
            saved, read = self.bytes_figure.data
            saved.x = read.x = snap.steps
            saved.y = [None if b is None else b / _MIB for b in snap.bytes_saved]
            read.y = [b / _MIB for b in snap.bytes_read]
        steps = sorted({step for xs, _ in snap.request_depth.values() for step in xs})
        column = {step: j for j, step in enumerate(steps)}
        rows = []
        for xs, ys in snap.request_depth.values():
            row = [None] * len(steps)  # None: no message of that request at that step
            for step, depth in zip(xs, ys):
                row[column[step]] = depth
            rows.append(row)
        with self.request_figure.batch_update():
            requests = self.request_figure.data[0]
            requests.x, requests.y, requests.z = steps, [str(rid) for rid in snap.request_depth], rows
        sync_late_views(*self._figures())
        for fig in self._figures():
            self._views.sent(fig)
        self.status.value = (f"{snap.messages} messages from <code>{self.address}</code>; "
                             f"layers {snap.layers}, {len(snap.heads)} KV heads")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
