"""``BatchARTDecodeWrapper``: batched paged decode attention with run-time termination.

Like FlashInfer's ``BatchDecodeWithPagedKVCacheWrapper``: ``plan()`` once per decode step
(validates the page table, flattens the visit order, cuts it into work items, allocates
every buffer), then ``run()`` for each layer (validates q and the cache, launches, no host
synchronization, CUDA-graph capturable on the Triton backend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .backend import resolve_backend, tensor_core_dots, triton_interpreter_enabled
from .page_metadata import PageMetadata
from .paged_cache import unpack_paged_kv_cache, validate_page_table
from .plan import (DecodePlan, build_plan, dealt, group_tile, next_power_of_two, rows_fill_slots,
                   shared_heads_per_item)
from .reference import (LOG2_SLACK, LOG2E, OVERFLOW_LOG2, SKETCH_CUT_SHARE, VALUE_NORM_SCALE, art_decode_torch,
                        bound_terms_torch)
from .policies import DensePolicy, PagePolicy, PolicyContext
from .selection import PageSelection, VisitBuffers, dense_selection, validate_selection
from .termination import MASS_MAX_SHARE, MASS_PULL_CHECKS, TerminationConfig

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
MAX_GROUP_SIZE = 64
MAX_PAGE_SIZE = 256
BOUND_TILE = 32
# Positions per program of the bound pre-pass (a work item's visit order is cut into
# segments scanned in parallel, then joined by segment_carry_kernel).
SEGMENT_PAGES = 64
# Mode mass's pre-pass: about this many positions per program, the head dimension in slices of
# ESTIMATE_BLOCK_D (bound's estimate slices it alike), ESTIMATE_STAGES deep: the fastest of a sweep (H100, Llama-3-8B shape at
# batch 64 / 32K: tiles 32-256 pages, slices 32-128, 2-4 stages; 133 µs against 145 µs for
# the Quest scoring kernel's 64 / 64 / 3; benchmarks/NOTES.md v20).
ESTIMATE_TILE_PAGES = 128
ESTIMATE_BLOCK_D = 64
ESTIMATE_STAGES = 3
# Elements ([GROUP_PAD, blocks]) per step of the suffix sums over a work item's blocks: 64 blocks
# at GQA groups up to 15 (H100, Llama-3-8B shape at batch 64 / 32K: 23 µs; 256 blocks, so a
# 2048-page row in one step, 44 µs: the wider scan costs more than the shorter serial chain).
SUFFIX_TILE_ELEMENTS = 1024
# Mode mass launches its work items longest first, by the blocks the pre-pass predicts each
# will read (its estimated unread share still above eps), so that deep rows do not start in
# the last wave, when there are more items than the planned parallel programs. H100,
# Llama-3-8B shape on real captures at batch 64 / 32K: decode kernel 4-25% faster (SmolLM2
# layer 15 at eps 0.02: 1521 -> 1137 µs), the sort ~12 µs (benchmarks/NOTES.md v21).
LONGEST_FIRST = True
# Tokens per tile of the bound pre-pass's key sketch at head_dim 64 (fewer at larger head_dims, so
# that a tile's codes stay 8K elements: tokens x head_dim; benchmarks/results/sketch_page_sums_2026-11-27).
SKETCH_TILE_TOKENS = 128
# Its software pipeline: 2 stages, not Triton's default 3. On an H100 at batch 64 the kernel took
# 98 -> 80 µs on Qwen2.5 layer 12, 120 -> 95 on layer 20, 167 -> 159 on SmolLM2 layer 25; 1 stage
# and 256- or 64-token tiles were slower (benchmarks/NOTES.md v44).
SKETCH_STAGES = 2
TAIL_SUFFIX_TILE = 32  # positions per step of tail_suffix_kernel
# Launch configuration of the decode kernel, picked from a sweep on an H200
# (benchmarks/results/; bench_decode.py --launch/--programs-per-sm/--off-block-tokens).
NUM_WARPS = None  # None: STABILITY_WARPS in mode stability (see below), else 4
# Mode stability checks every 64-token block, so its programs are small: 2 warps instead of 4
# where the plan has at least STABILITY_WARPS_MIN_ITEMS work items per SM (up to head_dim 128;
# 128-token blocks need the 4), and STABILITY_PROGRAMS_PER_SM work items per SM aimed for. Swept on
# an H100 (benchmarks/NOTES.md v26; thresholds that never fire, both core shapes, batch 1-128,
# 4K-32K): 4 items per SM with that warp rule took stability over `off` from 1.56-1.66x to
# 1.07-1.18x at 14/2/64 batch 16-128 (16K+ at batch 16) and from 1.19x to 1.03-1.06x at 32/8/128
# batch 4 / 16K-32K; with fewer items than 2 per SM (batch 4 / 4K: 128 items) 2 warps were 17%
# slower. Before: 2 warps with more than 32 rows, 8 items per SM only at head_dim > 64 (v18, v24).
STABILITY_WARPS = 2
STABILITY_WARPS_MIN_ITEMS = 2
NUM_STAGES = None  # None: 3 for head_dim <= 64 (small tiles need a deeper pipeline), else 2
# Work items per SM that the split heuristic aims for in modes mass and bound: PROGRAMS_PER_SM
# (STABILITY_PROGRAMS_PER_SM in mode stability, above). There a chunk judges its own unread
# share, and the chunks after a row's first hold little of its mass, so they read nearly all of
# it (Llama-3-8B shape at batch 64 on real attention: mass read 84% / 40% of two layers' pages
# split in 2, 68% / 11% whole; v13). Mode off plans for what fits an SM (below): 2 items per SM
# had beaten 8 at head_dim 128 (v24), which is what fits there.
PROGRAMS_PER_SM = 2
STABILITY_PROGRAMS_PER_SM = 4
# Mode off plans for the programs an SM actually holds (None: off_programs_per_sm), so that the
# wave model (plan.wave_splits) counts the device's slots.
OFF_PROGRAMS_PER_SM = None


def off_programs_per_sm(row_width: int) -> int:
    """Programs of mode ``off``'s decode kernel that one SM holds at once, for K/V token rows of
    ``row_width`` elements (head_dim x the heads one program reads) in a 16-bit cache, as
    compiled for sm_90 (``python tests/compile_sm90.py --resources``; pinned by
    ``tests/test_compile_sm90.py``): 3 up to 64 elements (~153 registers, 76 KB of shared
    memory in 3 pipeline stages), 2 for wider rows (~200 registers, 78 KB in 2 stages; head_dim
    256 spills at either). fp32 caches hold fewer (1 at head_dim 128), which this over-counts.
    """
    return 3 if row_width <= 64 else 2
OFF_BLOCK_TOKENS = 128  # tile of mode "off" (no checks, so the tile is free) unless block_pages is set
OFF_TILE_ELEMENTS = 16384  # ... and at most this many K elements (head_dim 256: 64 tokens)
# Blocks per pass of the termination loop (a `for` loop the compiler may pipeline, inside
# the `while` loop that ends when the group stops).
PASS_BLOCKS = 8
# Up to this head_dim the termination loop reads each pass speculatively so that its loads
# are pipelined (kernels/art_decode.py, SPECULATE), and loads the next block's page ids a
# block ahead so that K and V get two pipeline buffers (NOTES v39). Measured on H100
# (benchmarks/NOTES.md v10): 14/2/64 stability 2.0-2.1x -> 1.5-1.6x of `off`; at head_dim 128
# it cost 8-9% more (1.11x -> 1.20x), the shared-memory pipeline taking occupancy that already
# hid the latency, and with the page ids a block ahead still 11-12% (H200, v40).
SPECULATE_MAX_HEAD_DIM = 64
# Elements of the [chunks, head_dim] fp32 tile the merge kernel reads per step: 64 chunks (a
# whole row at the split cap, MAX_CHUNKS_PER_ROW) at head_dim 64, 32 at 128 (NOTES v23).
MERGE_TILE_ELEMENTS = 4096
SHARED_MEMORY_BUDGET = 160 * 1024  # bytes of K/V tiles in flight per program (H100/H200: 227 KiB)


def tail_order_warps(width_pow2: int) -> int:
    """Warps of ``tail_order_kernel`` for work items of up to ``width_pow2`` pages: 4, and more
    from 4096 pages on (the bitonic sort holds the item in registers)."""
    return max(4, min(16, width_pow2 // 512))


def tile_tokens(row_width: int) -> int:
    """The longest K/V tile that reads fastest for token rows of ``row_width`` elements (a
    head_dim, or heads x head_dim where one program reads several heads): ``OFF_BLOCK_TOKENS``,
    at most ``OFF_TILE_ELEMENTS`` elements. Mode ``off``'s block, and the cap of the others'."""
    return min(OFF_BLOCK_TOKENS, OFF_TILE_ELEMENTS // row_width)


def sketch_tile_pages(head_dim: int, page_size: int) -> int:
    """Pages per tile of the bound pre-pass's sketch kernel: ``SKETCH_TILE_TOKENS`` at head_dim 64,
    scaled down with larger head_dims, at least tl.dot's 16 tokens."""
    return max(1, max(16, SKETCH_TILE_TOKENS * 64 // head_dim) // next_power_of_two(page_size))


@dataclass
class DecodeStats:
    """What the last ``run`` read and where it stopped.

    Attributes
    ----------
    visited_pages : torch.Tensor
        ``[B, H_kv]`` int32: pages read per (request, KV head).
    selected_pages : torch.Tensor
        ``[B, H_kv]`` int32: pages in the selection.
    visited_tokens : torch.Tensor
        ``[B, H_kv]`` int32: tokens read.
    stable_at : torch.Tensor
        ``[B, H_qo]`` int32: the visit-order block (``block_pages`` pages each) at which each
        query head first met the criterion on its own (``-1``: never; always -1 in ``off``).
    kv_bytes_read : torch.Tensor
        0-d int64: K and V bytes of ``loaded_tokens``, plus the page metadata read (modes
        mass and bound: every selected page's key box; bound also its value norm and the key
        sketch of ``sketch_pages``; key-box scoring policies such as Quest: every page's key box).
    selection : PageSelection
        The selected pages in the order visited, read or not (for per-layer policies: the last
        run's): the policy's order, except that mode ``bound`` visits each work item's pages
        after its sketch cut by their certified mass bound (``reference.tail_visit_order``), and
        that in mode ``mass`` a row split into work items has its blocks dealt to them in turn
        (``plan.interleaved_slots``).
    page_mass : torch.Tensor or None
        ``[nnz]`` float32 aligned with ``selection.pages``: the softmax mass each page got,
        summed over the query heads of its group (0 for pages not read); only when planned
        with ``record_page_mass=True`` or for a policy that needs it (H2O).
    sketch_pages : torch.Tensor or None
        ``[B, H_kv]`` int32: pages whose key sketch the bound read (``bound`` only).
    loaded_tokens : torch.Tensor or None
        ``[B, H_kv]`` int32: tokens whose K and V were read from memory: ``visited_tokens``
        plus, in the Triton kernel's termination modes at ``head_dim <= 64``, the rest of the
        pipelined pass in which a work item stopped (at most ``PASS_BLOCKS - 1`` blocks, read
        speculatively and discarded).
    """

    visited_pages: torch.Tensor
    selected_pages: torch.Tensor
    visited_tokens: torch.Tensor
    stable_at: torch.Tensor
    kv_bytes_read: torch.Tensor
    selection: PageSelection
    page_mass: torch.Tensor | None
    sketch_pages: torch.Tensor | None = None
    loaded_tokens: torch.Tensor | None = None


def policy_for_mode(policy, termination: TerminationConfig):
    """The policy a plan runs: ``None`` for a ``DensePolicy`` in mode ``off``, a dense policy's
    ``auto`` order resolved for the mode (``DensePolicy.for_mode``), else ``policy``.

    Mode off reads every selected page, so a dense policy's visit order changes nothing but the
    order of fp32 additions: its per-layer scoring and sort are skipped (7% of a
    Llama-3-8B-shape layer at batch 64 / 32K on an H100, benchmarks/NOTES.md v20).
    """
    if not isinstance(policy, DensePolicy):
        return policy
    return None if termination.mode == "off" else policy.for_mode(termination.mode)


def _check_int(name: str, value, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")
    return value


class BatchARTDecodeWrapper:
    """Paged decode attention over FlashInfer's page format that stops per (request, KV head).

    Parameters
    ----------
    kv_layout : {"NHD", "HND"}
        Layout of the paged cache (see ``art_runtime.paged_cache``).
    backend : {"auto", "triton", "torch"}
        ``auto`` picks Triton for CUDA tensors and torch otherwise.
    """

    def __init__(self, kv_layout: str = "NHD", backend: str = "auto"):
        if kv_layout not in ("NHD", "HND"):
            raise ValueError(f"kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        self.kv_layout = kv_layout
        self.backend = backend
        self._plan: DecodePlan | None = None
        self._raw_stats = None
        self._last_run_inputs = None  # (cache element size, page metadata) of the last run

    def plan(
        self,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        kv_last_page_len: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        termination: TerminationConfig | None = None,
        sm_scale: float | None = None,
        policy=None,
        selection: PageSelection | None = None,
        chunk_pages: int | None = None,
        request_ids: list | None = None,
        record_page_mass: bool = False,
    ) -> None:
        """Prepare a decode step; reused by every ``run`` until the next ``plan``.

        Parameters
        ----------
        kv_indptr : torch.Tensor
            ``[B + 1]`` int32 page-table row pointers (strictly increasing).
        kv_indices : torch.Tensor
            ``[>= kv_indptr[-1]]`` int32 physical page ids.
        kv_last_page_len : torch.Tensor
            ``[B]`` int32 tokens in each request's last page, 1..page_size.
        num_qo_heads, num_kv_heads, head_dim, page_size : int
            ``num_qo_heads`` must be a multiple of ``num_kv_heads`` (group size <= 64).
        termination : TerminationConfig, optional
            Criterion and thresholds; default ``TerminationConfig()``.
        sm_scale : float, optional
            Logit scale; default ``1 / sqrt(head_dim)``.
        policy : art_runtime.policies.PagePolicy, optional
            Selects and orders the pages (``art_runtime.policies``). ``None``: dense. Policies
            that score with the query or per-layer state re-select in every ``run``. In mode
            ``off`` a ``DensePolicy`` plans as ``None`` (its order cannot change what is read).
        selection : PageSelection, optional
            An explicit visit order (CSR over ``B * H_kv`` rows). ``None``: dense, sink and
            current page first, then newest to oldest. Exclusive with ``policy``.
        chunk_pages : int, optional
            Pages per parallel work item. ``None``: rows are split only when ``B * H_kv``
            is too small to fill the GPU.
        request_ids : list, optional
            One hashable id per request; needed by policies that keep per-request state.
        record_page_mass : bool
            Have the kernel record each visited page's softmax mass (``last_stats.page_mass``);
            needs ``block_pages * page_size`` to be a power of two on the Triton backend.
        """
        termination = TerminationConfig() if termination is None else termination
        if not isinstance(termination, TerminationConfig):
            raise ValueError(f"termination must be a TerminationConfig, got {type(termination).__name__}")
        _check_int("num_kv_heads", num_kv_heads, 1, 1 << 16)
        _check_int("num_qo_heads", num_qo_heads, 1, 1 << 16)
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        _check_int("group size num_qo_heads // num_kv_heads", num_qo_heads // num_kv_heads, 1, MAX_GROUP_SIZE)
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim!r}")
        _check_int("page_size", page_size, 1, MAX_PAGE_SIZE)
        if sm_scale is None:
            sm_scale = 1.0 / math.sqrt(head_dim)
        if not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale) and sm_scale > 0):
            raise ValueError(f"sm_scale must be a positive finite number, got {sm_scale!r}")
        batch_size = validate_page_table(kv_indptr, kv_indices, kv_last_page_len, page_size)
        if request_ids is not None and len(request_ids) != batch_size:
            raise ValueError(f"request_ids must hold one id per request ({batch_size}), got {len(request_ids)}")
        device = kv_indptr.device
        self._backend = resolve_backend(self.backend, device)
        self._policy = None
        if selection is None:  # with both, _plan_policy refuses them below
            policy = policy_for_mode(policy, termination)
        if policy is not None:
            selection = self._plan_policy(policy, selection, PolicyContext(
                kv_indptr, kv_indices, kv_last_page_len, num_qo_heads, num_kv_heads, page_size, request_ids,
                sm_scale))
        self._record_page_mass = record_page_mass or (self._policy is not None and self._policy[0].needs_page_mass)
        heads_per_item = 1
        if selection is None:  # dense: every KV head visits the request's pages in the same order
            selection = dense_selection(kv_indptr, num_kv_heads)
            heads_per_item = self._shared_heads(kv_indptr, num_qo_heads, num_kv_heads, head_dim, page_size,
                                                termination, device)
        else:
            validate_selection(selection, kv_indptr[1:] - kv_indptr[:-1], num_kv_heads)
        parallel_programs = self._parallel_programs(device, termination, head_dim * heads_per_item)
        self._selection = selection
        plan = build_plan(
            kv_indptr, kv_indices, kv_last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
            termination, float(sm_scale), selection, chunk_pages, parallel_programs,
            tile_tokens(head_dim * heads_per_item), heads_per_item,
        )
        if plan.visit_slot is not None:  # the selection as visited: a split row's blocks dealt to its chunks
            self._selection = PageSelection(selection.indptr, dealt(selection.pages, plan.visit_slot))
        self._plan = plan
        # Launch order matters only when the work items run in more than one wave.
        self._longest_first = LONGEST_FIRST and termination.mode == "mass" and plan.num_work > parallel_programs
        self._page_table = (kv_indptr, kv_indices, kv_last_page_len)
        self._pages_in_table = int(kv_indptr[-1])  # on the host now: run() never syncs to count bytes
        block_tokens = plan.block_pages * page_size
        if self._record_page_mass and self._backend == "triton" and block_tokens & (block_tokens - 1):
            raise ValueError(f"record_page_mass needs block_pages * page_size to be a power of two, got {block_tokens}")
        self._allocate(plan, device)
        self._raw_stats = None

    def _plan_policy(self, policy, selection, ctx: PolicyContext) -> PageSelection:
        """The policy's selection, or (re-scored per layer) its layout with a placeholder order."""
        if selection is not None:
            raise ValueError("selection and policy: pass one of them, not both")
        if not isinstance(policy, PagePolicy):
            raise ValueError(f"policy must be an art_runtime.policies.PagePolicy, got {type(policy).__name__}")
        if policy.stateful and ctx.request_ids is None:
            raise ValueError(f"request_ids: the {policy.name} policy keeps state per request and needs their ids")
        layout = policy.layout(ctx)
        self._policy = (policy, ctx, layout)
        if policy.per_layer:
            return PageSelection(layout.indptr, layout.rank.to(torch.int32))  # overwritten by every run()
        return PageSelection(layout.indptr, policy.select(ctx, layout))

    def _shared_heads(self, kv_indptr: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                      page_size: int, termination: TerminationConfig, device: torch.device) -> int:
        """KV heads one program reads on a dense plan (``plan.shared_heads_per_item``): only in
        mode ``off`` without page masses, on an NHD cache (whose heads of a token are adjacent:
        the layout measured), at the default block when a page fits the wider tile, and where the
        rows can still be cut into work items for every program slot (not at batch 1-4 at 2 KV
        heads on 132 SMs, nor for short rows)."""
        if termination.mode != "off" or self._record_page_mass or self.kv_layout != "NHD" \
                or termination.block_pages is not None:
            return 1
        heads = shared_heads_per_item(num_kv_heads, num_qo_heads // num_kv_heads, head_dim)
        tile = tile_tokens(head_dim * heads)
        if heads == 1 or page_size > tile:
            return 1
        longest_pages = int((kv_indptr[1:] - kv_indptr[:-1]).max()) if kv_indptr.numel() > 1 else 0
        row_blocks = math.ceil(longest_pages / (tile // page_size))
        programs = self._parallel_programs(device, termination, head_dim * heads)
        return heads if rows_fill_slots((kv_indptr.numel() - 1) * num_kv_heads, row_blocks, programs * heads) else 1

    @staticmethod
    def _parallel_programs(device: torch.device, termination: TerminationConfig, row_width: int) -> int:
        """Work items that fill the device, none on a CPU. On a GPU, per SM: in mode ``off`` the
        programs that fit (``off_programs_per_sm`` of the K/V rows' ``row_width``), in mode
        stability ``STABILITY_PROGRAMS_PER_SM``, else ``PROGRAMS_PER_SM``.

        It depends on the device, the mode and the shape only, so both backends plan the same
        chunks (and so give the same results) on the same device.
        """
        if device.type != "cuda":
            return 1
        if termination.mode == "off":
            per_sm = OFF_PROGRAMS_PER_SM or off_programs_per_sm(row_width)
        else:
            per_sm = STABILITY_PROGRAMS_PER_SM if termination.mode == "stability" else PROGRAMS_PER_SM
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count

    def _allocate(self, plan: DecodePlan, device: torch.device, num_work: int | None = None,
                  split: bool | None = None) -> None:
        """The run's buffers for ``plan``; ``num_work`` and ``split`` (default: the plan's) size the
        per-work-item ones and the chunks' partial outputs for more items, or for a split that
        ``plan`` lacks (a fixed-buffer plan serving several batch sizes)."""
        # Mode mass's check reads the plain mean of the values from one query row of zeros.
        group_pad = group_tile(plan.group_size + (plan.termination.mode == "mass"))
        self._group_pad = group_pad
        num_work = plan.num_work if num_work is None else num_work
        self._visited_pages = torch.zeros(num_work, dtype=torch.int32, device=device)
        self._visited_tokens = torch.zeros(num_work, dtype=torch.int32, device=device)
        self._loaded_tokens = torch.zeros(num_work, dtype=torch.int32, device=device)
        self._stable_at = torch.full((num_work, group_pad), -1, dtype=torch.int32, device=device)
        split = (plan.split if split is None else split) and self._backend == "triton"
        self._part_out = torch.empty((num_work if split else 0, group_pad, plan.head_dim), dtype=torch.float32, device=device)
        self._part_lse = torch.empty((num_work if split else 0, group_pad), dtype=torch.float32, device=device)
        # bound: suffix bounds at every position; mass: suffix estimates at each block's first position.
        bound = plan.termination.reads_page_metadata and self._backend == "triton"
        self._log2w = torch.empty((plan.nnz if bound else 0, group_pad), dtype=torch.float32, device=device)
        certified = plan.termination.mode == "bound"
        self._sketch_pages = torch.empty((num_work if certified else 0,), dtype=torch.int32, device=device)
        certified = certified and self._backend == "triton"
        self._log2w_low = torch.empty((plan.nnz if certified else 0, group_pad), dtype=torch.float32, device=device)
        self._log2wv = torch.empty((plan.nnz if certified else 0, group_pad), dtype=torch.float32, device=device)
        self._vrest = torch.empty((plan.nnz if certified else 0,), dtype=torch.float32, device=device)
        # bound: each page's own mass bounds (upper, lower) and the tail's sort key
        # (reference.tail_key); then the run's visit order (kernels/page_bounds.tail_order_kernel).
        self._page_bounds = torch.empty((2, plan.nnz if certified else 0, group_pad), dtype=torch.float32,
                                        device=device)
        self._tail_key = torch.empty((plan.nnz if certified else 0,), dtype=torch.float32, device=device)
        self._visit_perm = torch.empty((plan.nnz if certified else 0,), dtype=torch.int64, device=device)
        self._visit_phys = torch.empty((plan.nnz if certified else 0,), dtype=torch.int32, device=device)
        self._visit_tokens = torch.empty_like(self._visit_phys)
        # bound: the selection's pages in the order the last run visited them (_visited_order).
        self._visit_pages = torch.zeros((plan.nnz if plan.termination.mode == "bound" else 0,), dtype=torch.int32,
                                        device=device)
        segments = self._prepass_segments(plan)[1] if certified else 0
        self._seg_est = torch.empty((num_work, segments, group_pad), dtype=torch.float32, device=device)
        self._seg_vmax = torch.empty((num_work, segments if certified else 0), dtype=torch.float32, device=device)
        self._seg_bounds = torch.empty((3, num_work, segments if certified else 0, group_pad),
                                       dtype=torch.float32, device=device)
        self._vscale = torch.empty((plan.num_rows,), dtype=torch.float32, device=device)
        # program -> work item; with heads_per_item > 1 the work items of each group's first head,
        # each program taking the same chunk of the next heads' rows too (their items follow at a
        # stride of the row's chunk count).
        if plan.heads_per_item > 1:
            self._work_order = torch.nonzero(plan.work_row % plan.heads_per_item == 0).flatten()
        else:
            self._work_order = torch.arange(num_work, dtype=torch.int64, device=device)
        mass = plan.termination.mode == "mass" and self._backend == "triton"
        self._predicted_blocks = torch.empty((num_work if mass else 0,), dtype=torch.int32, device=device)
        self._predicted_sorted = torch.empty_like(self._predicted_blocks)
        self._page_lse = torch.empty((plan.nnz if self._record_page_mass else 0, group_pad), dtype=torch.float32,
                                     device=device)

    def run(
        self,
        q: torch.Tensor,
        paged_kv_cache,
        page_meta: PageMetadata | None = None,
        return_lse: bool = False,
        out: torch.Tensor | None = None,
        layer_id: int = 0,
    ):
        """Decode attention for one layer.

        Parameters
        ----------
        q : torch.Tensor
            ``[B, H_qo, D]`` fp16, bf16 or fp32, the same dtype as the cache.
        paged_kv_cache : torch.Tensor or tuple of torch.Tensor
            FlashInfer-format cache in ``kv_layout``.
        page_meta : PageMetadata, optional
            Needed by ``bound`` mode; when ``None`` it is built from the cache (slow path).
        return_lse : bool
            Also return the base-2 log-sum-exp of the scaled logits ``[B, H_qo]`` float32
            (FlashInfer's convention: ``lse = log2(sum_j exp(sm_scale * q.k_j))``).
        out : torch.Tensor, optional
            ``[B, H_qo, D]`` buffer on q's device, in q's dtype or float32, to write into.
        layer_id : int
            The layer, for policies that keep per-layer state.

        Returns
        -------
        torch.Tensor or tuple of torch.Tensor
            ``out [B, H_qo, D]`` in q's dtype, and ``lse`` if asked.
        """
        plan = self._plan
        if plan is None:
            raise ValueError("run() needs a plan(): call plan() first")
        k_cache, v_cache = self._check_run_inputs(q, paged_kv_cache, plan)
        if out is None:
            out = torch.empty_like(q)
        elif (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.device != q.device
              or out.dtype not in (q.dtype, torch.float32)):
            raise ValueError(f"out must be a tensor of q's shape {list(q.shape)} and device, in q's dtype or float32")
        elif out.stride(-1) != 1:
            raise ValueError("out must be contiguous in its last dimension")
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        if plan.batch_size == 0:
            self._raw_stats = (plan, k_cache.element_size(), 0, None)
            return (out, lse) if return_lse else out
        bound = plan.termination.reads_page_metadata
        if (bound or (self._policy is not None and self._policy[0].per_layer)) and page_meta is None:
            page_meta = PageMetadata.from_cache(paged_kv_cache, *self._page_table, kv_layout=self.kv_layout,
                                                sketch=plan.termination.reads_key_sketch)
        if page_meta is not None:
            self._check_page_meta(page_meta, k_cache, plan)
        if self._policy is not None and self._policy[0].per_layer:
            self._select_pages(plan, layer_id, q, page_meta)
        if self._record_page_mass:
            self._page_lse.fill_(float("-inf"))  # pages that termination skips get no mass
        if self._backend == "triton":
            self._run_triton(plan, q, k_cache, v_cache, page_meta, out, lse)
        else:
            terms = bound_terms_torch(plan, q, page_meta) if bound else None
            run_plan = plan
            if plan.termination.mode == "bound":
                self._sketch_pages.copy_(terms.sketch_pages)
                torch.index_select(self._selection.pages[: plan.nnz], 0, terms.visit_perm,
                                   out=self._visit_pages[: plan.nnz])
                run_plan = replace(plan, visit_phys=plan.visit_phys[terms.visit_perm],
                                   visit_tokens=plan.visit_tokens[terms.visit_perm])
            o, o_lse, visited, tokens, stable_at = art_decode_torch(
                run_plan, q, k_cache, v_cache, terms, self._page_lse if self._record_page_mass else None)
            out.copy_(o)
            lse.copy_(o_lse)
            self._visited_pages.copy_(visited)
            self._visited_tokens.copy_(tokens)
            self._loaded_tokens.copy_(tokens)
            self._stable_at[:, : plan.group_size].copy_(stable_at)
        page_mass = self._page_mass(plan, lse) if self._record_page_mass else None
        if page_mass is not None and self._policy is not None and self._policy[0].needs_page_mass:
            policy, ctx, layout = self._policy
            policy.observe(ctx, layout, layer_id, self._visited_order(plan), page_mass)
        self._record_stats(plan, k_cache.element_size(), page_meta, page_mass)
        return (out, lse) if return_lse else out

    def _record_stats(self, plan: DecodePlan, elem_size: int, page_meta, page_mass) -> None:
        """What ``last_stats`` needs besides the kernel's counters, for a run of ``plan``."""
        bound = plan.termination.reads_page_metadata
        # Metadata read per selected page (bound, mass) and per page of the table (key-box scoring).
        meta_bytes = (page_meta.nbytes_per_page(plan.termination.mode) * plan.nnz if bound else 0) + (
            page_meta.key_box_bytes_per_page() * self._pages_in_table * plan.num_kv_heads
            if self._policy is not None and self._policy[0].reads_key_boxes else 0)
        self._raw_stats = (plan, elem_size, meta_bytes, page_mass,
                           page_meta.key_sketch_bytes_per_page() if plan.termination.mode == "bound" else 0)
        self._last_run_inputs = (elem_size, page_meta)

    def _visited_order(self, plan: DecodePlan) -> torch.Tensor:
        """``[nnz]`` the selection's pages in the order the last run visited them: the policy's,
        except in mode bound, whose pre-pass orders each work item's tail (``tail_visit_order``)."""
        return self._visit_pages if plan.termination.mode == "bound" else self._selection.pages

    def _page_mass(self, plan: DecodePlan, lse: torch.Tensor) -> torch.Tensor:
        """``[nnz]`` softmax mass of each selected page, summed over its group's query heads."""
        row_lse = lse.view(plan.num_rows, plan.group_size)[plan.visit_row]  # [nnz, G]
        return torch.exp2(self._page_lse[:, : plan.group_size] - row_lse).sum(-1)

    def _check_run_inputs(self, q, paged_kv_cache, plan: DecodePlan):
        """Validate q and the cache against the plan; return (K, V) as ``[pages, slot, head, dim]`` views."""
        if not isinstance(q, torch.Tensor):
            raise ValueError(f"q must be a torch.Tensor, got {type(q).__name__}")
        if q.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
        expected = (plan.batch_size, plan.num_qo_heads, plan.head_dim)
        if tuple(q.shape) != expected:
            raise ValueError(f"q must have shape [B, H_qo, D] = {list(expected)}, got {list(q.shape)}")
        if q.stride(-1) != 1:
            raise ValueError("q must be contiguous in its last dimension")
        device = plan.visit_phys.device
        if q.device != device:
            raise ValueError(f"q must be on the plan's device {device}, got {q.device}")
        k_cache, v_cache = unpack_paged_kv_cache(paged_kv_cache, self.kv_layout)
        if self.kv_layout == "HND":  # both backends index [page, slot, head, dim]
            k_cache, v_cache = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
        max_pages, page_size, num_kv_heads, head_dim = k_cache.shape
        if k_cache.device != device:
            raise ValueError(f"paged_kv_cache must be on the plan's device {device}, got {k_cache.device}")
        if k_cache.dtype != q.dtype:
            raise ValueError(f"paged_kv_cache dtype {k_cache.dtype} must equal q's dtype {q.dtype}")
        if (page_size, num_kv_heads, head_dim) != (plan.page_size, plan.num_kv_heads, plan.head_dim):
            raise ValueError(
                f"paged_kv_cache has page_size, H_kv, D = {(page_size, num_kv_heads, head_dim)}, "
                f"the plan {(plan.page_size, plan.num_kv_heads, plan.head_dim)}"
            )
        if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
            raise ValueError("paged_kv_cache must be contiguous in its last dimension")
        if plan.max_page_index >= max_pages:
            raise ValueError(f"kv_indices holds page {plan.max_page_index}, out of range for a cache of {max_pages} pages")
        return k_cache, v_cache

    def _select_pages(self, plan: DecodePlan, layer_id: int, q, page_meta) -> None:
        """Re-select with a per-layer policy, writing the plan's visit order in place."""
        policy, ctx, layout = self._policy
        policy.select(ctx, layout, layer_id, q, page_meta,
                      out=VisitBuffers(self._selection.pages, plan.visit_phys, plan.visit_tokens, plan.visit_slot))

    def _check_page_meta(self, page_meta, k_cache, plan: DecodePlan) -> None:
        if not isinstance(page_meta, PageMetadata):
            raise ValueError(f"page_meta must be a PageMetadata, got {type(page_meta).__name__}")
        expected = (k_cache.shape[0], plan.num_kv_heads, plan.head_dim)
        if tuple(page_meta.key_min.shape) != expected or page_meta.page_size != plan.page_size:
            raise ValueError(f"page_meta must describe the cache: key_min {list(expected)}, page_size {plan.page_size}")
        if page_meta.key_min.device != k_cache.device:
            raise ValueError(f"page_meta must be on {k_cache.device}, got {page_meta.key_min.device}")
        if plan.termination.reads_key_sketch and not page_meta.has_sketch:
            raise ValueError("page_meta has no key sketch, which termination mode 'bound' reads: "
                             "allocate it with PageMetadata.allocate(..., sketch=True)")

    @staticmethod
    def _prepass_segments(plan: DecodePlan) -> tuple[int, int, int, int]:
        """``(segment pages, segments per work item, estimate tile, sketch tile)`` of the bound pre-pass."""
        sketch_tile = sketch_tile_pages(plan.head_dim, plan.page_size)
        seg_pages = max(SEGMENT_PAGES, sketch_tile)
        segments = max(1, math.ceil(plan.max_work_blocks * plan.block_pages / seg_pages))
        return seg_pages, segments, min(BOUND_TILE, seg_pages), sketch_tile

    def _run_mass_prepass(self, plan: DecodePlan, q, page_meta, qk_scale: float) -> None:
        """Mode mass: at each block's first position, the estimated mass of the block and the
        work item's later blocks, which the decode kernel's check reads (``kernels/page_bounds.py``:
        the blocks' estimates, a program per tile of blocks; then their suffix sums, one per item)."""
        from .kernels.page_bounds import block_mass_estimate_kernel, block_suffix_kernel

        pages_pow2 = next_power_of_two(plan.block_pages)
        tile_blocks = max(1, ESTIMATE_TILE_PAGES // pages_pow2)
        grid = (plan.num_work, math.ceil(plan.max_work_blocks / tile_blocks))
        block_mass_estimate_kernel[grid](
            q, page_meta.key_min, page_meta.key_max, page_meta.key_scale,
            plan.visit_phys, plan.visit_tokens, plan.work_row, plan.work_start, plan.work_end, self._log2w,
            q.stride(0), q.stride(1), page_meta.key_min.stride(0), page_meta.key_min.stride(1),
            page_meta.key_scale.stride(0), qk_scale, plan.sm_scale,
            NUM_KV_HEADS=plan.num_kv_heads, GROUP_SIZE=plan.group_size, GROUP_PAD=self._group_pad,
            HEAD_DIM=plan.head_dim, BLOCK_D=min(ESTIMATE_BLOCK_D, plan.head_dim), BLOCK_PAGES=plan.block_pages,
            PAGES_POW2=pages_pow2, TILE_BLOCKS=tile_blocks,
            TENSOR_CORES=tensor_core_dots(q),
            num_warps=4, num_stages=ESTIMATE_STAGES,
        )
        eps = plan.termination.eps
        block_suffix_kernel[(plan.num_work,)](
            self._log2w, plan.work_start, plan.work_end, self._predicted_blocks,
            math.log2(eps) if eps > 0 else float("-inf"),
            GROUP_SIZE=plan.group_size, GROUP_PAD=self._group_pad, BLOCK_PAGES=plan.block_pages,
            TILE_BLOCKS=SUFFIX_TILE_ELEMENTS // self._group_pad,
        )
        if self._longest_first:
            torch.sort(self._predicted_blocks, descending=True, out=(self._predicted_sorted, self._work_order))

    def _run_bound_prepass(self, plan: DecodePlan, q, page_meta, qk_scale: float) -> None:
        """Mode bound: the per-position suffix terms the decode kernel's check reads
        (``kernels/page_bounds.py``: segments of ``SEGMENT_PAGES`` positions, one program each)."""
        from .kernels.page_bounds import (page_mass_estimate_kernel, page_sketch_bound_kernel,
                                          segment_carry_kernel, tail_order_kernel, tail_suffix_kernel)

        term = plan.termination
        group_pad = self._group_pad
        page_size_pow2 = next_power_of_two(plan.page_size)
        seg_pages, segments, estimate_tile, sketch_tile = self._prepass_segments(plan)
        grid = (plan.num_work, segments)
        seg_est, seg_vmax, seg_bounds = self._seg_est, self._seg_vmax, self._seg_bounds
        dot_in_input_dtype = tensor_core_dots(q)
        common = dict(NUM_KV_HEADS=plan.num_kv_heads, GROUP_SIZE=plan.group_size, GROUP_PAD=group_pad,
                      HEAD_DIM=plan.head_dim, SEG_PAGES=seg_pages, SEGMENTS=segments)
        page_mass_estimate_kernel[grid](
            q, page_meta.key_min, page_meta.key_max, page_meta.key_scale, page_meta.value_norm_max,
            plan.visit_phys, plan.visit_tokens, plan.work_row, plan.work_start, plan.work_end,
            self._log2w, self._vrest, seg_est, seg_vmax,
            q.stride(0), q.stride(1), page_meta.key_min.stride(0), page_meta.key_min.stride(1),
            page_meta.value_norm_max.stride(0), qk_scale, plan.sm_scale, VALUE_NORM_SCALE,
            BLOCK_D=min(ESTIMATE_BLOCK_D, plan.head_dim), TILE=estimate_tile, TENSOR_CORES=dot_in_input_dtype,
            **common,
        )
        # The scans after the sketch kernel carry only the group's lanes (rounded up to a power of
        # two), not GROUP_PAD's (tl.dot's 16 rows): the decode check reads no other.
        lanes = next_power_of_two(plan.group_size)
        carry = dict(GROUP_SIZE=plan.group_size, GROUP_PAD=group_pad, LANES=lanes, TILE=estimate_tile,
                     SEG_PAGES=seg_pages, SEGMENTS=segments, SEGMENTS_POW2=next_power_of_two(segments))
        segment_carry_kernel[grid](
            self._log2w, self._log2w_low, self._log2wv, self._vrest, seg_est, seg_est, seg_est, seg_vmax,
            plan.work_start, plan.work_end, 0.0, CERTIFIED=False, **carry,
        )
        self._sketch_pages.zero_()
        page_upper, page_lower = self._page_bounds
        page_sketch_bound_kernel[grid](
            q, page_meta.value_norm_max, page_meta.key_min, page_meta.key_scale, page_meta.key_codes,
            page_meta.key_grid_exponent, plan.visit_phys, plan.visit_tokens, plan.work_row, plan.work_start,
            plan.work_end, seg_est, self._log2w, self._log2w_low, self._log2wv, page_upper, page_lower, self._tail_key,
            self._sketch_pages, q.stride(0), q.stride(1), page_meta.value_norm_max.stride(0),
            page_meta.key_min.stride(0), page_meta.key_min.stride(1), page_meta.key_codes.stride(0),
            page_meta.key_codes.stride(1), page_meta.key_grid_exponent.stride(0), page_meta.key_grid_exponent.stride(1),
            qk_scale, VALUE_NORM_SCALE, math.log2(SKETCH_CUT_SHARE * term.eps) if term.eps > 0 else float("-inf"),
            TILE=sketch_tile, SEGMENTS_POW2=next_power_of_two(segments), DOT_IN_INPUT_DTYPE=dot_in_input_dtype,
            PAGE_SIZE_POW2=page_size_pow2, num_stages=SKETCH_STAGES, **common,
        )
        width_pow2 = next_power_of_two(plan.max_work_blocks * plan.block_pages)
        tail_order_kernel[(plan.num_work,)](
            self._tail_key, self._sketch_pages, plan.work_row, plan.work_start, plan.work_end, plan.row_start,
            plan.visit_phys, plan.visit_tokens, self._selection.pages, self._visit_perm, self._visit_phys,
            self._visit_tokens, self._visit_pages, term.min_pages,
            WIDTH_POW2=width_pow2, num_warps=tail_order_warps(width_pow2),
        )
        tail_suffix_kernel[grid](
            page_meta.value_norm_max, self._visit_perm, self._visit_phys, plan.work_row, plan.work_start, plan.work_end,
            self._sketch_pages, page_upper, page_lower, self._log2w, self._log2w_low, self._log2wv, self._vrest,
            *seg_bounds, seg_vmax, page_meta.value_norm_max.stride(0), VALUE_NORM_SCALE,
            NUM_KV_HEADS=plan.num_kv_heads, GROUP_PAD=group_pad, LANES=lanes, TILE=TAIL_SUFFIX_TILE,
            SEG_PAGES=seg_pages, SEGMENTS=segments,
        )
        segment_carry_kernel[grid](
            self._log2w, self._log2w_low, self._log2wv, self._vrest, *seg_bounds, seg_vmax,
            plan.work_start, plan.work_end, LOG2_SLACK, CERTIFIED=True, **carry,
        )

    def _run_triton(self, plan, q, k_cache, v_cache, page_meta, out, lse) -> None:
        from .kernels.art_decode import art_decode_kernel, art_merge_kernel

        term = plan.termination
        group_pad = self._group_pad
        qk_scale = plan.sm_scale * LOG2E
        if term.mode == "mass":
            self._run_mass_prepass(plan, q, page_meta, qk_scale)
        elif term.mode == "bound":
            self._run_bound_prepass(plan, q, page_meta, qk_scale)
        if term.mode == "bound":  # the row's largest value norm (mode mass never reads them)
            self._vscale.zero_().scatter_reduce_(0, plan.work_row.long(), self._vrest[plan.work_start.long()], "amax")
        # bound visits each work item's tail in the order of its mass bounds (the pre-pass's).
        visit = (self._visit_phys, self._visit_tokens) if term.mode == "bound" else (plan.visit_phys, plan.visit_tokens)
        block_n, num_warps, num_stages = self._kernel_launch(plan, q.device, k_cache.element_size())
        interpreted = triton_interpreter_enabled()
        # The interpreter computes bf16 dots wrongly and truncates fp32 -> bf16 stores; there,
        # dot in fp32 and let torch round the output.
        dot_in_input_dtype = tensor_core_dots(q)
        final_out = out
        if interpreted and out.dtype == torch.bfloat16:
            out = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        art_decode_kernel[(plan.num_work // plan.heads_per_item,)](
            q, k_cache, v_cache, out, lse, self._part_out, self._part_lse,
            *visit, self._work_order, plan.work_row, plan.work_start, plan.work_end, plan.row_start,
            plan.row_work_indptr, self._log2w,
            self._vrest, self._vscale, self._log2w_low, self._log2wv,
            self._visited_pages, self._visited_tokens, self._loaded_tokens, self._stable_at, self._page_lse,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
            qk_scale, term.tau_mag, term.tau_dir, term.eps, term.patience, term.min_pages, OVERFLOW_LOG2, MASS_MAX_SHARE,
            MASS_PULL_CHECKS,
            NUM_KV_HEADS=plan.num_kv_heads, GROUP_SIZE=plan.group_size, GROUP_PAD=group_pad,
            HEAD_DIM=plan.head_dim, PAGE_SIZE=plan.page_size, BLOCK_PAGES=plan.block_pages, BLOCK_N=block_n,
            MODE=term.mode_code, VALUES_RELATIVE=term.relative_to == "values", SPLIT=plan.split,
            DOT_IN_INPUT_DTYPE=dot_in_input_dtype, PAGE_MASS=self._record_page_mass, PASS_BLOCKS=PASS_BLOCKS,
            SPECULATE=plan.head_dim <= SPECULATE_MAX_HEAD_DIM, HEADS=plan.heads_per_item,
            num_warps=num_warps, num_stages=num_stages,
        )
        if plan.split:
            art_merge_kernel[(plan.num_rows, plan.group_size)](
                self._part_out, self._part_lse, plan.row_work_indptr, out, lse, out.stride(0), out.stride(1),
                NUM_KV_HEADS=plan.num_kv_heads, GROUP_SIZE=plan.group_size, GROUP_PAD=group_pad,
                HEAD_DIM=plan.head_dim, CHUNKS=MERGE_TILE_ELEMENTS // plan.head_dim,
            )
        if out is not final_out:
            final_out.copy_(out)

    @staticmethod
    def _kernel_launch(plan: DecodePlan, device: torch.device, element_size: int) -> tuple[int, int, int]:
        """``(BLOCK_N, num_warps, num_stages)`` of the decode kernel for ``plan`` (K/V of
        ``element_size`` bytes): what ``run`` launches, and what benchmarks report."""
        block_n = max(16, next_power_of_two(plan.block_pages * plan.page_size))
        return (block_n, BatchARTDecodeWrapper._num_warps(plan, device),
                BatchARTDecodeWrapper._num_stages(plan, block_n, element_size))

    @staticmethod
    def _num_warps(plan: DecodePlan, device: torch.device) -> int:
        if NUM_WARPS is not None:
            return NUM_WARPS
        if plan.termination.mode != "stability" or plan.head_dim > 128 or device.type != "cuda":
            return 4
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return STABILITY_WARPS if plan.num_work >= STABILITY_WARPS_MIN_ITEMS * sms else 4

    @staticmethod
    def _num_stages(plan: DecodePlan, block_n: int, element_size: int) -> int:
        """Pipeline depth: 3 for head_dim <= 64 (small tiles), else 2; fewer if the tiles don't fit."""
        stages = NUM_STAGES or (3 if plan.head_dim <= 64 else 2)
        tile_bytes = 2 * block_n * plan.heads_per_item * plan.head_dim * element_size  # K and V
        while stages > 1 and stages * tile_bytes > SHARED_MEMORY_BUDGET:
            stages -= 1
        return stages

    @property
    def last_stats(self) -> DecodeStats:
        """Statistics of the last ``run`` (computed on access, on the device)."""
        if self._raw_stats is None:
            raise ValueError("last_stats: no run() since the last plan()")
        plan, elem_size, meta_bytes, page_mass, sketch_bytes = self._raw_stats
        rows = plan.work_row.long()
        device = plan.visit_phys.device
        batch, hkv, hqo = plan.batch_size, plan.num_kv_heads, plan.num_qo_heads
        visited = torch.zeros(plan.num_rows, dtype=torch.int32, device=device).index_add_(0, rows, self._visited_pages)
        tokens = torch.zeros(plan.num_rows, dtype=torch.int32, device=device).index_add_(0, rows, self._visited_tokens)
        never = torch.iinfo(torch.int32).max
        first = torch.where(self._stable_at < 0, never, self._stable_at)[:, : plan.group_size]
        stable = torch.full((plan.num_rows, plan.group_size), never, dtype=torch.int32, device=device)
        stable.scatter_reduce_(0, rows[:, None].expand_as(first), first, "amin")
        stable = torch.where(stable == never, -1, stable)
        loaded = torch.zeros(plan.num_rows, dtype=torch.int32, device=device).index_add_(0, rows, self._loaded_tokens)
        kv_bytes = loaded.long().sum() * 2 * plan.head_dim * elem_size + meta_bytes
        sketch_pages = None
        if sketch_bytes:
            sketch_pages = torch.zeros(plan.num_rows, dtype=torch.int32, device=device).index_add_(
                0, rows, self._sketch_pages)
            kv_bytes = kv_bytes + sketch_pages.long().sum() * sketch_bytes
            sketch_pages = sketch_pages.view(batch, hkv)
        return DecodeStats(
            visited_pages=visited.view(batch, hkv),
            selected_pages=plan.selected_pages,
            visited_tokens=tokens.view(batch, hkv),
            stable_at=stable.view(batch, hqo),
            kv_bytes_read=kv_bytes,
            # A copy: a per-layer policy rewrites the plan's pages in place on the next run.
            selection=PageSelection(self._selection.indptr, self._visited_order(plan).clone()),
            page_mass=page_mass,
            sketch_pages=sketch_pages,
            loaded_tokens=loaded.view(batch, hkv),
        )
