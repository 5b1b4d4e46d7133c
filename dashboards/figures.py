"""Plotly ``FigureWidget`` pieces the live and the explore dashboards share."""

from __future__ import annotations

import copy

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
