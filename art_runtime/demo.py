"""The ``art-runtime demo`` job: ART decode per termination mode, against exact attention.

A batch of requests is paged into a FlashInfer-format cache (physical pages handed out in
shuffled order; requests that read the same token sequence share its full prefix pages, as
with prefix caching). Each decode step appends one token per request through
``append_paged_kv_cache(..., page_meta=meta)``, plans and runs ``BatchARTDecodeWrapper`` with
the dense visit order (sink page, current page, then newest to oldest). For every
termination mode it reports how deep each (request, KV head) read, the bytes read against
a dense read, the output error against exact float64 attention and the wall time per step.

Two workloads: :func:`synthetic_workload` (built in, structured like real attention) and
:func:`capture_workload` (real post-RoPE Q/K/V of a model, ``data/captures`` format).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TextIO

import torch
from tqdm import tqdm

from .backend import resolve_backend
from .decode import BatchARTDecodeWrapper
from .page_metadata import PageMetadata
from .paged_cache import allocate_paged_kv_cache, append_paged_kv_cache, get_batch_indices_positions
from .termination import MODES, TerminationConfig

_TERMINATION_DEFAULTS = TerminationConfig()

# Synthetic workload, in logit units (natural log) before each head's inverse temperature.
SINK_LOGIT = 12.0
HEAVY_HITTERS = 8  # per (request, KV head)
HEAVY_LOGIT_RANGE = (3.0, 7.0)
RECENT_LOGIT = 8.0
RECENT_DECAY_TOKENS = 32.0
BACKGROUND_LOGIT_STD = 1.0
BACKGROUND_RANK = 8  # real keys are low-rank: the background varies along a few axes only
INVERSE_TEMPERATURE_RANGE = (0.2, 4.0)  # spread over the KV heads' groups, diffuse to peaked
GROUP_TEMPERATURE_SPREAD = (0.8, 1.0)  # query heads of one group: this fraction of the group's
SINK_VALUE_SCALE = 0.1  # real sink tokens carry small values: attending to them is a no-op
STRUCTURE_DIMS = 3  # sink, heavy-hitter and recency axes; the background comes next
SHORTEST_CONTEXT_FRACTION = 7 / 8

SYNTHETIC_DEFAULTS = {"batch": 4, "kv_len": 4096, "num_qo_heads": 8, "num_kv_heads": 2, "head_dim": 64, "steps": 4}
CAPTURE_DEFAULT_STEPS = 1
SHAPE_OPTIONS = ("kv_len", "num_qo_heads", "num_kv_heads", "head_dim")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs; ``None`` fields take the workload's default (see ``SYNTHETIC_DEFAULTS``).

    The shape fields ``kv_len``, ``num_qo_heads``, ``num_kv_heads`` and ``head_dim`` describe
    the synthetic workload only; a capture brings its own. ``layer`` picks the capture's
    layer (default: its lowest). ``dtype``, ``device`` and ``backend`` accept ``"auto"``.
    The termination fields are those of ``TerminationConfig``, shared by every mode.
    """

    batch: int | None = None
    kv_len: int | None = None
    page_size: int = 16
    num_qo_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    backend: str = "auto"
    steps: int | None = None
    modes: tuple[str, ...] = ("off", "stability", "bound")
    tau_mag: float = _TERMINATION_DEFAULTS.tau_mag
    tau_dir: float = _TERMINATION_DEFAULTS.tau_dir
    patience: int = _TERMINATION_DEFAULTS.patience
    eps: float | None = None  # each mode's default (termination.DEFAULT_EPS)
    min_pages: int = _TERMINATION_DEFAULTS.min_pages
    relative_to: str = _TERMINATION_DEFAULTS.relative_to
    seed: int = 0
    capture: str | None = None
    layer: int | None = None
    json_path: str | None = None

    def termination(self, mode: str) -> TerminationConfig:
        """The ``TerminationConfig`` of ``mode`` with these thresholds."""
        return TerminationConfig(
            mode=mode, tau_mag=self.tau_mag, tau_dir=self.tau_dir, patience=self.patience,
            eps=self.eps, min_pages=self.min_pages, relative_to=self.relative_to,
        )


@dataclass
class Workload:
    """Keys, values and queries of a decode batch, before paging.

    Attributes
    ----------
    title : str
        One line saying what the workload is, for the report header.
    keys, values : torch.Tensor
        ``[num_sequences, tokens, H_kv, D]`` float32: the token sequences requests read.
    request_sequence : torch.Tensor
        ``[B]`` int64: the sequence request ``b`` reads (its token ``t`` is ``keys[s, t]``).
    context_lens : torch.Tensor
        ``[B]`` int64: tokens in each request's cache before the first decode step.
    queries : torch.Tensor
        ``[steps, B, H_qo, D]`` float32: at step ``s`` request ``b`` appends token
        ``context_lens[b] + s`` and decodes that position's query.
    sm_scale : float
        Logit scale of the attention.
    source : dict
        Where the workload comes from (written to the JSON report).
    """

    title: str
    keys: torch.Tensor
    values: torch.Tensor
    request_sequence: torch.Tensor
    context_lens: torch.Tensor
    queries: torch.Tensor
    sm_scale: float
    source: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.queries.shape[0]

    @property
    def batch_size(self) -> int:
        return self.queries.shape[1]

    @property
    def num_qo_heads(self) -> int:
        return self.queries.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[2]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[3]

    def tokens_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[..., H_kv, D]`` of every request at ``positions`` ``[..., B]``."""
        sequence = self.request_sequence.expand_as(positions)
        return self.keys[sequence, positions], self.values[sequence, positions]


def synthetic_workload(batch: int, kv_len: int, steps: int, num_qo_heads: int, num_kv_heads: int,
                       head_dim: int, seed: int) -> Workload:
    """A synthetic batch whose attention is structured like a real model's.

    Random keys and queries would make every head equally diffuse, so that no page could
    ever be skipped. Here the logit ``sm_scale * q.k`` of query head ``j`` and token ``t`` is
    ``beta_j * (structure_t + background_t)``, each part on its own key axes:

    * axis 0, the attention sink: token 0 scores ``SINK_LOGIT`` (12);
    * axis 1, heavy hitters: ``HEAVY_HITTERS`` (8) tokens per (request, KV head), at
      uniformly random positions of the context, score uniformly in ``HEAVY_LOGIT_RANGE``
      (3..7);
    * axis 2, the recent window: token ``t`` scores
      ``RECENT_LOGIT * exp(-(end - t) / RECENT_DECAY_TOKENS)`` (8, decay 32 tokens), with
      ``end`` the request's last position after all steps (keys are written once and never
      move, like post-RoPE keys in a cache; over a few steps the drift is negligible);
    * the next ``BACKGROUND_RANK`` (8) axes, a diffuse background: unit Gaussian keys and
      Gaussian queries drawn afresh at every step, scaled so that background logits are
      ``N(0, BACKGROUND_LOGIT_STD^2)`` (std 1); the remaining key axes are 0.

    ``beta_j`` is query head ``j``'s inverse temperature: KV head ``h`` of ``H_kv`` gets
    ``lo^(1-x) hi^x`` with ``x = (h + 1/2) / H_kv`` and ``(lo, hi) = INVERSE_TEMPERATURE_RANGE``
    (0.2, 4), so the first groups are near-uniform over thousands of tokens and the last
    ones nearly all sink, recent window and heavy hitters (with 2 KV heads: 0.42 and 1.9);
    the query heads of a group take ``GROUP_TEMPERATURE_SPREAD`` (0.8..1) of that, so a
    group stops only when its least peaked head allows. Values are unit Gaussian, except the
    sink's, scaled by ``SINK_VALUE_SCALE`` (0.1) as in real models. Request 0 holds
    ``kv_len`` context tokens, the others a uniformly random ``7/8 kv_len .. kv_len``, so
    their last pages fill differently. Every draw comes from
    ``torch.Generator().manual_seed(seed)``.

    Axis-aligned, low-rank keys make per-page key boxes (the ``bound`` criterion's
    metadata) tighter than on real keys, where they overshoot the largest logit by 10-15
    nats (``data/captures/README.md``): use ``capture_workload`` for the real picture.

    Parameters
    ----------
    batch, kv_len, steps : int
        Requests, context tokens of the longest request, decode steps.
    num_qo_heads, num_kv_heads, head_dim : int
        Attention shape; ``num_qo_heads`` a multiple of ``num_kv_heads``,
        ``head_dim >= 3 + BACKGROUND_RANK``.
    seed : int
        Seed of every random draw.

    Returns
    -------
    Workload
        One token sequence per request.
    """
    if head_dim < STRUCTURE_DIMS + BACKGROUND_RANK:
        raise ValueError(f"head_dim must be >= {STRUCTURE_DIMS + BACKGROUND_RANK} for the synthetic workload, "
                         f"got {head_dim}")
    if num_qo_heads % num_kv_heads:
        raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    gen = torch.Generator().manual_seed(seed)
    shortest = max(1, math.ceil(kv_len * SHORTEST_CONTEXT_FRACTION))
    context_lens = torch.randint(shortest, kv_len + 1, (batch,), generator=gen)
    context_lens[0] = kv_len
    total = kv_len + steps
    keys = _synthetic_keys(context_lens, total, steps, num_kv_heads, head_dim, gen)
    queries = _synthetic_queries(steps, batch, num_qo_heads, num_kv_heads, head_dim, gen)
    values = torch.randn(batch, total, num_kv_heads, head_dim, generator=gen)
    values[:, 0] *= SINK_VALUE_SCALE
    constants = ("SINK_LOGIT", "HEAVY_HITTERS", "HEAVY_LOGIT_RANGE", "RECENT_LOGIT", "RECENT_DECAY_TOKENS",
                 "BACKGROUND_LOGIT_STD", "BACKGROUND_RANK", "INVERSE_TEMPERATURE_RANGE",
                 "GROUP_TEMPERATURE_SPREAD", "SINK_VALUE_SCALE")
    return Workload(
        title="synthetic workload (sink, recent window, heavy hitters, diffuse background; not a real model)",
        keys=keys, values=values, request_sequence=torch.arange(batch), context_lens=context_lens,
        queries=queries, sm_scale=1.0 / math.sqrt(head_dim),
        source={"kind": "synthetic", "seed": seed, **{name.lower(): globals()[name] for name in constants}},
    )


def _synthetic_keys(context_lens, total, steps, num_kv_heads, head_dim, gen) -> torch.Tensor:
    """``[B, total, H_kv, D]`` keys: sink, heavy-hitter and recency axes, then the background.

    A key's value on a structure axis is the logit it gets from a query of inverse
    temperature 1, because queries carry ``sqrt(head_dim)`` (= 1 / sm_scale) on those axes.
    """
    batch = context_lens.numel()
    keys = torch.zeros(batch, total, num_kv_heads, head_dim)
    background = slice(STRUCTURE_DIMS, STRUCTURE_DIMS + BACKGROUND_RANK)
    keys[..., background] = torch.randn(batch, total, num_kv_heads, BACKGROUND_RANK, generator=gen)
    keys[:, 0, :, 0] = SINK_LOGIT
    low, high = HEAVY_LOGIT_RANGE
    heavy_shape = (batch, HEAVY_HITTERS, num_kv_heads)
    heavy_pos = 1 + (torch.rand(heavy_shape, generator=gen) * (context_lens[:, None, None] - 1)).long()
    heavy_logit = low + (high - low) * torch.rand(heavy_shape, generator=gen)
    requests = torch.arange(batch)[:, None, None].expand(heavy_shape)
    heads = torch.arange(num_kv_heads).expand(heavy_shape)
    keys[requests, heavy_pos.clamp(max=total - 1), heads, 1] = heavy_logit
    age = (context_lens[:, None] + steps - 1 - torch.arange(total)[None, :]).clamp(min=0).float()
    keys[..., 2] = (RECENT_LOGIT * torch.exp(-age / RECENT_DECAY_TOKENS))[:, :, None]
    return keys


def _synthetic_queries(steps, batch, num_qo_heads, num_kv_heads, head_dim, gen) -> torch.Tensor:
    """``[steps, B, H_qo, D]`` queries, each head scaled by its inverse temperature."""
    root_dim = math.sqrt(head_dim)
    queries = torch.zeros(steps, batch, num_qo_heads, head_dim)
    queries[..., :STRUCTURE_DIMS] = root_dim
    # With unit keys on BACKGROUND_RANK axes this std makes sm_scale * q.k ~ N(0, BACKGROUND_LOGIT_STD^2).
    background_std = BACKGROUND_LOGIT_STD * root_dim / math.sqrt(BACKGROUND_RANK)
    queries[..., STRUCTURE_DIMS:STRUCTURE_DIMS + BACKGROUND_RANK] = background_std * torch.randn(
        steps, batch, num_qo_heads, BACKGROUND_RANK, generator=gen)
    return queries * inverse_temperatures(num_qo_heads, num_kv_heads)[:, None]


def inverse_temperatures(num_qo_heads: int, num_kv_heads: int) -> torch.Tensor:
    """``[H_qo]`` inverse temperature of every query head (see ``synthetic_workload``)."""
    low, high = INVERSE_TEMPERATURE_RANGE
    position = (torch.arange(num_kv_heads) + 0.5) / num_kv_heads
    group_beta = low ** (1 - position) * high ** position
    spread = torch.linspace(*GROUP_TEMPERATURE_SPREAD, num_qo_heads // num_kv_heads)
    return (group_beta[:, None] * spread[None, :]).flatten()


def capture_workload(path: str | Path, layer: int | None, batch: int | None, steps: int) -> Workload:
    """A batch from a real attention capture (``data/captures/README.md`` format).

    The capture holds, per layer ``L``, ``L{L}.k`` and ``L{L}.v`` ``[H_kv, n_tokens, D]`` and
    ``L{L}.q_last`` ``[H_qo, Q, D]`` (fp16; ``Q = 64``), the queries of the last ``Q``
    positions: query ``i`` sits at position ``n_tokens - Q + i`` and attends keys ``0`` up to
    its own position. Request ``b`` starts from query ``first_b`` (context
    ``n_tokens - Q + first_b`` tokens); step ``s`` appends the key of its position and decodes
    query ``first_b + s``. The ``first_b`` are spread evenly over ``0 .. Q - steps``; all
    requests read the one token sequence, so they share its prefix pages.

    Parameters
    ----------
    path : str or Path
        The ``.safetensors`` file.
    layer : int or None
        Layer to use; ``None``: the lowest one in the file.
    batch : int or None
        Requests, at most ``Q - steps + 1``; ``None``: that many (one per query with
        ``steps == 1``).
    steps : int
        Decode steps, at most ``Q``.
    """
    try:
        from safetensors import safe_open
    except ImportError as error:
        raise ValueError("--capture needs the safetensors package: pip install safetensors "
                         "(or pip install 'art-runtime[eval]')") from error
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"capture file not found: {path}")
    with safe_open(str(path), framework="pt") as capture:
        metadata = capture.metadata() or {}
        layers = sorted(int(m.group(1)) for name in capture.keys() if (m := re.fullmatch(r"L(\d+)\.k", name)))
        if not layers:
            raise ValueError(f"{path} holds no L{{layer}}.k tensor: not an attention capture")
        layer = layers[0] if layer is None else layer
        if layer not in layers:
            raise ValueError(f"layer {layer} is not in {path.name}; it holds layers {layers}")
        keys, values, q_last = (capture.get_tensor(f"L{layer}.{part}").float() for part in ("k", "v", "q_last"))
    n_tokens, num_queries = keys.shape[1], q_last.shape[1]
    first_query = _capture_first_queries(num_queries, batch, steps)
    step_query = first_query[None, :] + torch.arange(steps)[:, None]  # [steps, B]
    model, text = metadata.get("model", "unknown model"), metadata.get("text", "unknown text")
    return Workload(
        title=f"real attention capture {path.name}: {model} on {text}, layer {layer}, {n_tokens} tokens",
        keys=keys.permute(1, 0, 2)[None], values=values.permute(1, 0, 2)[None],
        request_sequence=torch.zeros(first_query.numel(), dtype=torch.long),
        context_lens=n_tokens - num_queries + first_query,
        queries=q_last.permute(1, 0, 2)[step_query],
        sm_scale=float(metadata.get("scaling", 1.0 / math.sqrt(keys.shape[-1]))),
        source={"kind": "capture", "path": str(path), "model": model, "text": text, "layer": layer,
                "layers": layers, "n_tokens": n_tokens},
    )


def _capture_first_queries(num_queries: int, batch: int | None, steps: int) -> torch.Tensor:
    """First query index of each request: ``batch`` distinct ones spread over ``0 .. Q - steps``."""
    if not 1 <= steps <= num_queries:
        raise ValueError(f"steps must be in 1..{num_queries} for this capture ({num_queries} queries), got {steps}")
    max_batch = num_queries - steps + 1
    batch = max_batch if batch is None else batch
    if not 1 <= batch <= max_batch:
        raise ValueError(f"batch must be in 1..{max_batch} for this capture with {steps} steps "
                         f"({num_queries} queries: batch + steps - 1 <= {num_queries}), got {batch}")
    return torch.linspace(0, num_queries - steps, batch).round().long()


@dataclass
class PageLayout:
    """Where every token lives in a pool of physical pages.

    The full pages that all requests of a sequence hold before the first step (those below
    its shortest context) are shared by them: no request appends there. Each request owns
    the pages after those. A *segment* is a run of pages written by one owner: a sequence's
    shared prefix, or a request's private tail, which starts at the first unshared token.

    Attributes
    ----------
    page_size : int
    request_pages : list of torch.Tensor
        Physical page ids of each request's logical pages at its final length.
    segment_pages : list of torch.Tensor
        Physical page ids of each segment (shared prefixes first, then private tails).
    segment_sequence, segment_first_token : torch.Tensor
        ``[num_segments]`` int64: the sequence a segment holds tokens of, from which token.
    segment_request : torch.Tensor
        ``[num_segments]`` int64: the request owning a private tail, -1 for a shared prefix.
    num_pages : int
        Pages in the pool.
    """

    page_size: int
    request_pages: list
    segment_pages: list
    segment_sequence: torch.Tensor
    segment_first_token: torch.Tensor
    segment_request: torch.Tensor
    num_pages: int


def assign_pages(workload: Workload, page_size: int, seed: int) -> PageLayout:
    """Hand out physical pages in a random order, sharing each sequence's common full pages."""
    num_sequences = workload.keys.shape[0]
    sequence = workload.request_sequence
    shortest = torch.full((num_sequences,), torch.iinfo(torch.long).max).scatter_reduce(
        0, sequence, workload.context_lens, "amin")
    shared_pages = (shortest // page_size).tolist()
    final_pages = ((workload.context_lens + workload.steps + page_size - 1) // page_size).tolist()
    private_pages = [final_pages[b] - shared_pages[s] for b, s in enumerate(sequence.tolist())]
    num_pages = sum(shared_pages) + sum(private_pages)
    shuffled = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed))
    pool = iter(shuffled.split(shared_pages + private_pages))
    shared = [next(pool) for _ in range(num_sequences)]
    private = [next(pool) for _ in private_pages]
    shared_tokens = page_size * torch.tensor(shared_pages, dtype=torch.long)
    return PageLayout(
        page_size=page_size,
        request_pages=[torch.cat([shared[s], private[b]]) for b, s in enumerate(sequence.tolist())],
        segment_pages=shared + private,
        segment_sequence=torch.cat([torch.arange(num_sequences), sequence]),
        segment_first_token=torch.cat([torch.zeros(num_sequences, dtype=torch.long), shared_tokens[sequence]]),
        segment_request=torch.cat([torch.full((num_sequences,), -1), torch.arange(sequence.numel())]),
        num_pages=num_pages,
    )


@dataclass
class PageTable:
    """A CSR page table (FlashInfer's three int32 tensors) over some rows of tokens."""

    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor

    def as_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.kv_indptr, self.kv_indices, self.kv_last_page_len


def page_table(pages: list, lengths: torch.Tensor, page_size: int, device: torch.device) -> PageTable:
    """The page table of rows holding ``lengths`` tokens in the leading pages of ``pages``."""
    row_pages = ((lengths + page_size - 1) // page_size).tolist()
    indices = torch.cat([row[:n] for row, n in zip(pages, row_pages)])
    indptr = torch.zeros(len(row_pages) + 1, dtype=torch.long)
    indptr[1:] = torch.tensor(row_pages).cumsum(0)
    last = lengths - page_size * (torch.tensor(row_pages) - 1)
    return PageTable(*(t.to(device=device, dtype=torch.int32) for t in (indptr, indices, last)))


def segment_table(layout: PageLayout, request_lens: torch.Tensor, device: torch.device):
    """Page table over the non-empty segments when requests hold ``request_lens`` tokens.

    Every physical page in use appears exactly once.

    Returns
    -------
    table : PageTable
        On ``device``.
    sequence, first_token, lengths : torch.Tensor
        ``[rows]`` int64 on the CPU: each listed segment's sequence, first token and tokens.
    """
    shared_lens = torch.tensor([layout.page_size * len(p) for p in layout.segment_pages])
    owner = layout.segment_request
    lengths = torch.where(owner < 0, shared_lens, request_lens[owner.clamp(min=0)] - layout.segment_first_token)
    listed = (lengths > 0).nonzero().flatten()
    table = page_table([layout.segment_pages[i] for i in listed.tolist()], lengths[listed], layout.page_size, device)
    return table, layout.segment_sequence[listed], layout.segment_first_token[listed], lengths[listed]


def prefill_cache(workload: Workload, layout: PageLayout, dtype: torch.dtype, device: torch.device):
    """A paged cache holding every request's context, each shared page written once."""
    cache = allocate_paged_kv_cache(layout.num_pages, layout.page_size, workload.num_kv_heads, workload.head_dim,
                                    dtype=dtype, device=device)
    table, sequence, first_token, lengths = segment_table(layout, workload.context_lens, device)
    append_indptr = torch.zeros(lengths.numel() + 1, dtype=torch.long)
    append_indptr[1:] = lengths.cumsum(0)
    segment, position = get_batch_indices_positions(append_indptr, lengths, int(append_indptr[-1]))
    sequence_of_token, token = sequence[segment.long()], first_token[segment.long()] + position
    keys = workload.keys[sequence_of_token, token].to(device=device, dtype=dtype)
    values = workload.values[sequence_of_token, token].to(device=device, dtype=dtype)
    append_paged_kv_cache(keys, values, segment.to(device), position.to(device), cache, table.kv_indices,
                          table.kv_indptr, table.kv_last_page_len)
    return cache


def metadata_matches_rebuild(meta: PageMetadata, cache, layout: PageLayout, request_lens, device) -> bool:
    """Whether metadata kept current by appends equals one rebuilt from the cache."""
    table, _, _, _ = segment_table(layout, request_lens, device)
    rebuilt = PageMetadata.from_cache(cache, *table.as_args())
    return all(torch.allclose(mine.float(), theirs.float(), rtol=1e-5, atol=1e-6)
               for mine, theirs in ((meta.key_min, rebuilt.key_min), (meta.key_max, rebuilt.key_max),
                                    (meta.key_scale, rebuilt.key_scale), (meta.value_norm_max, rebuilt.value_norm_max)))


@dataclass
class ModeRun:
    """What one termination mode did over all steps.

    Attributes
    ----------
    termination : TerminationConfig
    outputs : torch.Tensor
        ``[steps, B, H_qo, D]`` float32 on the CPU.
    visited_pages, selected_pages : torch.Tensor
        ``[steps, B, H_kv]`` int64.
    bytes_read : list of int
        K/V (and, in bound mode, page metadata) bytes read at each step.
    step_seconds : list of float
        Wall time of each step: append, metadata update, plan and run.
    metadata_ok : bool or None
        Bound mode: whether the appended-to metadata equals a rebuild from the cache.
    """

    termination: TerminationConfig
    outputs: torch.Tensor
    visited_pages: torch.Tensor
    selected_pages: torch.Tensor
    bytes_read: list
    step_seconds: list
    metadata_ok: bool | None


class DecodeSession:
    """One mode's cache, metadata and wrapper, stepping the workload's requests forward."""

    def __init__(self, workload: Workload, layout: PageLayout, termination: TerminationConfig,
                 dtype: torch.dtype, device: torch.device, backend: str):
        self.workload, self.layout, self.termination, self.device = workload, layout, termination, device
        self.cache = prefill_cache(workload, layout, dtype, device)
        self.meta = None
        if termination.reads_page_metadata:
            table, _, _, _ = segment_table(layout, workload.context_lens, device)
            self.meta = PageMetadata.from_cache(self.cache, *table.as_args())
        positions = workload.context_lens[None, :] + torch.arange(workload.steps)[:, None]  # [steps, B]
        step_keys, step_values = workload.tokens_at(positions)
        self.step_keys = step_keys.to(device=device, dtype=dtype)
        self.step_values = step_values.to(device=device, dtype=dtype)
        self.queries = workload.queries.to(device=device, dtype=dtype)
        self.wrapper = BatchARTDecodeWrapper(kv_layout="NHD", backend=backend)

    def step(self, step: int) -> torch.Tensor:
        """Append token ``context + step`` of every request, then decode; float32 output.

        Appending the same token again rewrites identical values, so a step can be repeated.
        """
        workload = self.workload
        lens = workload.context_lens + step + 1
        table = page_table(self.layout.request_pages, lens, self.layout.page_size, self.device)
        batch = workload.batch_size
        batch_indices, positions = get_batch_indices_positions(
            torch.arange(batch + 1, dtype=torch.int32, device=self.device), lens.to(self.device), batch)
        append_paged_kv_cache(self.step_keys[step], self.step_values[step], batch_indices, positions, self.cache,
                              table.kv_indices, table.kv_indptr, table.kv_last_page_len, page_meta=self.meta)
        self.wrapper.plan(*table.as_args(), workload.num_qo_heads, workload.num_kv_heads, workload.head_dim,
                          self.layout.page_size, termination=self.termination, sm_scale=workload.sm_scale)
        # float32 output: the error measured is the kernel's and termination's, not bf16 rounding.
        out = torch.empty(self.queries.shape[1:], dtype=torch.float32, device=self.device)
        return self.wrapper.run(self.queries[step], self.cache, page_meta=self.meta, out=out)


def run_mode(workload: Workload, layout: PageLayout, termination: TerminationConfig, dtype: torch.dtype,
             device: torch.device, backend: str, progress: tqdm) -> ModeRun:
    """Run every decode step of ``workload`` in one termination mode, timing each step.

    Step 0 runs once untimed first, so that kernel compilation and first-touch allocations
    are not counted (it is repeatable: see ``DecodeSession.step``).
    """
    session = DecodeSession(workload, layout, termination, dtype, device, backend)
    session.step(0)
    outputs, visited, selected, bytes_read, seconds = [], [], [], [], []
    for step in range(workload.steps):
        _synchronize(device)
        start = time.perf_counter()
        out = session.step(step)
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
        stats = session.wrapper.last_stats
        outputs.append(out.cpu())
        visited.append(stats.visited_pages.cpu().long())
        selected.append(stats.selected_pages.cpu().long())
        bytes_read.append(int(stats.kv_bytes_read))
        progress.update()
    metadata_ok = None
    if session.meta is not None:
        final_lens = workload.context_lens + workload.steps
        metadata_ok = metadata_matches_rebuild(session.meta, session.cache, layout, final_lens, device)
    return ModeRun(termination, torch.stack(outputs), torch.stack(visited), torch.stack(selected),
                   bytes_read, seconds, metadata_ok)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def exact_attention(workload: Workload, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 dense attention of every step, on q, K and V rounded to ``dtype`` like the cache.

    Returns
    -------
    out : torch.Tensor
        ``[steps, B, H_qo, D]`` float64.
    value_scale : torch.Tensor
        ``[steps, B, H_kv]`` float64: the largest ``|v|`` of the request's tokens at that
        step (what ``relative_to="values"`` is relative to).
    """
    steps, batch, num_kv_heads = workload.steps, workload.batch_size, workload.num_kv_heads
    keys, values = (t.to(dtype).double() for t in (workload.keys, workload.values))
    queries = workload.queries.to(dtype).double().unflatten(2, (num_kv_heads, -1))  # [steps, B, H_kv, G, D]
    out = torch.empty(queries.shape, dtype=torch.float64)
    value_scale = torch.empty(steps, batch, num_kv_heads, dtype=torch.float64)
    step_positions = torch.arange(steps)
    for b, (sequence, context) in enumerate(zip(workload.request_sequence.tolist(), workload.context_lens.tolist())):
        end = context + steps
        logits = workload.sm_scale * torch.einsum("skgd,tkd->skgt", queries[:, b], keys[sequence, :end])
        future = torch.arange(end)[None, :] > (context + step_positions)[:, None]  # [steps, T]
        weights = logits.masked_fill(future[:, None, None, :], float("-inf")).softmax(-1)
        out[:, b] = torch.einsum("skgt,tkd->skgd", weights, values[sequence, :end])
        running_max = values[sequence, :end].norm(dim=-1).cummax(dim=0).values  # [T, H_kv]
        value_scale[:, b] = running_max[context + step_positions]
    return out.flatten(2, 3), value_scale


def summarize_mode(run: ModeRun, reference: torch.Tensor, value_scale: torch.Tensor, dense_read: int) -> dict:
    """Depth, bytes, error and time of one mode, as plain numbers (the JSON report's entry)."""
    group = reference.shape[2] // value_scale.shape[2]
    fraction = (run.visited_pages.double() / run.selected_pages.double()).flatten()
    distance = (run.outputs.double() - reference).norm(dim=-1)  # [steps, B, H_qo]
    relative = (distance / reference.norm(dim=-1)).flatten()
    value_relative = (distance / value_scale.repeat_interleave(group, dim=-1)).flatten()
    bytes_read = sum(run.bytes_read)
    return {
        "termination": asdict(run.termination),
        "depth": {
            "fraction_min": float(fraction.min()),
            "fraction_median": float(fraction.quantile(0.5)),
            "fraction_max": float(fraction.max()),
            "fraction_of_pages": float(run.visited_pages.sum() / run.selected_pages.sum()),
            "visited_pages": run.visited_pages.tolist(),
            "selected_pages": run.selected_pages.tolist(),
        },
        "bytes": {"read": bytes_read, "dense": dense_read, "saved_fraction": 1.0 - bytes_read / dense_read,
                  "per_step": run.bytes_read},
        "error": {
            "relative": relative.view(distance.shape).tolist(),
            "value_relative": value_relative.view(distance.shape).tolist(),
            "relative_max": float(relative.max()),
            "relative_p99": float(relative.quantile(0.99)),
            "value_relative_max": float(value_relative.max()),
            "value_relative_p99": float(value_relative.quantile(0.99)),
        },
        "step_seconds": {"median": float(torch.tensor(run.step_seconds).median()), "all": run.step_seconds},
        "metadata_matches_rebuild": run.metadata_ok,
    }


def dense_bytes(workload: Workload, element_size: int) -> int:
    """K and V bytes a dense decode reads over all steps."""
    tokens = sum((workload.context_lens + s + 1).sum().item() for s in range(workload.steps))
    return tokens * workload.num_kv_heads * 2 * workload.head_dim * element_size


def resolve_settings(settings: DemoSettings) -> tuple[DemoSettings, torch.device, torch.dtype, str]:
    """Fill the workload defaults and pick device, dtype and backend; ``ValueError`` if unusable."""
    unknown = [mode for mode in settings.modes if mode not in MODES]
    if unknown or not settings.modes:
        raise ValueError(f"modes must be a non-empty list of {MODES}, got {list(settings.modes)}")
    if settings.capture is not None:
        given = [name for name in SHAPE_OPTIONS if getattr(settings, name) is not None]
        if given:
            raise ValueError(f"a capture brings its own shape: drop {', '.join(_option(n) for n in given)}")
        if settings.steps is None:
            settings = replace(settings, steps=CAPTURE_DEFAULT_STEPS)
    else:
        settings = replace(settings, **{name: value for name, value in SYNTHETIC_DEFAULTS.items()
                                        if getattr(settings, name) is None})
    if settings.layer is not None and settings.capture is None:
        raise ValueError("--layer picks a layer of a capture: pass --capture too")
    settings.termination("off")  # checks the thresholds before any work
    device = _resolve_device(settings.device)
    dtype = _resolve_dtype(settings.dtype, device, settings.capture is not None)
    return settings, device, dtype, resolve_backend(settings.backend, device)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA GPU is available here")
    return device


def _resolve_dtype(name: str, device: torch.device, from_capture: bool) -> torch.dtype:
    """``auto``: float32 on the CPU; on CUDA float16 for a capture (its stored precision), else bfloat16."""
    if name != "auto":
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return torch.float16 if from_capture else torch.bfloat16


def build_workload(settings: DemoSettings) -> Workload:
    """The workload ``settings`` ask for (defaults already resolved)."""
    if settings.capture is not None:
        return capture_workload(settings.capture, settings.layer, settings.batch, settings.steps)
    for name in ("batch", "kv_len", "steps"):
        if getattr(settings, name) < 1:
            raise ValueError(f"{_option(name)} must be >= 1, got {getattr(settings, name)}")
    return synthetic_workload(settings.batch, settings.kv_len, settings.steps, settings.num_qo_heads,
                              settings.num_kv_heads, settings.head_dim, settings.seed)


def run_demo(settings: DemoSettings, stream: TextIO) -> dict:
    """Run the demo, print its report to ``stream`` and return the report as a dict.

    Also writes the dict as JSON to ``settings.json_path`` when set.
    """
    settings, device, dtype, backend = resolve_settings(settings)
    workload = build_workload(settings)
    layout = assign_pages(workload, settings.page_size, settings.seed)
    reference, value_scale = exact_attention(workload, dtype)
    dense = dense_bytes(workload, torch.empty((), dtype=dtype).element_size())
    modes = {}
    with tqdm(total=len(settings.modes) * workload.steps, desc="ART decode", unit="step", leave=False) as progress:
        for mode in settings.modes:
            progress.set_postfix(mode=mode)
            run = run_mode(workload, layout, settings.termination(mode), dtype, device, backend, progress)
            modes[mode] = summarize_mode(run, reference, value_scale, dense)
    report = {
        "workload": {"title": workload.title, **workload.source, "batch": workload.batch_size,
                     "context_lens": workload.context_lens.tolist(), "steps": workload.steps,
                     "num_qo_heads": workload.num_qo_heads, "num_kv_heads": workload.num_kv_heads,
                     "head_dim": workload.head_dim, "page_size": settings.page_size, "sm_scale": workload.sm_scale,
                     "physical_pages": layout.num_pages,
                     "logical_pages": sum(len(p) for p in layout.request_pages)},
        "settings": {**asdict(settings), "modes": list(settings.modes)},
        "run": {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "backend": backend},
        "modes": modes,
    }
    stream.write(format_report(report, settings))
    if settings.json_path is not None:
        Path(settings.json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict, settings: DemoSettings) -> str:
    """The printed report: header, depth table, first request's grid, cost and error table."""
    return "\n".join(_header(report, settings) + [""] + _depth_table(report["modes"]) + [""]
                     + _first_request_grid(report["modes"]) + [""] + _cost_table(report["modes"])) + "\n"


def _header(report: dict, settings: DemoSettings) -> list:
    workload, run = report["workload"], report["run"]
    lens = workload["context_lens"]
    block_pages = settings.termination("stability").pages_per_block(settings.page_size)
    return [
        f"ART decode demo on a {workload['title']}",
        f"  {workload['batch']} requests, {min(lens)}..{max(lens)} context tokens + {workload['steps']} decode "
        f"step(s) appending one token each, {workload['num_qo_heads']} q / {workload['num_kv_heads']} kv heads, "
        f"head_dim {workload['head_dim']}, page {workload['page_size']}",
        f"  {run['dtype']} on {run['device']}, {run['backend']} backend; dense visit order "
        "(sink page, current page, newest to oldest)",
        f"  stability: tau_mag {settings.tau_mag:g}, tau_dir {settings.tau_dir:g}, patience {settings.patience}"
        f" | bound: eps {settings.termination('bound').eps:g} relative to {settings.relative_to}"
        f" | min_pages {settings.min_pages}, checks every {block_pages} pages",
    ]


def _depth_table(modes: dict) -> list:
    lines = ["termination depth: pages visited / selected per (request, KV head), over all steps",
             f"  {'mode':<10} {'min':>7} {'median':>7} {'max':>7} {'overall':>8}"]
    for mode, summary in modes.items():
        depth = summary["depth"]
        lines.append(f"  {mode:<10} {depth['fraction_min']:>7.1%} {depth['fraction_median']:>7.1%} "
                     f"{depth['fraction_max']:>7.1%} {depth['fraction_of_pages']:>8.1%}")
    return lines


def _first_request_grid(modes: dict) -> list:
    num_kv_heads = len(next(iter(modes.values()))["depth"]["visited_pages"][-1][0])
    heads = " ".join(f"{'kv' + str(h):>9}" for h in range(num_kv_heads))
    lines = ["request 0 at the last step: pages visited / selected per KV head", f"  {'mode':<10} {heads}"]
    for mode, summary in modes.items():
        visited = summary["depth"]["visited_pages"][-1][0]
        selected = summary["depth"]["selected_pages"][-1][0]
        cells = " ".join(f"{f'{v}/{s}':>9}" for v, s in zip(visited, selected))
        lines.append(f"  {mode:<10} {cells}")
    return lines


def _cost_table(modes: dict) -> list:
    lines = ["cost, and output error against exact dense attention (float64) over all steps, requests, query heads",
             "  err = |o - o_dense| / |o_dense|;  err/v = |o - o_dense| / max|v| (over the request's KV head)",
             f"  {'mode':<10} {'MB read':>9} {'saved':>7} {'err max':>9} {'err p99':>9} {'err/v max':>9} "
             f"{'err/v p99':>9} {'ms/step':>8}"]
    for mode, summary in modes.items():
        data, error = summary["bytes"], summary["error"]
        lines.append(
            f"  {mode:<10} {data['read'] / 1e6:>9.2f} {data['saved_fraction']:>7.1%} {error['relative_max']:>9.2e} "
            f"{error['relative_p99']:>9.2e} {error['value_relative_max']:>9.2e} {error['value_relative_p99']:>9.2e} "
            f"{summary['step_seconds']['median'] * 1e3:>8.1f}")
    lines += ["  MB read: K and V, plus page metadata in bound mode; saved: against a dense read of every page",
              "  ms/step: median wall time of append + metadata update + plan + run"]
    for mode, summary in modes.items():
        if summary["metadata_matches_rebuild"] is not None:
            verdict = "matches" if summary["metadata_matches_rebuild"] else "DIFFERS FROM"
            lines.append(f"  {mode}: page metadata kept by appends {verdict} a rebuild from the cache")
    return lines
