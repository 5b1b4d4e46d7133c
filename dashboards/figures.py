"""Plotly ``FigureWidget`` pieces the live and the explore dashboards share."""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from typing import Sequence

import ipywidgets as widgets
import plotly.graph_objects as go

DEPTH_COLORSCALE = "Viridis"


def figure(title: str, xtitle: str, ytitle: str, **layout) -> go.FigureWidget:
    """An empty figure widget of the dashboards' size and margins."""
    return go.FigureWidget(layout=go.Layout(title=title, xaxis_title=xtitle, yaxis_title=ytitle, height=340,
                                            margin=dict(l=60, r=20, t=50, b=50), **layout))


def heatmap_figure(title: str, hovertemplate: str, xtitle: str = "KV head", ytitle: str = "layer") -> go.FigureWidget:
    """An empty heatmap of termination depth (0..1), categories on both axes, rows top down."""
    fig = figure(title, xtitle, ytitle, yaxis=dict(autorange="reversed", type="category"),
                 xaxis=dict(type="category"))
    fig.add_heatmap(z=[], zmin=0, zmax=1, colorscale=DEPTH_COLORSCALE, colorbar=dict(title="depth"),
                    hovertemplate=hovertemplate)
    return fig


def sync_late_views(*figs: go.FigureWidget) -> None:
    """Make views created from now on (a Voila page, a re-opened notebook) start from the
    figures' current data.

    A ``FigureWidget`` sends each change as a message to the views that exist; a view created
    later starts from ``_widget_data``/``_widget_layout``, which plotly sets only when the
    figure is created or displayed, so it would show the empty figure of the start.
    """
    for fig in figs:
        fig._widget_data = copy.deepcopy(fig._data)
        fig._widget_layout = copy.deepcopy(fig._layout_obj._props)


class ViewWatch:
    """Finds figures whose browser view stopped applying edits, so that a dashboard can rebuild them.

    Why: plotly's ``FigureWidget`` runs on anywidget, whose browser side (0.9.17 up to at
    least 0.11) gives each widget model 2 s from its creation to load and initialise its ES
    module. Past that its ``runtime.ready`` promise is rejected, and ``AnyModel._handle_comm_msg``,
    which awaits it before every message from the kernel, drops every later update of that
    model, for good and without an error; the view keeps the state the page loaded with.
    Plotly's module is a 5 MB bundle that the browser evaluates once per figure, so when a
    page loads while its kernel is busy (a live dashboard on a running stream, a small
    machine) the later figures miss the 2 s: they stay frozen while the first one follows.
    The kernel cannot revive such a model; a new widget, whose model the loaded page creates
    alone, works.

    How it is seen from the kernel: a plotly view acknowledges each trace edit it applies
    (``_js2py_traceDeltas`` carrying the edit's id), and also its first drawing. A watched
    figure is stale when a view of it has drawn and a trace edit sent at least ``timeout_s``
    ago (counted from that drawing at the earliest) is still unacknowledged. With views in
    several browser pages, one page that still acknowledges hides a frozen one.

    Parameters
    ----------
    timeout_s : float
        How long a drawn view may leave an edit unacknowledged.
    """

    def __init__(self, timeout_s: float = 5.0):
        if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s must be a number > 0, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self._lock = threading.Lock()  # acknowledgements and checks may come from different threads
        self._figures: dict[int, _Watched] = {}

    def watch(self, fig: go.FigureWidget) -> None:
        watched = _Watched(fig._last_trace_edit_id)

        def on_ack(change):
            if change["new"] is None:  # plotly resets the trait once it has read the message
                return
            with self._lock:
                watched.acknowledged(change["new"]["trace_edit_id"], time.monotonic())

        watched.callback = on_ack
        with self._lock:
            self._figures[id(fig)] = watched
        fig.observe(on_ack, names="_js2py_traceDeltas")

    def forget(self, fig: go.FigureWidget) -> None:
        with self._lock:
            watched = self._figures.pop(id(fig))
        fig.unobserve(watched.callback, names="_js2py_traceDeltas")

    def sent(self, fig: go.FigureWidget) -> None:
        """Note the trace edits ``fig`` sent since the last call (call it after every update)."""
        with self._lock:
            self._figures[id(fig)].sent(fig._last_trace_edit_id, time.monotonic())

    def stale(self, fig: go.FigureWidget) -> bool:
        with self._lock:
            return self._figures[id(fig)].stale(time.monotonic(), self.timeout_s)

    def rebuild_stale(self, owner, names: Sequence[str], rows: Sequence[widgets.Box]) -> int:
        """Replace each stale figure among ``owner``'s attributes ``names`` by a new widget with
        its data and layout, in the attribute and in the ``rows`` that hold it (the old one is
        closed); how many were replaced."""
        replaced = 0
        for name in names:
            old = getattr(owner, name)
            if not self.stale(old):
                continue
            self.forget(old)
            new = go.FigureWidget(old)  # a new browser model
            old.close()
            self.watch(new)
            setattr(owner, name, new)
            for row in rows:
                row.children = tuple(new if child is old else child for child in row.children)
            replaced += 1
        return replaced


class _Watched:
    """One figure's edits as :class:`ViewWatch` sees them."""

    def __init__(self, last_edit: int):
        self.last_sent = last_edit
        self.last_acknowledged = -1  # (an acknowledgement can come before sent() is called)
        self.unacknowledged: deque[tuple[int, float]] = deque()  # (edit id, when sent), oldest first
        self.drawn_at: float | None = None  # first acknowledgement: a view has drawn
        self.callback = None

    def sent(self, edit: int, now: float) -> None:
        if edit > self.last_sent:
            self.last_sent = edit
            if edit > self.last_acknowledged:
                self.unacknowledged.append((edit, now))

    def acknowledged(self, edit: int, now: float) -> None:
        if self.drawn_at is None:
            self.drawn_at = now
        self.last_acknowledged = max(self.last_acknowledged, edit)
        while self.unacknowledged and self.unacknowledged[0][0] <= edit:
            self.unacknowledged.popleft()

    def stale(self, now: float, timeout_s: float) -> bool:
        return (self.drawn_at is not None and bool(self.unacknowledged)
                and now - max(self.unacknowledged[0][1], self.drawn_at) >= timeout_s)
