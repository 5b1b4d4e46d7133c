"""Plotly ``FigureWidget`` pieces the live and the explore dashboards share."""

from __future__ import annotations

import copy

import plotly.graph_objects as go
import traitlets
from plotly.serializers import custom_serializers

DEPTH_COLORSCALE = "Viridis"


class _LastMessage(traitlets.Dict):
    """A plotly ``_py2js_*`` message trait that ignores the reset to ``None`` (see :class:`FigureWidget`)."""

    def validate(self, obj, value):
        if value is None:
            return obj._trait_values.get(self.name)
        return super().validate(obj, value)


def _last_message():
    return _LastMessage(default_value=None, allow_none=False).tag(sync=True, **custom_serializers)


class FigureWidget(go.FigureWidget):
    """A plotly ``FigureWidget`` whose edits reach the browser even when messages come fast.

    plotly sends every edit by setting a synced trait to the message and at once back to
    ``None``; the browser's view reads the trait when its change event fires, and drops the
    edit if it reads ``None`` by then. These traits keep the last message instead of going
    back to ``None`` (every message is new: it carries a fresh edit id), so each edit is one
    change. Measured with the browser test under Voila: with plain ``FigureWidget``s one run in
    three left a figure's view at the data it started with; with these, none in six.
    """

    _py2js_addTraces = _last_message()
    _py2js_deleteTraces = _last_message()
    _py2js_moveTraces = _last_message()
    _py2js_restyle = _last_message()
    _py2js_relayout = _last_message()
    _py2js_update = _last_message()
    _py2js_animate = _last_message()
    _py2js_removeTraceProps = _last_message()
    _py2js_removeLayoutProps = _last_message()


def figure(title: str, xtitle: str, ytitle: str, **layout) -> FigureWidget:
    """An empty figure widget of the dashboards' size and margins."""
    return FigureWidget(layout=go.Layout(title=title, xaxis_title=xtitle, yaxis_title=ytitle, height=340,
                                            margin=dict(l=60, r=20, t=50, b=50), **layout))


def heatmap_figure(title: str, hovertemplate: str, xtitle: str = "KV head", ytitle: str = "layer") -> FigureWidget:
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
