"""Termination statistics of an SGLang server: accumulated on the device, read out off the hot path.

Every decode layer adds its per-(request, KV head) counts, summed over requests, to one
preallocated device tensor (inside CUDA graphs too: the adds are captured). Every
``stats_interval`` decode steps, outside any graph, the tensor is copied to pinned host memory
without waiting and zeroed; the copy is read one interval later, when it has long landed, and
then published on the stats stream (``art_runtime.stats``, one message per layer) and added to
Prometheus counters.

A message aggregates the interval: its "batch" is one row named after the rank (``tp1``;
``pp1-tp0`` with pipeline stages, ``dp1-tp0`` with data-parallel replicas) whose
``visited_pages`` / ``selected_pages`` / ``visited_tokens`` are ``[H_kv]`` sums over the
interval's requests and steps (termination depth per head = visited / selected),
``stable_at`` is ``[[]]`` (not aggregated), ``kv_bytes_read`` and ``dense_kv_bytes`` are the
interval's bytes.
"""

from __future__ import annotations

import torch

from art_runtime.stats import StatsPublisher, StepStats

# Rows of the accumulator, each [layers, H_kv] int64, summed over requests and steps.
VISITED_PAGES, SELECTED_PAGES, VISITED_TOKENS, DENSE_TOKENS, NUM_ROWS = range(5)
PROMETHEUS_PREFIX = "sglang:art_"


def rank_address(address: str, rank: int) -> str:
    """Endpoint of rank ``rank``: TCP port ``+ rank``, or ``.rank`` after an ipc path (rank 0 unchanged)."""
    if rank == 0:
        return address
    if address.startswith("tcp://"):
        host, _, port = address.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"stats_address {address!r}: a multi-rank server needs an explicit port")
        return f"{host}:{int(port) + rank}"
    return f"{address}.{rank}"


_COUNTERS: dict | None = None


def prometheus_counters() -> dict:
    """The process's ART counters (created once: Prometheus refuses a metric registered twice)."""
    global _COUNTERS
    if _COUNTERS is None:
        from prometheus_client import Counter

        labels = ["rank"]
        _COUNTERS = {
            "selected": Counter(PROMETHEUS_PREFIX + "selected_pages_total",
                                "KV pages selected for ART decode, summed over layers, requests and KV heads", labels),
            "visited": Counter(PROMETHEUS_PREFIX + "visited_pages_total",
                               "KV pages ART decode read (the rest it skipped by terminating early)", labels),
            "bytes": Counter(PROMETHEUS_PREFIX + "kv_bytes_read_total",
                             "K/V and page-metadata bytes ART decode read", labels),
            "dense_bytes": Counter(PROMETHEUS_PREFIX + "kv_bytes_dense_total",
                                   "K/V bytes dense decode attention would have read", labels),
        }
    return _COUNTERS


class DecodeTelemetry:
    """Device-side accumulators plus their publication.

    Parameters
    ----------
    num_layers, num_kv_heads, num_qo_heads, head_dim : int
        Layers this rank runs and its heads.
    element_size : int
        Bytes per K/V element.
    metadata_bytes_per_page : int
        Page-metadata bytes the bound criterion reads per selected (page, KV head); 0 otherwise.
    device : torch.device
    rank : int
        Index of this process among the server's ranks (offsets the endpoint).
    rank_name : str
        Its name in messages and the Prometheus label ``rank`` (default ``tp<rank>``).
    stats_address : str or None
        Publish on this endpoint; ``None``: don't.
    stats_interval : int
        Decode steps per read-out.
    allow_remote : bool
    enable_metrics : bool
        Also update Prometheus counters (SGLang's ``--enable-metrics``).
    layer_offset : int
        Id of the first layer (pipeline parallelism).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, num_qo_heads: int, head_dim: int, element_size: int,
                 metadata_bytes_per_page: int, device, rank: int = 0, rank_name: str | None = None,
                 stats_address: str | None = None,
                 stats_interval: int = 16, allow_remote: bool = False, enable_metrics: bool = False,
                 layer_offset: int = 0):
        self.accumulator = torch.zeros((num_layers, 5, num_kv_heads), dtype=torch.int64, device=device)
        # Weight of each row of a batch: 0 for the padding rows of a CUDA-graph batch.
        self.row_weight = torch.ones(0, dtype=torch.int64, device=device)
        self.num_qo_heads, self.head_dim, self.element_size = num_qo_heads, head_dim, element_size
        self.metadata_bytes_per_page = metadata_bytes_per_page
        self.layer_offset, self.rank, self.interval = layer_offset, rank, stats_interval
        self.rank_name = f"tp{rank}" if rank_name is None else rank_name
        self.steps = 0
        self._pending = None  # (host copy, event or None, step)
        self.publisher = None
        if stats_address is not None:
            self.publisher = StatsPublisher(rank_address(stats_address, rank), allow_remote=allow_remote)
        self.counters = prometheus_counters() if enable_metrics else None


    def set_batch(self, batch: int, real: int) -> None:
        """Before a decode step (outside graphs): rows ``>= real`` of a ``batch``-row step are padding."""
        if self.row_weight.numel() < batch:
            self.row_weight = torch.ones(batch, dtype=torch.int64, device=self.accumulator.device)
        self.row_weight[:real].fill_(1)
        self.row_weight[real:].fill_(0)

    def record(self, layer_id: int, visited_pages, selected_pages, visited_tokens, seq_lens) -> None:
        """Add one layer's ``[B, H_kv]`` counts (device ops only: graph-capturable)."""
        weight = self.row_weight[: visited_pages.shape[0], None]
        acc = self.accumulator[layer_id - self.layer_offset]
        acc[VISITED_PAGES] += (visited_pages.long() * weight).sum(0)
        acc[SELECTED_PAGES] += (selected_pages.long() * weight).sum(0)
        acc[VISITED_TOKENS] += (visited_tokens.long() * weight).sum(0)
        acc[DENSE_TOKENS] += (seq_lens.long()[:, None] * weight).sum(0)
        acc[NUM_ROWS] += weight.sum()

    def step(self) -> None:
        """Count a decode step (outside graphs); every ``interval`` steps, read out."""
        self.steps += 1
        if self.steps % self.interval == 0 and (self.publisher is not None or self.counters is not None):
            self.flush()

    def flush(self) -> None:
        """Publish the previous read-out, start the next one (no wait on the device)."""
        if self._pending is not None:
            host, event, step = self._pending
            if event is not None:
                event.synchronize()  # issued an interval ago: already complete
            self._publish(host, step)
        acc = self.accumulator
        if acc.is_cuda:
            host = torch.empty(acc.shape, dtype=acc.dtype, pin_memory=True)
            host.copy_(acc, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = acc.clone(), None
        acc.zero_()
        self._pending = (host, event, self.steps)

    def _publish(self, host: torch.Tensor, step: int) -> None:
        kv_token_bytes = 2 * self.head_dim * self.element_size
        totals = {"selected": 0, "visited": 0, "bytes": 0, "dense_bytes": 0}
        for index, layer in enumerate(host.tolist()):
            kv_bytes = sum(layer[VISITED_TOKENS]) * kv_token_bytes \
                + sum(layer[SELECTED_PAGES]) * self.metadata_bytes_per_page
            dense = sum(layer[DENSE_TOKENS]) * kv_token_bytes
            totals["selected"] += sum(layer[SELECTED_PAGES])
            totals["visited"] += sum(layer[VISITED_PAGES])
            totals["bytes"] += kv_bytes
            totals["dense_bytes"] += dense
            if self.publisher is not None:
                self.publisher.publish(StepStats(
                    step=step, layer=index + self.layer_offset, request_ids=[self.rank_name],
                    visited_pages=[layer[VISITED_PAGES]], selected_pages=[layer[SELECTED_PAGES]],
                    visited_tokens=[layer[VISITED_TOKENS]], stable_at=[[]], kv_bytes_read=kv_bytes,
                    dense_kv_bytes=dense))
        if self.counters is not None:
            for name, value in totals.items():
                self.counters[name].labels(rank=self.rank_name).inc(value)

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
