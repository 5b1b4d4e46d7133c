"""Feeding the live dashboard: a decode loop's publisher, and a replay of ART over a capture.

:class:`DecodeStatsStreamer` is what any decode loop (the transformers integration, an
``art-runtime demo --live``, an SGLang backend) calls: once per step with the step's
sequence lengths, once per layer with the wrapper's ``last_stats``. It publishes schema
``art-runtime.stats/1`` messages (:mod:`art_runtime.stats`) with the dense byte count that
the dashboard needs for "bytes saved", and never blocks the loop.

:class:`CaptureReplay` is such a decode loop without a model: it decodes the captured
positions of a real attention capture through ``BatchARTDecodeWrapper`` (torch backend, on
the CPU) and :func:`start_replay` publishes its stats from a background thread, so that the
live notebook shows real values with no server running.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from art_runtime.analysis import CaptureBatch, build_batch, capture_info, load_capture_layers
from art_runtime.decode import BatchARTDecodeWrapper, DecodeStats
from art_runtime.page_metadata import PageMetadata
from art_runtime.policies import DensePolicy, PagePolicy
from art_runtime.stats import DEFAULT_ADDRESS, StatsPublisher, StepStats, dense_kv_bytes
from art_runtime.termination import TerminationConfig

from .captures import capture_path

PAGE_SIZE = 16


class DecodeStatsStreamer:
    """Publishes a decode loop's per-layer ART stats for the live dashboard; never blocks.

    Parameters
    ----------
    address : str
        Endpoint to bind (loopback unless ``allow_remote=True`` is passed through); ``*`` as
        the port picks a free one, see :attr:`address`.
    **publisher_kwargs
        Passed to :class:`art_runtime.stats.StatsPublisher` (``queue_size``, ``sndhwm``, ...).

    Examples
    --------
    >>> streamer = DecodeStatsStreamer("tcp://127.0.0.1:5557")          # doctest: +SKIP
    >>> for step in range(steps):                                        # doctest: +SKIP
    ...     streamer.begin_step(step, seq_lens, num_kv_heads=2, head_dim=64, element_size=2,
    ...                         request_ids=ids)
    ...     for layer in range(num_layers):
    ...         out = wrapper.run(q[layer], caches[layer], layer_id=layer)
    ...         streamer.publish_layer(layer, wrapper.last_stats)
    >>> streamer.close()                                                 # doctest: +SKIP
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, **publisher_kwargs):
        self.publisher = StatsPublisher(address, **publisher_kwargs)
        self._step: int | None = None
        self._request_ids: list | None = None
        self._dense_kv_bytes: int | None = None

    @property
    def address(self) -> str:
        """The bound endpoint (with the port ZMQ chose for ``*``): what a dashboard connects to."""
        return self.publisher.address

    def begin_step(self, step: int, seq_lens: Sequence[int], *, num_kv_heads: int, head_dim: int,
                   element_size: int, request_ids: Sequence | None = None) -> None:
        """Start decode step ``step``: ``seq_lens`` (host ints, one per request, the tokens each
        request attends this step) give the bytes a dense read would take."""
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"step must be an int, got {step!r}")
        seq_lens = [int(n) for n in seq_lens]
        if request_ids is not None and len(request_ids) != len(seq_lens):
            raise ValueError(f"request_ids must hold one id per request ({len(seq_lens)}), got {len(request_ids)}")
        self._step = step
        self._request_ids = None if request_ids is None else list(request_ids)
        self._dense_kv_bytes = dense_kv_bytes(seq_lens, num_kv_heads, head_dim, element_size)

    @property
    def dense_kv_bytes(self) -> int | None:
        """Bytes a dense read of the current step takes, per layer (``None`` before a step)."""
        return self._dense_kv_bytes

    def publish_layer(self, layer: int, stats: DecodeStats) -> bool:
        """Publish one layer's ``wrapper.last_stats`` for the current step (no host sync).

        Returns ``False`` when the message was dropped (counted by the publisher).
        """
        if self._step is None:
            raise ValueError("stats: call begin_step() before publish_layer()")
        return self.publisher.publish_decode_stats(stats, step=self._step, layer=layer, request_ids=self._request_ids,
                                                   dense_kv_bytes=self._dense_kv_bytes)

    def close(self, flush_s: float = 1.0) -> None:
        """Send what is queued (up to ``flush_s`` seconds) and close the socket."""
        self.publisher.close(flush_s)

    def __enter__(self) -> "DecodeStatsStreamer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ReplayStep:
    """One layer of one replayed decode step: what the replay ran and published."""

    step: int
    layer: int
    stats: DecodeStats


@dataclass
class _ReplayLayer:
    layer: int
    batch: CaptureBatch  # one request per captured query: the rows a step picks from
    meta: PageMetadata
    scaling: float


class CaptureReplay:
    """ART decode steps over a capture's real queries, keys and values, as a server runs them.

    A capture holds one text; the replay serves it as ``num_requests`` requests that read the
    same text at staggered positions: at step ``s`` request ``r`` decodes captured query
    ``r * stagger + s`` (position ``n_tokens - Q + r * stagger + s``) over its causal prefix,
    so every request grows by one token per step, for ``Q - (num_requests - 1) * stagger``
    steps. Every (step, layer) is one ``BatchARTDecodeWrapper`` plan and run (torch backend)
    with the capture's own attention scale and page metadata built from the paged cache.

    Parameters
    ----------
    capture : str or Path, optional
        See :func:`~art_runtime.dashboards.captures.capture_path`; default the SmolLM2 capture.
    num_requests : int
        Requests per batch.
    stagger : int, optional
        Positions between consecutive requests; default ``Q // (2 * num_requests)``.
    termination : TerminationConfig, optional
        Default ``TerminationConfig()`` (the project's defaults).
    policy : PagePolicy, optional
        Default ``DensePolicy()`` (every page, order ``auto``). Policies that keep per-request
        state are rejected: a replayed request has no history.
    layers : sequence of int, optional
        Capture layers to run; default all.
    page_size : int
        Tokens per page.
    """

    def __init__(self, capture=None, *, num_requests: int = 4, stagger: int | None = None,
                 termination: TerminationConfig | None = None, policy: PagePolicy | None = None,
                 layers: Sequence[int] | None = None, page_size: int = PAGE_SIZE):
        if not isinstance(num_requests, int) or num_requests < 1:
            raise ValueError(f"num_requests must be an int >= 1, got {num_requests!r}")
        if stagger is not None and (not isinstance(stagger, int) or stagger < 1):
            raise ValueError(f"stagger must be an int >= 1 or None, got {stagger!r}")
        termination = TerminationConfig() if termination is None else termination
        if not isinstance(termination, TerminationConfig):
            raise ValueError(f"termination must be a TerminationConfig, got {type(termination).__name__}")
        policy = DensePolicy() if policy is None else policy
        if not isinstance(policy, PagePolicy):
            raise ValueError(f"policy must be an art_runtime.policies.PagePolicy, got {type(policy).__name__}")
        if policy.stateful:
            raise ValueError(f"policy: {policy.name} keeps per-request state, which a replay cannot provide")
        self.path = capture_path(capture)
        self.info = capture_info(self.path)
        self.termination, self.policy, self.page_size = termination, policy, page_size
        self.layers_data = [self._prepare(data) for data in load_capture_layers(self.path, layers)]
        first = self.layers_data[0].batch
        self.num_captured = first.q.shape[0]
        self.num_qo_heads = first.q.shape[1]
        self.num_kv_heads, self.head_dim = first.cache.shape[3], first.cache.shape[4]
        self.element_size = first.cache.element_size()  # bytes counted as the wrapper reads them (fp32)
        if stagger is None:
            stagger = max(1, self.num_captured // (2 * num_requests))
        self.num_steps = self.num_captured - (num_requests - 1) * stagger
        if self.num_steps < 1:
            raise ValueError(f"num_requests: {num_requests} requests {stagger} positions apart do not fit the "
                             f"{self.num_captured} captured queries")
        self.num_requests, self.stagger = num_requests, stagger
        self.request_ids = [f"req-{r}" for r in range(num_requests)]

    @property
    def layers(self) -> list[int]:
        return [d.layer for d in self.layers_data]

    def _prepare(self, data) -> _ReplayLayer:
        batch = build_batch(data.keys, data.values, data.queries, data.n_tokens, None, self.page_size)
        return _ReplayLayer(data.layer, batch, PageMetadata.from_cache(batch.cache, *batch.page_table), data.scaling)

    def rows(self, step: int) -> list[int]:
        """Captured query indices the requests decode at ``step``."""
        if not isinstance(step, int) or not 0 <= step < self.num_steps:
            raise ValueError(f"step must be an int in 0..{self.num_steps - 1}, got {step!r}")
        return [r * self.stagger + step for r in range(self.num_requests)]

    def seq_lens(self, step: int) -> list[int]:
        """Tokens each request attends at ``step``."""
        return [self.layers_data[0].batch.lengths[r] for r in self.rows(step)]

    def run_step(self, step: int) -> Iterator[ReplayStep]:
        """Decode ``step`` layer by layer; yields each layer's stats right after its run."""
        rows = self.rows(step)
        for data in self.layers_data:
            batch = data.batch
            counts = (batch.kv_indptr[1:] - batch.kv_indptr[:-1])[rows]
            kv_indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int()
            kv_indices = torch.cat([batch.kv_indices[int(batch.kv_indptr[r]): int(batch.kv_indptr[r + 1])]
                                    for r in rows])
            wrapper = BatchARTDecodeWrapper(backend="torch")
            wrapper.plan(kv_indptr, kv_indices, batch.kv_last_page_len[rows].contiguous(), self.num_qo_heads,
                         self.num_kv_heads, self.head_dim, self.page_size, termination=self.termination,
                         sm_scale=data.scaling, policy=self.policy)
            wrapper.run(batch.q[rows], batch.cache, page_meta=data.meta, layer_id=data.layer)
            yield ReplayStep(step, data.layer, wrapper.last_stats)


class ReplayThread:
    """A :class:`CaptureReplay` publishing on a :class:`DecodeStatsStreamer` from a thread.

    Made by :func:`start_replay`. ``records`` maps ``(step, layer)`` to the
    :class:`~art_runtime.stats.StepStats` of what was published (host copies taken here, not
    read back from the stream), so that a check can compare what a subscriber shows with
    what was sent; it keeps the last pass over the capture (``num_steps`` steps).
    ``steps_published`` counts the steps published so far (safe to read from another thread,
    unlike iterating ``records`` while the thread runs). ``error`` holds the exception that
    stopped the thread, if any.
    """

    def __init__(self, replay: CaptureReplay, streamer: DecodeStatsStreamer, *, interval_s: float, repeat: bool):
        self.replay, self.streamer = replay, streamer
        self.interval_s, self.repeat = interval_s, repeat
        self.records: OrderedDict[tuple[int, int], StepStats] = OrderedDict()
        self.steps_published = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="art-replay", daemon=True)

    @property
    def address(self) -> str:
        return self.streamer.address

    def start(self) -> "ReplayThread":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            step = 0
            while not self._stop.is_set():
                replay, local_step = self.replay, step % self.replay.num_steps
                self.streamer.begin_step(step, replay.seq_lens(local_step), num_kv_heads=replay.num_kv_heads,
                                         head_dim=replay.head_dim, element_size=replay.element_size,
                                         request_ids=replay.request_ids)
                for item in replay.run_step(local_step):
                    self.streamer.publish_layer(item.layer, item.stats)
                    self.records[(step, item.layer)] = StepStats.from_decode_stats(
                        item.stats, step, item.layer, replay.request_ids, dense_kv_bytes=self.streamer.dense_kv_bytes)
                    if len(self.records) > replay.num_steps * len(replay.layers):
                        self.records.popitem(last=False)
                step += 1
                self.steps_published = step
                if step == self.replay.num_steps and not self.repeat:
                    break
                self._stop.wait(self.interval_s)
        except BaseException as exc:  # surfaced through .error and join(): a thread cannot raise
            self.error = exc

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the replay to end; ``True`` if it did. Raises what stopped it, if anything."""
        self._thread.join(timeout_s)
        if self.error is not None:
            raise RuntimeError("the capture replay failed") from self.error
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Stop after the current step and close the stream (queued messages are flushed)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.streamer.close()


def start_replay(capture=None, *, address: str = "tcp://127.0.0.1:*", interval_s: float = 0.05,
                 repeat: bool = False, start: bool = True, **replay_kwargs) -> ReplayThread:
    """Replay ART over a capture and publish its stats, from a background thread.

    Parameters
    ----------
    capture : str or Path, optional
        The capture (default SmolLM2, see :func:`~art_runtime.dashboards.captures.capture_path`).
    address : str
        Where to publish; loopback only. The default picks a free port: read ``.address``.
    interval_s : float
        Pause between decode steps.
    repeat : bool
        Start over after the last step (step numbers keep growing) until ``stop()``.
    start : bool
        Start publishing now; pass ``False`` to connect subscribers first and call ``start()``
        (PUB/SUB drops what is published before a subscriber is connected).
    **replay_kwargs
        Passed to :class:`CaptureReplay` (``num_requests``, ``termination``, ``policy``, ...).
    """
    if not isinstance(interval_s, (int, float)) or interval_s < 0:
        raise ValueError(f"interval_s must be a number >= 0, got {interval_s!r}")
    replay = CaptureReplay(capture, **replay_kwargs)
    thread = ReplayThread(replay, DecodeStatsStreamer(address), interval_s=float(interval_s), repeat=repeat)
    return thread.start() if start else thread
