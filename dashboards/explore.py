"""Explore mode: what a termination setting and a page policy would do on a real capture.

No server: :class:`ExploreModel` loads a capture (default SmolLM2-135M on *Pride and
Prejudice*, see :mod:`~art_runtime.dashboards.captures`), turns a few evenly spaced captured
queries per layer into a decode batch (``art_runtime.analysis.build_batch``: each query a
request over its causal prefix, paged as FlashInfer pages it) and runs it through
``BatchARTDecodeWrapper(backend="torch")``, the semantic oracle of the kernel, so the depths
are what the kernel does. Exact float64 attention over each whole prefix
(``analysis.exact_attention``) is computed once per layer, and every result is cached, so
moving a control back is instant and a new setting costs a few torch runs (about 0.05-0.3 s
per layer and setting on one CPU core with 8 queries of the 8K-token capture).

Error of a query head = ``|o - o_exact|`` over ``|o_exact|`` (``relative_to="output"``) or
over the largest value norm of its prefix (``"values"``), against exact attention over *all*
pages: a budgeted policy's loss counts. The error-versus-pages curve scales the current
mode's thresholds (stability: ``tau_mag`` by ``s`` and ``tau_dir`` by ``s**2``; other
modes: ``eps`` by ``s``) over :data:`SWEEP_SCALES`, the current setting being ``s = 1``.

:class:`ExploreDashboard` is the widget view of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import Sequence

import ipywidgets as widgets
import torch

from art_runtime.analysis import build_batch, capture_info, exact_attention, load_capture_layers, setting_label
from art_runtime.decode import BatchARTDecodeWrapper
from art_runtime.page_metadata import PageMetadata
from art_runtime.policies import REGISTRY, get
from art_runtime.termination import DEFAULT_EPS, MODES, RELATIVE_TO, TerminationConfig

from .captures import capture_path
from .figures import ViewWatch, figure, heatmap_figure, sync_late_views

PAGE_SIZE = 16
DEFAULT_QUERIES = 8
DEFAULT_BUDGET = 64
SWEEP_SCALES = (0.01, 0.1, 1.0, 10.0, 100.0)
# Thresholds a sweep scales, with the power of the scale each gets; modes not listed scale eps.
_SWEPT = {"off": (), "stability": (("tau_mag", 1), ("tau_dir", 2))}
_DEFAULT_SWEPT = (("eps", 1),)


def explore_policies() -> list[str]:
    """Registered policies a capture can drive: those without per-request state (SnapKV and
    H2O need a request's prefill or decode history, which a capture snapshot does not hold)."""
    return [name for name, cls in REGISTRY.items() if not cls.stateful]


def make_policy(name: str, budget: int):
    """Policy ``name`` with ``budget`` pages in all (forced pages included), where it has one.

    Policies with a ``budget`` field get it; a sink-and-window policy gets the window that
    makes ``sink_pages + window_pages == budget``; dense ignores it.
    """
    if name not in explore_policies():
        raise ValueError(f"policy must be one of {explore_policies()}, got {name!r}")
    fields = {f.name: f for f in dataclasses.fields(REGISTRY[name])}
    if "budget" in fields:
        return get(name, budget=budget)
    if "window_pages" in fields:
        return get(name, window_pages=budget - fields["sink_pages"].default)
    return get(name)


def budget_applies(name: str) -> bool:
    """Whether :func:`make_policy` uses the budget for policy ``name``."""
    names = {f.name for f in dataclasses.fields(REGISTRY[name])}
    return "budget" in names or "window_pages" in names


@dataclass(frozen=True)
class ExploreResult:
    """One setting run on every loaded layer.

    ``depth``/``visited``/``selected`` are ``[layer][KV head]``, pooled over the queries
    (depth = sum visited / sum selected); ``err_output``/``err_values`` are
    ``[layer][query][query head]``; ``pages_total`` counts every page of every prefix and KV
    head (a dense read).
    """

    config: TerminationConfig
    policy: str
    budget: int
    layers: tuple
    depth: list
    visited: list
    selected: list
    pages_read: int
    pages_total: int
    err_output: list
    err_values: list
    seconds: float

    @property
    def pages_fraction(self) -> float:
        """Pages read over all pages (not over the selection: a budget's savings count)."""
        return self.pages_read / self.pages_total

    def errors(self, relative_to: str = "output") -> torch.Tensor:
        """Every (layer, query, query head) error, flattened."""
        if relative_to not in RELATIVE_TO:
            raise ValueError(f"relative_to must be one of {RELATIVE_TO}, got {relative_to!r}")
        return torch.tensor(self.err_output if relative_to == "output" else self.err_values).flatten()

    def group_max_error(self, relative_to: str = "output") -> list:
        """``[layer][KV head]`` the worst error over the group's queries and query heads."""
        err = torch.tensor(self.err_output if relative_to == "output" else self.err_values)
        layers, queries, heads = err.shape
        kv = len(self.depth[0])
        return err.view(layers, queries, kv, heads // kv).amax(dim=(1, 3)).tolist()


@dataclass
class _Layer:
    layer: int
    batch: object
    meta: PageMetadata
    scaling: float
    o_exact: torch.Tensor  # [B, H_q, D] float64
    vscale: torch.Tensor  # [B, H_q]


class ExploreModel:
    """Termination settings and policies on a capture, recomputed exactly (no UI).

    Parameters
    ----------
    capture : str or Path, optional
        Default the SmolLM2 capture.
    layers : sequence of int, optional
        Capture layers to load (default all: two in the shared captures).
    queries : int
        Evenly spaced captured queries per layer, one request each.
    page_size : int
        Tokens per page.
    """

    def __init__(self, capture=None, *, layers: Sequence[int] | None = None, queries: int = DEFAULT_QUERIES,
                 page_size: int = PAGE_SIZE):
        if not isinstance(queries, int) or queries < 1:
            raise ValueError(f"queries must be an int >= 1, got {queries!r}")
        self.path = capture_path(capture)
        self.info = capture_info(self.path)
        self.page_size = page_size
        self._layers = []
        for data in load_capture_layers(self.path, layers):
            batch = build_batch(data.keys, data.values, data.queries, data.n_tokens, queries, page_size)
            o_exact, vscale = exact_attention(data.keys, data.values, batch.q, batch.lengths, data.scaling)
            self._layers.append(_Layer(data.layer, batch, PageMetadata.from_cache(batch.cache, *batch.page_table),
                                       data.scaling, o_exact, vscale))
        first = self._layers[0].batch
        self.num_qo_heads = first.q.shape[1]
        self.num_kv_heads, self.head_dim = first.cache.shape[3], first.cache.shape[4]
        self.max_pages = int((first.kv_indptr[1:] - first.kv_indptr[:-1]).max())
        self._cache: dict = {}

    @property
    def layers(self) -> tuple:
        return tuple(d.layer for d in self._layers)

    @property
    def num_queries(self) -> int:
        return self._layers[0].batch.q.shape[0]

    def run(self, config: TerminationConfig, policy: str = "dense", budget: int = DEFAULT_BUDGET) -> ExploreResult:
        """Run ``config`` under ``policy`` (``budget`` pages) on every layer; cached."""
        if not isinstance(config, TerminationConfig):
            raise ValueError(f"config must be a TerminationConfig, got {type(config).__name__}")
        key = (config, policy, budget if budget_applies(policy) else None)
        if key not in self._cache:
            self._cache[key] = self._run(config, policy, budget)
        return self._cache[key]

    def _run(self, config, policy_name, budget) -> ExploreResult:
        start = time.perf_counter()
        policy = make_policy(policy_name, budget)
        depth, visited, selected, err_o, err_v = [], [], [], [], []
        pages_read = pages_total = 0
        for d in self._layers:
            wrapper = BatchARTDecodeWrapper(backend="torch")
            wrapper.plan(*d.batch.page_table, self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size,
                         termination=config, sm_scale=d.scaling, policy=policy)
            out = wrapper.run(d.batch.q, d.batch.cache, page_meta=d.meta, layer_id=d.layer).double()
            stats = wrapper.last_stats
            v, s = stats.visited_pages.long().sum(0), stats.selected_pages.long().sum(0)
            visited.append(v.tolist())
            selected.append(s.tolist())
            depth.append((v.double() / s.double()).tolist())
            pages_read += int(stats.visited_pages.long().sum())
            pages_total += int((d.batch.kv_indptr[1:] - d.batch.kv_indptr[:-1]).long().sum()) * self.num_kv_heads
            err = (out - d.o_exact).norm(dim=-1)
            err_o.append((err / d.o_exact.norm(dim=-1)).tolist())
            err_v.append((err / d.vscale).tolist())
        return ExploreResult(config, policy_name, budget, self.layers, depth, visited, selected, pages_read,
                             pages_total, err_o, err_v, time.perf_counter() - start)

    def sweep(self, config: TerminationConfig, policy: str = "dense", budget: int = DEFAULT_BUDGET,
              scales: Sequence[float] = SWEEP_SCALES) -> list[ExploreResult]:
        """``config`` with its mode's thresholds scaled by each of ``scales`` (see the module
        docstring); one result for mode ``off``, which has none."""
        swept = _SWEPT.get(config.mode, _DEFAULT_SWEPT)
        if not swept:
            return [self.run(config, policy, budget)]
        return [self.run(dataclasses.replace(config, **{name: getattr(config, name) * s ** power
                                                         for name, power in swept}), policy, budget)
                for s in scales]


class ExploreDashboard:
    """Controls for a termination setting and a policy; heatmap and error-vs-pages recompute.

    Parameters
    ----------
    model : ExploreModel, optional
        Default ``ExploreModel()`` (the SmolLM2 capture).
    config : TerminationConfig, optional
        The starting setting (default ``TerminationConfig()``).
    view_timeout_s : float
        How long a figure's browser view may leave an update unacknowledged before the figure
        is rebuilt in its place (a page loaded on a busy machine can leave a plotly figure
        deaf to updates: see :class:`~art_runtime.dashboards.figures.ViewWatch`); checked
        ``view_timeout_s`` after each recompute when the dashboard was made in a notebook
        (on the kernel's event loop), and at each recompute.

    Attributes
    ----------
    controls : dict of str to ipywidgets.Widget
        ``mode``, ``tau_mag``, ``tau_dir``, ``patience``, ``eps``, ``min_pages``,
        ``relative_to``, ``policy``, ``budget``; setting one recomputes.
    heatmap, curve : plotly.graph_objects.FigureWidget
        (a rebuilt figure replaces the attribute)
    views_rebuilt : int
        Figures rebuilt because their browser view had stopped applying updates.
    result : ExploreResult
        What the figures show.
    """

    def __init__(self, model: ExploreModel | None = None, config: TerminationConfig | None = None, *,
                 view_timeout_s: float = 5.0):
        if not isinstance(view_timeout_s, (int, float)) or not view_timeout_s > 0:
            raise ValueError(f"view_timeout_s must be a number > 0, got {view_timeout_s!r}")
        self._views = ViewWatch(view_timeout_s)
        self.views_rebuilt = 0
        try:  # the kernel's loop when made in a notebook cell: it runs the later checks of the views
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self.model = ExploreModel() if model is None else model
        config = TerminationConfig() if config is None else config
        slider = dict(continuous_update=False, readout_format=".1e", style={"description_width": "70px"})
        self.controls = {
            "mode": widgets.Dropdown(options=list(MODES), value=config.mode, description="mode"),
            "tau_mag": widgets.FloatLogSlider(value=config.tau_mag, min=-6, max=0, description="tau_mag", **slider),
            "tau_dir": widgets.FloatLogSlider(value=config.tau_dir, min=-12, max=0, description="tau_dir", **slider),
            "patience": widgets.IntSlider(value=config.patience, min=1, max=8, description="patience",
                                          continuous_update=False),
            # a mode without eps (stability) starts the slider at mass's default
            "eps": widgets.FloatLogSlider(value=config.eps if config.reads_page_metadata else DEFAULT_EPS["mass"],
                                          min=-4, max=0, description="eps", **slider),
            "min_pages": widgets.IntSlider(value=config.min_pages, min=0, max=16, description="min_pages",
                                           continuous_update=False),
            "relative_to": widgets.Dropdown(options=list(RELATIVE_TO), value=config.relative_to,
                                            description="relative_to"),
            "policy": widgets.Dropdown(options=explore_policies(), value="dense", description="policy"),
            "budget": widgets.IntSlider(value=min(DEFAULT_BUDGET, self.model.max_pages), min=2,
                                        max=self.model.max_pages, description="budget", continuous_update=False),
        }
        self._block_pages = config.block_pages
        self.status = widgets.HTML()
        self.heatmap = heatmap_figure(
            "termination depth (pages visited / selected), pooled over queries",
            "layer %{y}, KV head %{x}<br>depth %{z:.3f}<br>pages visited %{customdata[0]} / selected "
            "%{customdata[1]}<br>worst error in the group %{customdata[2]:.2e}<extra></extra>")
        self.curve = figure("error vs pages read (sweep of the thresholds)", "pages read, % of all pages", "error",
                          yaxis_type="log")
        self.curve.update_xaxes(range=[0, 102])
        for name, dash in (("max over heads", "solid"), ("mean", "dot")):
            self.curve.add_scatter(x=[], y=[], name=name, mode="lines+markers", line_dash=dash,
                                   customdata=[], hovertemplate="%{customdata}<br>pages %{x:.1f}%<br>error %{y:.2e}")
        self.curve.add_scatter(x=[], y=[], name="current setting", mode="markers",
                               marker=dict(size=14, symbol="star", color="#fde725", line=dict(width=1)))
        for fig in (self.heatmap, self.curve):
            self._views.watch(fig)
        for control in self.controls.values():
            control.observe(lambda _: self.recompute(), names="value")
        names = list(self.controls)
        self._row = widgets.HBox([self.heatmap, self.curve])
        self.widget = widgets.VBox([
            widgets.HBox([widgets.VBox([self.controls[n] for n in names[:5]]),
                          widgets.VBox([self.controls[n] for n in names[5:]])]),
            self.status,
            self._row,
        ])
        self.result: ExploreResult | None = None
        self.recompute()

    def config(self) -> TerminationConfig:
        """The setting the controls describe (``ValueError`` if they describe none)."""
        values = {name: self.controls[name].value for name in
                  ("mode", "tau_mag", "tau_dir", "patience", "eps", "min_pages", "relative_to")}
        return TerminationConfig(**values, block_pages=self._block_pages)

    def recompute(self) -> None:
        """Run the controls' setting and its sweep, and redraw (the controls call it)."""
        policy, budget = self.controls["policy"].value, self.controls["budget"].value
        self.controls["budget"].disabled = not budget_applies(policy)
        try:
            config = self.config()
        except ValueError as error:
            self.status.value = f"<b>invalid setting:</b> {error}"
            return
        self.status.value = "computing..."
        start = time.perf_counter()
        result = self.model.run(config, policy, budget)
        sweep = self.model.sweep(config, policy, budget)
        self._rebuild_frozen_figures()
        self._render(result, sweep, config.relative_to)
        if self._loop is not None:
            self._loop.call_later(self._views.timeout_s, self._rebuild_frozen_figures)
        self.result = result
        errors = result.errors(config.relative_to)
        self.status.value = (
            f"{setting_label(config)}, policy {policy}"
            + (f" (budget {budget} pages)" if budget_applies(policy) else "")
            + f": pages read {100 * result.pages_fraction:.1f}% of all; error relative to "
              f"{'|o|' if config.relative_to == 'output' else 'max|v|'}: max {float(errors.max()):.2e}, "
              f"mean {float(errors.mean()):.2e} ({self.model.num_queries} queries x layers "
              f"{list(result.layers)} of {self.model.path.name}; {time.perf_counter() - start:.2f} s)")

    def _render(self, result: ExploreResult, sweep: list, relative_to: str) -> None:
        group_err = result.group_max_error(relative_to)
        with self.heatmap.batch_update():
            hm = self.heatmap.data[0]
            hm.z = result.depth
            hm.x = [f"kv{h}" for h in range(len(result.depth[0]))]
            hm.y = [f"L{layer}" for layer in result.layers]
            hm.customdata = [[[v, s, e] for v, s, e in zip(vr, sr, er)]
                             for vr, sr, er in zip(result.visited, result.selected, group_err)]
        floor = 1e-9  # exact attention has error 0: keep it on the log axis
        xs = [100 * r.pages_fraction for r in sweep]
        with self.curve.batch_update():
            worst, mean, current = self.curve.data
            worst.x = mean.x = xs
            worst.y = [max(float(r.errors(relative_to).max()), floor) for r in sweep]
            mean.y = [max(float(r.errors(relative_to).mean()), floor) for r in sweep]
            worst.customdata = mean.customdata = [setting_label(r.config) for r in sweep]
            errors = result.errors(relative_to)
            current.x = [100 * result.pages_fraction] * 2
            current.y = [max(float(errors.max()), floor), max(float(errors.mean()), floor)]
            self.curve.layout.yaxis.title = f"error / {'|o_exact|' if relative_to == 'output' else 'max|v|'}"
        sync_late_views(self.heatmap, self.curve)
        for fig in (self.heatmap, self.curve):
            self._views.sent(fig)

    def _rebuild_frozen_figures(self) -> None:
        self.views_rebuilt += self._views.rebuild_stale(self, ("heatmap", "curve"), [self._row])

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
