"""ART decode on a plan whose buffers never move: SGLang's eager steps and its CUDA graphs.

``BatchARTDecodeWrapper.plan`` sizes its plan from the batch (it synchronizes and allocates),
which a captured graph cannot follow. Here the plan lives in fixed buffers
(:class:`~art_runtime.integrations.sglang.paging.StaticPlanBuffers`): one work item per
(request, KV head), or in modes ``off`` and ``stability`` a fixed number per batch size, each
row cut into that many chunks of the longest row's share
(:func:`~art_runtime.integrations.sglang.paging.fill_chunks`; a shorter row's chunks past its
end are empty), so that a small batch of long requests still fills the GPU. :meth:`prepare`
(before a step, outside any graph) copies the batch's page table in, lays out how many pages
each row keeps (the policy's budget) and, for policies scored once per step
(``streaming_llm``, recency), fills the visit order. :meth:`run` (per layer, inside the graph
when one is captured) scores and orders the pages of per-layer policies (Quest scores from
the page metadata, SnapKV's votes and H2O's mass from their page-keyed state; the radix
selection kernel) into the same buffers, runs the wrapper's decode kernel and, for H2O, adds
the page mass the kernel recorded to the policy's state. No
step synchronizes with the host; shapes depend only on the buffers' sizes.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from art_runtime.decode import BatchARTDecodeWrapper, policy_for_mode
from art_runtime.plan import choose_chunk_pages, min_chunk_blocks
from art_runtime.policies import PagePolicy, PolicyContext, SelectionLayout
from art_runtime.selection import PageSelection
from art_runtime.termination import TerminationConfig

from .paging import StaticPlanBuffers, fill_chunks

# Wrapper buffers with one entry per work item or per row: viewed per batch size. The others
# (bound terms per visit position) are sized by the fixed capacity and shared as they are.
_PER_ITEM = ("_visited_pages", "_visited_tokens", "_loaded_tokens", "_stable_at", "_sketch_pages")
_PER_ROW = ("_vscale",)
# Modes whose rows a fixed plan cuts into chunks: those without a pre-pass over each work item.
_CHUNKED_MODES = ("off", "stability")


class StaticPlanDecodeWrapper(BatchARTDecodeWrapper):
    """``BatchARTDecodeWrapper`` bound to :class:`StaticPlanBuffers`.

    This subclass sets the wrapper's plan state itself instead of calling ``plan()``; it
    relies on the attributes ``plan()`` would set (``_plan``, ``_backend``, ``_policy``,
    ``_selection``, ``_page_table``, ``_pages_in_table``, ``_record_page_mass``,
    ``_longest_first``, ``_raw_stats``), the buffers ``_allocate`` makes and the
    ``_select_pages`` hook of ``run``. Its work items run in plan order (``plan()`` may
    launch mass work items longest first; here the buffers hold the largest batch's items,
    and a smaller batch's would sort with stale ones).

    Parameters
    ----------
    buffers : StaticPlanBuffers
        The plan's buffers (attribute ``buffers``).
    max_batch : int
        Largest batch (requests) the buffers hold.
    num_qo_heads, head_dim, page_size : int
    termination : TerminationConfig
    sm_scale : float
    num_pages : int
        Pages of the KV pool (bounds every page id).
    policy : art_runtime.policies.PagePolicy or None
        ``None``: every page in recency order. Policies that key their state by request id
        are refused; SnapKV and H2O run in their page-keyed form
        (:mod:`~art_runtime.integrations.sglang.page_state`).
    backend : {"triton", "torch"}
    """

    def __init__(self, buffers: StaticPlanBuffers, max_batch: int, num_qo_heads: int, head_dim: int, page_size: int,
                 termination: TerminationConfig, sm_scale: float, num_pages: int, policy: PagePolicy | None = None,
                 backend: str = "triton"):
        if policy is not None and policy.stateful:
            raise ValueError(f"policy: {policy.name} keys its state by request id, which fixed-buffer plans do not "
                             "have; use its page-keyed form (art_runtime.integrations.sglang.page_state)")
        super().__init__(kv_layout="NHD", backend=backend)
        policy = policy_for_mode(policy, termination)
        self.buffers = buffers
        self._shape = (num_qo_heads, head_dim, page_size, termination, sm_scale, num_pages)
        self._num_qo_heads, self._page_size, self._sm_scale = num_qo_heads, page_size, sm_scale
        self._backend = backend
        self._step_policy = policy
        self._policy = None
        # H2O's page mass comes from the decode kernel (needs power-of-two blocks on Triton).
        self._record_page_mass = policy is not None and policy.needs_page_mass
        self._block_pages = buffers.plan(1, *self._shape).block_pages
        block_tokens = self._block_pages * page_size
        if self._record_page_mass and backend == "triton" and block_tokens & (block_tokens - 1):
            raise ValueError(f"policy {policy.name}: the page mass needs block_pages (--art-block-pages) * page_size "
                             f"to be a power of two, got {block_tokens}")
        self._pages_in_table = 0  # key boxes read by scoring are not counted in last_stats.kv_bytes_read
        self._longest_first = False
        self._page_table = None  # the caller always passes the page metadata, never rebuilt here
        self._plans = {}
        device = buffers.row_start.device
        self._chunks = {batch: self._chunks_per_row(batch, device) for batch in range(1, max_batch + 1)}
        items = max(batch * buffers.num_kv_heads * chunks for batch, chunks in self._chunks.items())
        self._work_start = torch.zeros(items, dtype=torch.int32, device=device)
        self._work_end = torch.zeros(items, dtype=torch.int32, device=device)
        self._allocate(self._plan_for(max_batch)[0], device, items, max(self._chunks.values()) > 1)
        self._full = {name: getattr(self, name) for name in _PER_ITEM + _PER_ROW}

    def _chunks_per_row(self, batch: int, device: torch.device) -> int:
        """Work items per row of a ``batch``-request step: in modes ``off`` and ``stability`` as
        many as ``BatchARTDecodeWrapper.plan`` would cut the longest row the buffers hold into
        (``kept`` pages), otherwise one."""
        head_dim, termination = self._shape[1], self._shape[3]
        if termination.mode not in _CHUNKED_MODES:
            return 1
        kept = self.buffers.kept
        programs = self._parallel_programs(device, termination, head_dim)
        chunk = choose_chunk_pages(kept, batch * self.buffers.num_kv_heads, self._block_pages, programs,
                                   termination.mode != "off")
        return math.ceil(kept / chunk)

    def _plan_for(self, batch: int):
        """``(DecodePlan, PolicyContext, SelectionLayout)`` of a ``batch``-request step: views, made once."""
        if batch not in self._plans:
            b = self.buffers
            rows = batch * b.num_kv_heads
            ctx = PolicyContext(b.page_indptr[: batch + 1], b.page_indices, b.last_page_len[:batch],
                                self._num_qo_heads, b.num_kv_heads, self._page_size, None, self._sm_scale)
            layout = SelectionLayout(b.row_start[: rows + 1], b.entry_row, b.entry_rank, b.width, b.kept)
            plan = b.plan(batch, *self._shape)
            chunks = self._chunks[batch]
            if chunks > 1:
                items = rows * chunks
                device = b.row_start.device
                longest = math.ceil(max(math.ceil(b.kept / chunks), self._min_chunk_pages(plan)) / plan.block_pages)
                plan = dataclasses.replace(
                    plan, work_row=torch.arange(rows, dtype=torch.int32, device=device).repeat_interleave(chunks),
                    work_start=self._work_start[:items], work_end=self._work_end[:items],
                    row_work_indptr=torch.arange(0, items + 1, chunks, dtype=torch.int32, device=device),
                    max_work_blocks=longest)
            self._plans[batch] = (plan, ctx, layout)
        return self._plans[batch]

    @staticmethod
    def _min_chunk_pages(plan) -> int:
        return min_chunk_blocks(plan.termination.mode != "off") * plan.block_pages

    def prepare(self, kv_indptr, kv_indices, kv_last_page_len) -> None:
        """Fill the buffers with a batch's page table and selection layout (outside graphs), then :meth:`bind`.

        Parameters
        ----------
        kv_indptr, kv_indices, kv_last_page_len : torch.Tensor
            The batch's FlashInfer page table (int32; ``kv_indices`` at most the buffers'
            table capacity long, entries past the table ignored). No request may have more
            pages than the buffers' ``width``.
        """
        batch = kv_last_page_len.numel()
        buffers, policy = self.buffers, self._step_policy
        buffers.fill_page_table(kv_indptr, kv_indices, kv_last_page_len)
        plan, ctx, layout = self._plan_for(batch)
        pages = ctx.pages_per_row
        buffers.fill_layout(pages if policy is None else policy.budget_pages(ctx).to(pages.device).minimum(pages))
        if policy is None:
            buffers.set_visits(buffers.recency_pages(), self._page_size)
        elif not policy.per_layer:
            buffers.set_visits(policy.select(ctx, layout), self._page_size)
        if plan.split:
            fill_chunks(buffers.row_start[: plan.num_rows + 1], self._chunks[batch], plan.block_pages,
                        self._min_chunk_pages(plan), plan.work_start, plan.work_end)
        self.bind(batch)

    def bind(self, batch: int) -> None:
        """Point ``run`` at the plan of a ``batch``-request step (done by :meth:`prepare`)."""
        plan, ctx, layout = self._plan_for(batch)
        for name in _PER_ITEM:
            setattr(self, name, self._full[name][: plan.num_work])
        for name in _PER_ROW:
            setattr(self, name, self._full[name][: plan.num_rows])
        self._plan = plan
        self._policy = None if self._step_policy is None else (self._step_policy, ctx, layout)
        self._selection = PageSelection(layout.indptr, self.buffers.visit_pages)
        # A replayed graph runs no Python: last_stats reads the kernel's counters for this plan,
        # with the last run's cache and metadata (the page mass of a replay stays on the device).
        self._raw_stats = None
        if self._last_run_inputs is not None:
            self._record_stats(plan, *self._last_run_inputs, None)

    def _select_pages(self, plan, layer_id: int, q, page_meta) -> None:
        """Per layer (inside the graph): score and order the pages of a query-dependent policy."""
        policy, ctx, layout = self._policy
        policy.select(ctx, layout, layer_id, q, page_meta, out=self.buffers.visits)

    def plan(self, *args, **kwargs):
        raise ValueError("StaticPlanDecodeWrapper is planned by prepare(), not plan()")
