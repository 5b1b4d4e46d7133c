"""``ARTAttnBackend``: SGLang's Triton attention backend with ART decode.

Prefill (extend) is SGLang's own Triton path. Decode writes K/V into SGLang's pool as the
Triton backend does, keeps the per-page metadata (``art_runtime.PageMetadata``, one per
layer, over the pool's pages) current, and runs ART decode on the pool viewed as FlashInfer
NHD pages. Page metadata follows every KV write: decode here, extend here or,
under ``--prefill-attention-backend X --decode-attention-backend art``, in the prefill
backend (the plugin's hook on ``HybridAttnBackend.forward`` calls :meth:`record_kv_write`).

Eager and CUDA-graph decode run one code path,
:class:`~art_runtime.integrations.sglang.graph_decode.StaticPlanDecodeWrapper`: before a step,
outside any graph, the batch's page table and how many pages each (request, KV head) keeps
are written into fixed buffers (``init_forward_metadata_out_graph`` for graphs, refilled
before every replay; ``init_forward_metadata`` for eager steps, in buffers sized to the
batch); per layer, a query-dependent policy (Quest, the dense Quest or mass order) scores and
orders the pages into those buffers and the ART kernel reads them, with no host
synchronization, so both are captured in the graph.
"""

from __future__ import annotations

import logging
import math

import torch

from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from art_runtime.backend import triton_runs_on
from art_runtime.page_metadata import PageMetadata
from art_runtime.policies import PolicyContext

from .graph_decode import StaticPlanDecodeWrapper
from .page_state import PagedH2OPolicy, PagedSnapKVPolicy, paged_policy, state_bytes_per_page
from .options import ARTOptions, resolve_options
from .paging import StaticPlanBuffers, appended_page_table, page_table, paged_view
from .telemetry import DecodeTelemetry


PAGE_STATE_POLICIES = (PagedH2OPolicy, PagedSnapKVPolicy)
logger = logging.getLogger(__name__)


def _stores_page_metadata(termination, policy) -> bool:
    return termination.reads_page_metadata or (policy is not None and policy.per_layer)


def memory_per_page(options: ARTOptions, page_size: int, head_dim: int) -> int:
    """Bytes ART allocates per (layer, pool page, KV head) next to SGLang's K and V.

    The page metadata, when the termination mode or the policy reads it (the key sketch only
    for mode ``bound``: ``PageMetadata.stored_bytes_per_page``), and SnapKV's or H2O's
    per-page state. The plugin adds it to the KV pool's cost per token, so that the pool
    SGLang sizes from ``--mem-fraction-static`` leaves room for it.
    """
    termination, policy = options.termination(), options.build_policy()
    metadata = PageMetadata.stored_bytes_per_page(page_size, head_dim, sketch=termination.reads_key_sketch) \
        if _stores_page_metadata(termination, policy) else 0
    return metadata + state_bytes_per_page(policy)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"--attention-backend art: {message}")


class ARTAttnBackend(TritonAttnBackend):
    """SGLang attention backend ``art``: Triton prefill, ART decode.

    Parameters
    ----------
    model_runner : sglang.srt.model_executor.model_runner.ModelRunner
    options : ARTOptions, optional
        Default: :func:`~art_runtime.integrations.sglang.options.resolve_options` (the
        environment and ``ART_CONFIG``).

    Raises
    ------
    ValueError
        On a setup ART cannot serve (page size 1, MLA, sliding windows, decode context
        parallelism, speculative decoding), naming the flag.
    """

    def __init__(self, model_runner, options: ARTOptions | None = None):
        super().__init__(model_runner)
        self.options = resolve_options() if options is None else options
        _check(self.page_size > 1, "ART reads whole KV pages and SGLang's page size is 1 (token slots); "
               "pass --page-size 16 (or another page size > 1)")
        _check(not self.use_mla, "MLA models are not supported (ART decode needs K and V heads)")
        _check(self.sliding_window_size is None and not self.use_sliding_window_kv_pool,
               "sliding-window attention is not supported")
        _check(self.dcp_size == 1, "decode context parallelism is not supported")
        _check(self.speculative_num_steps in (None, 0), "speculative decoding is not supported")
        pool = self.token_to_kv_pool
        keys = pool.get_key_buffer(pool.start_layer)
        self.head_dim = keys.shape[-1]
        _check(self.v_head_dim == self.head_dim, "K and V head dims must be equal")
        _check(model_runner.kv_cache_dtype in (torch.float16, torch.bfloat16, torch.float32),
               f"KV cache dtype {model_runner.kv_cache_dtype} is not supported (use --kv-cache-dtype auto)")
        self.num_pages = keys.shape[0] // self.page_size
        self.layer_offset = pool.start_layer
        self.num_layers = pool.layer_num
        self.termination = self.options.termination()
        # SnapKV and H2O keep their state per physical page (page_state), in fixed buffers.
        self.policy = paged_policy(self.options.build_policy(), self.num_layers, self.num_pages, self.num_kv_head,
                                   keys.device, self.layer_offset)
        self.sm_scale = 1.0 / math.sqrt(self.head_dim)
        self.kernel_backend = "triton" if triton_runs_on(keys.device) else "torch"
        self.page_meta = [
            PageMetadata.allocate(self.num_pages, self.page_size, self.num_kv_head, self.head_dim, device=keys.device,
                                  sketch=self.termination.reads_key_sketch)
            for _ in range(self.num_layers)
        ] if _stores_page_metadata(self.termination, self.policy) else None
        art_bytes = memory_per_page(self.options, self.page_size, self.head_dim) * self.num_layers * self.num_pages \
            * self.num_kv_head
        logger.info("ART page metadata and policy state: %.2f GiB over %d pages x %d layers (counted in the KV "
                    "pool's size)", art_bytes / 2**30, self.num_pages, self.num_layers)
        # Plan sizes: a request holds at most `width` pages, a row keeps at most `kept`.
        self.width = math.ceil(self.max_context_len / self.page_size)
        self.kept = self.width if self.policy is None else min(self.width, _budget(self.policy, self.page_size))
        self.graph_decode: StaticPlanDecodeWrapper | None = None
        self.decode: StaticPlanDecodeWrapper | None = None  # the wrapper of the current decode step
        self.decode_seq_lens = None  # [B] of the current decode step
        metadata_bytes = (self.page_meta[0].nbytes_per_page(self.termination.mode)
                          if self.termination.reads_page_metadata else 0)
        rank, rank_name = server_rank()
        self.telemetry = DecodeTelemetry(
            self.num_layers, self.num_kv_head, self.num_head, self.head_dim, keys.element_size(), metadata_bytes,
            keys.device, rank=rank, rank_name=rank_name,
            stats_address=self.options.stats_address, stats_interval=self.options.stats_interval,
            allow_remote=self.options.stats_allow_remote, enable_metrics=_metrics_enabled(),
            layer_offset=self.layer_offset)

    # -- metadata of a step -------------------------------------------------------------------
    def _decode_wrapper(self, buffers: StaticPlanBuffers, max_batch: int) -> StaticPlanDecodeWrapper:
        return StaticPlanDecodeWrapper(buffers, max_batch, self.num_head, self.head_dim, self.page_size,
                                       self.termination, self.sm_scale, self.num_pages, self.policy,
                                       self.kernel_backend)

    def init_forward_metadata(self, forward_batch) -> None:
        """Eager step: SGLang's Triton metadata, then (decode) the ART plan of the batch in buffers of its size."""
        super().init_forward_metadata(forward_batch)
        if not forward_batch.forward_mode.is_decode() or forward_batch.batch_size == 0:
            return
        batch = forward_batch.batch_size
        seq_lens = forward_batch.seq_lens[:batch]
        pages = ((seq_lens.long() + self.page_size - 1) // self.page_size).tolist()  # eager: may synchronize
        buffers = StaticPlanBuffers.allocate(
            batch, self.num_kv_head, max(pages), min(self.kept, max(pages)), seq_lens.device,
            capacity=self.num_kv_head * sum(min(self.kept, n) for n in pages), table_capacity=sum(pages))
        self._prepare(self._decode_wrapper(buffers, batch), forward_batch, self.forward_metadata.kv_indptr,
                      self.forward_metadata.kv_indices, buffers.table_capacity)
        self.telemetry.set_batch(batch, batch)
        self.telemetry.step()

    def _prepare(self, wrapper: StaticPlanDecodeWrapper, forward_batch, token_indptr, token_indices,
                 table_capacity: int) -> None:
        """Turn SGLang's token-level page table into ART's and fill ``wrapper``'s buffers with the step's plan."""
        batch = forward_batch.batch_size
        seq_lens = forward_batch.seq_lens[:batch]
        wrapper.prepare(*page_table(seq_lens, token_indptr[: batch + 1], token_indices, self.page_size,
                                    table_capacity))
        self.decode = wrapper
        self.decode_seq_lens = seq_lens

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, kv_indices_buf=None,
                              cuda_graph_num_kv_splits_buf=None) -> None:
        """SGLang's graph buffers plus ART's fixed plan for up to ``max_bs`` requests of the longest context."""
        super().init_cuda_graph_state(max_bs, max_num_tokens, kv_indices_buf, cuda_graph_num_kv_splits_buf)
        buffers = StaticPlanBuffers.allocate(max_bs, self.num_kv_head, self.width, self.kept, self.kv_indptr.device)
        self.graph_decode = self._decode_wrapper(buffers, max_bs)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        """Capture and replay, outside the graph: refill ART's fixed page table and plan."""
        super().init_forward_metadata_out_graph(forward_batch, in_capture)
        if not forward_batch.forward_mode.is_decode():
            return
        batch = forward_batch.batch_size
        self._prepare(self.graph_decode, forward_batch, self.kv_indptr, self.cuda_graph_kv_indices,
                      self.graph_decode.buffers.table_capacity)
        self.telemetry.set_batch(batch, batch - getattr(forward_batch, "num_padding", 0))
        if not in_capture:
            self.telemetry.step()

    # -- forward ------------------------------------------------------------------------------
    def record_kv_write(self, layer, forward_batch) -> None:
        """Fold the tokens just written for ``layer`` (at ``out_cache_loc``) into its page metadata.

        Pages that start in this write also get their page-keyed policy state cleared.
        """
        if self.page_meta is None or forward_batch.out_cache_loc is None:
            return
        mode = forward_batch.forward_mode
        loc = forward_batch.out_cache_loc
        if mode.is_decode():
            batch = forward_batch.batch_size
            first = forward_batch.seq_lens[:batch].long() - 1
            new = torch.ones_like(first)
        elif mode.is_extend():
            first, new = forward_batch.extend_prefix_lens, forward_batch.extend_seq_lens
        else:
            return
        pool = self.token_to_kv_pool
        keys = pool.get_key_buffer(layer.layer_id)[loc]
        values = pool.get_value_buffer(layer.layer_id)[loc]
        batch_indices, positions, kv_indices, kv_indptr = appended_page_table(loc, first, new, self.page_size)
        self.page_meta[layer.layer_id - self.layer_offset].update(
            keys, values, batch_indices, positions, kv_indices, kv_indptr)
        if isinstance(self.policy, PAGE_STATE_POLICIES):
            # Every token of a page gets the same flag: its page starts at or after the request's first new token.
            starts_here = positions - positions % self.page_size >= first.long()[batch_indices.long()]
            self.policy.reset_pages(layer.layer_id, loc.long() // self.page_size, starts_here)

    def record_extend(self, q, layer, forward_batch) -> None:
        """After a prefill (extend) wrote ``layer``'s K/V: page metadata, policy state, SnapKV's prompt votes.

        ``q``: ``[tokens, H_qo * D]`` the extend's queries. The votes loop over the requests on
        the host (prefill runs eagerly).
        """
        self.record_kv_write(layer, forward_batch)
        if not isinstance(self.policy, PagedSnapKVPolicy):
            return
        pool, size = self.token_to_kv_pool, self.page_size
        queries = q.reshape(-1, self.num_head, self.head_dim)
        req_to_token = self.req_to_token_pool.req_to_token
        prefix_lens, new_lens = forward_batch.extend_prefix_lens_cpu, forward_batch.extend_seq_lens_cpu
        if prefix_lens is None or new_lens is None:  # SGLang's GPU-only batches have no host copies
            prefix_lens, new_lens = forward_batch.extend_prefix_lens.tolist(), forward_batch.extend_seq_lens.tolist()
        start = 0
        for b, (prefix, new) in enumerate(zip(prefix_lens, new_lens)):
            prompt = prefix + new
            window = min(self.policy.window, new)
            slots = req_to_token[forward_batch.req_pool_indices[b], :prompt].long()
            self.policy.vote(layer.layer_id, queries[start + new - window: start + new],
                             pool.get_key_buffer(layer.layer_id)[slots], slots[::size] // size, size, layer.scaling)
            start += new

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        """SGLang's Triton prefill; then the page metadata of the written tokens."""
        out = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if save_kv_cache:
            self.record_extend(q, layer, forward_batch)
        return out

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, score_mod=None,
                       aux_tensors=None):
        """Write this step's K/V, update the page metadata, run ART decode, record stats.

        Parameters
        ----------
        q : torch.Tensor
            ``[B, H_qo * D]`` (or any shape holding that), this rank's query heads.
        k, v : torch.Tensor
            ``[B, H_kv, D]`` new keys / values (written when ``save_kv_cache``).

        Returns
        -------
        torch.Tensor
            ``[B, H_qo * D]`` attention output in q's dtype.
        """
        unsupported = {"sinks": sinks is not None, "score_mod": score_mod is not None,
                       "aux_tensors": aux_tensors is not None, "logit soft-capping": layer.logit_cap > 0,
                       "sliding window": (layer.sliding_window_size or -1) > -1,
                       "scaled (fp8) KV cache": layer.k_scale is not None}
        _check(not any(unsupported.values()), f"layer {layer.layer_id} uses " +
               ", ".join(name for name, used in unsupported.items() if used) + ", which ART decode does not support")
        if save_kv_cache:
            self._set_kv_buffer(forward_batch, layer, KVWriteLoc.for_batch(forward_batch), k, v)
            self.record_kv_write(layer, forward_batch)
        q = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        out = torch.empty_like(q)
        if q.shape[0] == 0:
            return out.view(0, -1)
        if layer.scaling != self.sm_scale:  # the plan's scale is shared by every layer; fold the rest into q
            q = q * (layer.scaling / self.sm_scale)
        pool = self.token_to_kv_pool
        cache = (paged_view(pool.get_key_buffer(layer.layer_id), self.page_size),
                 paged_view(pool.get_value_buffer(layer.layer_id), self.page_size))
        meta = None if self.page_meta is None else self.page_meta[layer.layer_id - self.layer_offset]
        self.decode.run(q, cache, page_meta=meta, out=out, layer_id=layer.layer_id)
        stats = self.decode.last_stats
        self.telemetry.record(layer.layer_id, stats.visited_pages, stats.selected_pages, stats.visited_tokens,
                              self.decode_seq_lens)
        return out.view(q.shape[0], -1)


def _budget(policy, page_size: int) -> int:
    """Pages a row of ``policy`` keeps at most (its budget on a request longer than any budget)."""
    one = torch.ones(1, dtype=torch.int32)
    ctx = PolicyContext(torch.tensor([0, 1 << 30], dtype=torch.int32), one, one, 1, 1, page_size)
    return int(policy.budget_pages(ctx).max())


def server_rank() -> tuple[int, str]:
    """This process's index among the server's ranks and its name (``tp1``, ``pp1-tp0``, ``dp1-tp0``).

    From SGLang's parallel context (``get_parallel()``): the index is unique over tensor,
    pipeline and data-parallel ranks, so that every rank binds its own stats endpoint. Ranks
    SGLang has not written in this process (outside a server) count as 0.
    """
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()

    def read(name, default):
        try:
            value = getattr(parallel, name)
        except (RuntimeError, ValueError):  # not written in this process
            return default
        return default if value is None else value

    tp, tp_size = read("tp_rank", 0), read("tp_size", 1)
    pp, pp_size = read("pp_rank", 0), read("pp_size", 1)
    dp = read("dp_rank", None)  # None: no data-parallel controller
    index = ((dp or 0) * pp_size + pp) * tp_size + tp
    name = (f"dp{dp}-" if dp is not None else "") + (f"pp{pp}-" if pp_size > 1 else "") + f"tp{tp}"
    return index, name


def _metrics_enabled() -> bool:
    """SGLang's ``--enable-metrics`` of this server."""
    from sglang.srt.runtime_context import get_server_args

    return bool(getattr(get_server_args(), "enable_metrics", False))
