"""What the live dashboard shows, aggregated from stats messages; no UI, thread-safe.

:class:`LiveState` takes :class:`~art_runtime.stats.StepStats` messages (``add``) from any
thread and answers :meth:`LiveState.snapshot` with plain lists ready for the figures, for a
choice of request, layers and KV heads. Definitions (as in :mod:`art_runtime.stats`):

* depth of a (request, layer, KV head) = pages visited / pages selected;
* a heatmap cell (layer, KV head) shows the layer's latest step: its depth pooled over the
  shown requests, ``sum(visited) / sum(selected)`` (the fraction of selected pages read);
* the histogram holds the depth of every shown (request, layer, KV head) of those latest
  messages;
* bytes saved per step = ``sum over layers (dense_kv_bytes - kv_bytes_read)`` of the
  messages received for that step (a repeated (step, layer) message replaces the earlier one) (batch-wide: a message does not split bytes by request);
* per request: mean depth over the shown layers and heads, per step.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

from art_runtime.stats import StepStats


@dataclass
class Snapshot:
    """Figure-ready data of one :meth:`LiveState.snapshot` (plain lists, NaN where nothing arrived)."""

    layers: list[int]
    heads: list[int]
    depth: list[list[float]]  # [layer][head]
    visited: list[list[int]]  # [layer][head], summed over the shown requests
    selected: list[list[int]]
    layer_steps: list[int | None]  # the step each heatmap row comes from
    histogram: list[float]  # depth of every shown (request, layer, head)
    steps: list[int]  # steps with byte counts, oldest first
    bytes_read: list[int]
    bytes_saved: list[int | None]  # None: the publisher sent no dense byte count
    request_depth: dict = field(default_factory=dict)  # request id -> (steps, mean depth)
    messages: int = 0
    request: object = None


class LiveState:
    """Aggregates stats messages for the live dashboard (see the module docstring).

    Parameters
    ----------
    history : int
        Steps kept for the time series (bytes saved, per-request depth); older ones are
        forgotten.
    """

    def __init__(self, history: int = 500):
        if not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be an int >= 1, got {history!r}")
        self.history = history
        self._lock = threading.Lock()
        self._latest: dict[int, StepStats] = {}  # layer -> its newest message
        self._bytes: OrderedDict[int, dict] = OrderedDict()  # step -> layer -> (read, dense or None)
        # step -> layer -> {request id: [H_kv] depths}: what per-request series are made of
        self._depths: OrderedDict[int, dict[int, dict]] = OrderedDict()
        self._requests: dict = {}  # insertion-ordered set of the request ids seen
        self.num_heads = 0
        self.messages = 0
        self.version = 0  # bumps on every change: a view re-renders only when it moved

    def add(self, msg: StepStats) -> None:
        """Take one message (any thread)."""
        depths = msg.depth()
        with self._lock:
            latest = self._latest.get(msg.layer)
            if latest is None or msg.step >= latest.step:
                self._latest[msg.layer] = msg
            self.num_heads = max(self.num_heads, max((len(row) for row in depths), default=0))
            for rid in msg.request_ids:
                self._requests.setdefault(rid, None)
            self._bytes.setdefault(msg.step, {})[msg.layer] = (msg.kv_bytes_read, msg.dense_kv_bytes)
            self._depths.setdefault(msg.step, {})[msg.layer] = dict(zip(msg.request_ids, depths))
            for series in (self._bytes, self._depths):
                while len(series) > self.history:
                    series.popitem(last=False)
            self.messages += 1
            self.version += 1

    @property
    def layers(self) -> list[int]:
        with self._lock:
            return sorted(self._latest)

    @property
    def request_ids(self) -> list:
        with self._lock:
            return list(self._requests)

    def snapshot(self, request=None, layers: Sequence[int] | None = None,
                 heads: Sequence[int] | None = None) -> Snapshot:
        """Figure data for one request (``None``: all), some layers and KV heads (``None``: all)."""
        with self._lock:
            all_layers = sorted(self._latest)
            wanted = set(layers or all_layers)
            layers = [layer for layer in all_layers if layer in wanted]
            heads = sorted(h for h in set(heads or range(self.num_heads)) if 0 <= h < self.num_heads)
            depth, visited, selected, layer_steps, histogram = [], [], [], [], []
            for layer in layers:
                msg = self._latest[layer]
                rows = [b for b, rid in enumerate(msg.request_ids) if request is None or rid == request]
                layer_steps.append(msg.step if rows else None)
                v = [sum(msg.visited_pages[b][h] for b in rows) for h in heads]
                s = [sum(msg.selected_pages[b][h] for b in rows) for h in heads]
                visited.append(v)
                selected.append(s)
                depth.append([vi / si if si else math.nan for vi, si in zip(v, s)])
                msg_depth = msg.depth()
                histogram += [msg_depth[b][h] for b in rows for h in heads]
            steps = list(self._bytes)
            per_step = [list(self._bytes[s].values()) for s in steps]
            bytes_read = [sum(read for read, _ in layers) for layers in per_step]
            bytes_saved = [None if any(dense is None for _, dense in layers) else sum(d - r for r, d in layers)
                           for layers in per_step]
            request_depth = {}
            for rid in self._requests if request is None else [request]:
                xs, ys = [], []
                for step, per_layer in self._depths.items():
                    values = [d[h] for layer in layers if rid in per_layer.get(layer, {})
                              for d in [per_layer[layer][rid]] for h in heads]
                    if values:
                        xs.append(step)
                        ys.append(sum(values) / len(values))
                request_depth[rid] = (xs, ys)
            return Snapshot(layers, heads, depth, visited, selected, layer_steps, histogram, steps, bytes_read,
                            bytes_saved, request_depth, self.messages, request)
