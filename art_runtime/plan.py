"""Decode plans: the visit order flattened to physical pages, cut into parallel work items.

``build_plan`` runs once per decode step (``BatchARTDecodeWrapper.plan``) and is reused by
every layer. It may synchronize with the device; ``run`` never does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .selection import PageSelection, physical_pages
from .termination import TerminationConfig

MAX_BLOCK_TOKENS = 256


@dataclass
class DecodePlan:
    """Everything ``run`` needs besides q, the cache and the metadata.

    Row ``r = b * H_kv + h`` is one (request, KV head); its visit order occupies positions
    ``row_start[r] .. row_start[r + 1]`` of the flat ``visit_*`` arrays. A work item is a
    contiguous chunk of those positions, a whole number of termination blocks long. In mode
    ``mass`` a split row's blocks are dealt to its chunks in turn (``visit_slot``), so that
    every chunk holds a like share of the row's mass (``interleaved_slots``).

    With ``heads_per_item`` > 1 (mode ``off`` on a visit order that every KV head shares) one
    program of the Triton kernel reads that many adjacent KV heads' work items together, whole
    token rows at a time; the work items stay one per (row, chunk), each with its own output.
    """

    batch_size: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    block_pages: int
    termination: TerminationConfig
    sm_scale: float
    max_page_index: int            # largest physical page id in the page table (-1 if none)
    row_start: torch.Tensor        # [R + 1] int32: selection indptr
    visit_phys: torch.Tensor       # [nnz] int32 physical page of each visit-order position
    visit_tokens: torch.Tensor     # [nnz] int32 tokens held by that page
    visit_row: torch.Tensor        # [nnz] int64 row of each position
    work_row: torch.Tensor         # [W] int32
    work_start: torch.Tensor       # [W] int32 first position (absolute)
    work_end: torch.Tensor         # [W] int32 one past the last position
    row_work_indptr: torch.Tensor  # [R + 1] int32: work items of each row
    selected_pages: torch.Tensor   # [B, H_kv] int32
    max_work_blocks: int           # blocks of the longest work item
    visit_slot: torch.Tensor | None = None  # [nnz] int32 position of each row's k-th entry; None: k-th
    heads_per_item: int = 1        # adjacent KV heads one program reads together (shared_heads_per_item)

    @property
    def group_size(self) -> int:
        return self.num_qo_heads // self.num_kv_heads

    @property
    def num_rows(self) -> int:
        return self.batch_size * self.num_kv_heads

    @property
    def num_work(self) -> int:
        return self.work_row.numel()

    @property
    def split(self) -> bool:
        """True when some row is cut into several work items (their outputs are merged)."""
        return self.num_work > self.num_rows

    @property
    def nnz(self) -> int:
        return self.visit_phys.numel()


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= ``n`` (``n >= 1``): Triton tile sizes."""
    return 1 << (n - 1).bit_length()


def group_tile(group_size: int) -> int:
    """Query rows of a kernel tile holding one GQA group: a power of two, at least 16 (tl.dot)."""
    return max(16, next_power_of_two(group_size))


# Widest K/V tile row (heads x head_dim) that one program reads when KV heads share a visit order,
# and the share of the group's tile rows that their query heads must fill.
SHARED_HEADS_MAX_WIDTH = 128
SHARED_HEADS_MIN_FILL = 7 / 8


def shared_heads_per_item(num_kv_heads: int, group_size: int, head_dim: int) -> int:
    """Adjacent KV heads that one program can read together when every head visits the same
    pages in the same order (mode ``off`` on a dense selection): the largest power of two that
    divides ``num_kv_heads``, whose query heads still fit the group's tile (``group_tile``, so no
    extra tensor-core rows) and whose token rows are at most ``SHARED_HEADS_MAX_WIDTH`` wide;
    one unless their query heads then fill at least ``SHARED_HEADS_MIN_FILL`` of the tile.
    Whether a plan uses them is ``BatchARTDecodeWrapper.plan``'s choice (NHD caches, the
    default blocks, and enough work items left to fill the device: ``rows_fill_slots``).

    Why: the heads of a page's token are adjacent in FlashInfer's NHD layout, so two heads at
    head_dim 64 read 256 contiguous bytes a token instead of 128, and one page-table walk serves
    both. Each query row's logits come from its own head's columns (the kernel loads q
    block-diagonally), so the extra halves of the dots are zeros, free in a loop bound by memory.
    H200, 14/2/64 at batch 16-128 / 16K-32K (benchmarks/NOTES.md v51): ART's time -5.5 to -12%,
    0.88-0.99x -> 0.98-1.05x FlashInfer's throughput. Two heads at head_dim 128 (512-byte rows)
    ran as fast at batch 64-128 and 12% slower at batch 16 (their tile spills, or halves the
    tokens a step), hence the width. Across groups at head_dim 64 (H200, NOTES v54, both on the
    slots that fit an SM): where two heads' query heads fill 14-16 of the tile's 16 rows (groups
    7 and 8: 14/2/64, 32/4/64, 64/8/64) reading them together took 0-15% less time at batch 16-128
    (but 3-12% more at batch 48 / 4K); at groups 1 and 4 (32/32/64, 32/8/64 as Llama-3.2-1B,
    16/4/64) one head a program took up to 28% less, at group 2 the two were within -7..+12%;
    hence the fill. Why half-empty tiles lose was not found: the compiled loops are the same at
    every group.
    """
    tile_rows = group_tile(group_size)
    heads = 1
    while (num_kv_heads % (2 * heads) == 0 and 2 * heads * group_size <= tile_rows
           and 2 * heads * head_dim <= SHARED_HEADS_MAX_WIDTH):
        heads *= 2
    return heads if heads * group_size >= SHARED_HEADS_MIN_FILL * tile_rows else 1


def rows_fill_slots(num_rows: int, row_blocks: int, slots: int) -> bool:
    """Whether ``num_rows`` rows of ``row_blocks`` blocks, cut into at most
    ``MAX_CHUNKS_PER_ROW`` chunks of at least ``min_chunk_blocks`` (mode off), make at least
    ``slots`` work items."""
    return num_rows * min(MAX_CHUNKS_PER_ROW, max(1, row_blocks // min_chunk_blocks(False))) >= slots


# A row is cut into at most this many chunks: the merge reads every chunk of a row, and past
# ~64 it costs more than the shorter chains save (H100, mode off, 14/2/64 at batch 1 / 32K:
# 64 chunks a row 20.7 µs, 128 chunks 23.2 µs; benchmarks/NOTES.md v15).
MAX_CHUNKS_PER_ROW = 64


def min_chunk_blocks(terminates: bool) -> int:
    """Fewest blocks in a chunk of a split row: 2 without termination (shorter chunks cost more
    in merge traffic than they gain), 16 with (room for the chunk to stop on its own)."""
    return 16 if terminates else 2


def choose_chunk_pages(longest_row: int, num_rows: int, block_pages: int, parallel_programs: int,
                       terminates: bool) -> int:
    """Pages per work item for ``parallel_programs`` program slots (no split if rows fill them).

    Without termination (every block read) the split is ``wave_splits``'s, which fills whole
    waves of the slots, at most ``MAX_CHUNKS_PER_ROW`` chunks; with termination on a row is cut
    into ``round(slots / rows)`` chunks. Chunks are at least ``min_chunk_blocks`` long.
    """
    min_blocks = min_chunk_blocks(terminates)
    if not num_rows:
        return max(longest_row, 1)
    if terminates:
        # Rounded, not ceiled: a near-miss of a whole number of waves costs little (v5 in
        # benchmarks/NOTES.md: 256 rows for 264 slots ran best unsplit).
        splits = min(round(parallel_programs / num_rows), MAX_CHUNKS_PER_ROW)
    else:
        row_blocks = math.ceil(longest_row / block_pages)
        splits = wave_splits(num_rows, row_blocks, parallel_programs,
                                max(1, min(MAX_CHUNKS_PER_ROW, row_blocks // min_blocks)))
    if splits <= 1:
        return max(longest_row, 1)
    return max(min_blocks * block_pages, math.ceil(longest_row / splits))


# What a work item costs besides its blocks, in blocks: the program's start and pipeline fill,
# and its partial output for the merge.
SPLIT_ITEM_BLOCKS = 2


def wave_splits(num_rows: int, row_blocks: int, parallel_programs: int, most: int) -> int:
    """Chunks per row (1 .. ``most``) for rows of ``row_blocks`` blocks that read every one: the
    fewest that minimize the predicted time, the waves of work items on the slots,
    ``ceil(rows * splits / slots)``, times a work item's blocks plus ``SPLIT_ITEM_BLOCKS``. Every
    row counts as ``row_blocks`` long (the longest's): shorter rows make fewer, shorter items, so
    with mixed lengths it may split more than the waves need.

    Cutting rows into ``round(slots / rows)`` chunks leaves a wave part-empty unless rows and
    slots are powers of two apart (as at the core benchmark's batches, where this model agrees
    with it): on an H200 (benchmarks/NOTES.md v52) 192 rows (SmolLM2-135M's 3 KV heads at batch
    64) ran on 264 slots as one wave of whole rows, 60 SMs holding two; 4 chunks a row took
    20-25% less time; 296 rows (32/8/128 at batch 37) 23-30% less with 4 (8K) and 8 (32K); 96
    rows at head_dim 128 29% less with 8 than with the rounded 3. The slots must be the
    device's: 72 rows at head_dim 64 ran 10-16% slower with the 7 chunks planned for 2 programs
    an SM than with 4, where 3 fit (``decode.off_programs_per_sm``; NOTES v53).
    """
    best_splits, best = 1, math.ceil(num_rows / parallel_programs) * (row_blocks + SPLIT_ITEM_BLOCKS)
    for splits in range(2, most + 1):
        waves = math.ceil(num_rows * splits / parallel_programs)
        time = waves * (math.ceil(row_blocks / splits) + SPLIT_ITEM_BLOCKS)
        if time < best:
            best_splits, best = splits, time
    return best_splits


def interleaved_slots(row_start: torch.Tensor, chunks_per_row: torch.Tensor, chunk_pages: int,
                      block_pages: int) -> torch.Tensor:
    """``[nnz]`` int64: the position of each row's ``k``-th entry when its blocks are dealt to
    its chunks in turn.

    A row of ``n`` pages cut into ``K`` chunks of ``chunk_pages`` (the last holds the rest) gets
    its blocks (``block_pages`` consecutive entries of its order) dealt round-robin: first to all
    ``K`` chunks while the last has room for whole blocks, then to the first ``K - 1``; a
    partial last block goes to the last chunk. Each chunk keeps its size, and holds blocks from
    the whole order instead of one stretch of it.

    Why (mode ``mass``, whose chunks judge their own unread share): a row's order runs from its
    heaviest pages to its lightest, so a contiguous second chunk holds light pages that must
    still meet eps relative to themselves. On Qwen2.5-0.5B at batch 64 (2 chunks a row on an
    H100) that read 75% of the pages against 50-55% for whole rows; dealt, the chunks read
    54-58% and the layer ran 9-11% faster (``benchmarks/results/dealt_chunks_2026-11-28/``).
    """
    device = row_start.device
    lengths = (row_start[1:] - row_start[:-1]).long()
    nnz = int(row_start[-1]) if row_start.numel() else 0
    row = torch.arange(lengths.numel(), device=device).repeat_interleave(lengths)
    first, length, chunks = row_start[:-1].long()[row], lengths[row], chunks_per_row.long()[row]
    rank = torch.arange(nnz, device=device) - first
    # whole blocks of the last chunk (it takes one in each of the first rounds)
    last_blocks = (length - (chunks - 1) * chunk_pages) // block_pages
    block, offset = rank // block_pages, rank % block_pages
    first_rounds = chunks * last_blocks
    rest = block - first_rounds
    spread = torch.clamp(chunks - 1, min=1)
    chunk = torch.where(block < first_rounds, block % chunks, rest % spread)
    index = torch.where(block < first_rounds, block // chunks, last_blocks + rest // spread)
    partial = block * block_pages + block_pages > length  # the row's partial last block
    chunk = torch.where(partial, chunks - 1, chunk)
    index = torch.where(partial, last_blocks, index)
    return first + chunk * chunk_pages + index * block_pages + offset


def dealt(values: torch.Tensor, visit_slot: torch.Tensor) -> torch.Tensor:
    """A copy of ``values`` (entries in each row's policy order) with entry ``k`` moved to
    ``visit_slot[k]``; entries past the slots (padding) stay where they are."""
    out = values.clone()
    out[visit_slot.long()] = values[:visit_slot.numel()]
    return out


def kernel_block_pages(termination: TerminationConfig, page_size: int, tile_tokens: int) -> int:
    """Pages per kernel block: ``tile_tokens`` worth in mode ``off`` (it checks nothing), else
    the termination's check block (``block_pages`` or its mode's default, capped by the tile)."""
    if termination.mode == "off" and termination.block_pages is None:
        return max(1, tile_tokens // page_size)
    return termination.pages_per_block(page_size, tile_tokens)


def heads_share_selection(selection: PageSelection, lengths: torch.Tensor, visit_row: torch.Tensor,
                          num_kv_heads: int, heads: int) -> bool:
    """Whether each group of ``heads`` adjacent KV heads' rows (``lengths``, entries' ``visit_row``)
    holds the same pages in the same order: entry ``i`` of a row equals entry ``i`` of the next
    row in its group, ``lengths[row]`` entries on."""
    group_rows = lengths.view(-1, heads)
    if not bool((group_rows == group_rows[:, :1]).all()):
        return False
    pages = selection.pages[: visit_row.numel()]
    has_next = (visit_row % num_kv_heads) % heads != heads - 1
    at = torch.nonzero(has_next).flatten()
    return bool(torch.equal(pages[at], pages[at + lengths[visit_row[at]]]))


def build_plan(
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    termination: TerminationConfig,
    sm_scale: float,
    selection: PageSelection,
    chunk_pages: int | None,
    parallel_programs: int,
    tile_tokens: int,
    heads_per_item: int = 1,
) -> DecodePlan:
    """Flatten ``selection`` through the page table and cut it into work items.

    ``chunk_pages`` None lets ``parallel_programs`` decide; bound mode relative to the output
    is never split (its criterion needs the whole row's state, see ``TerminationConfig``).
    ``tile_tokens`` is the longest tile that reads fastest for this head_dim: mode ``off``
    checks nothing, so unless ``block_pages`` is set its blocks are that long; the other
    modes' default blocks (``DEFAULT_BLOCK_TOKENS``) are capped by it. ``heads_per_item``
    (``shared_heads_per_item``; only for a selection every KV head shares, in mode ``off``)
    programs each take that many rows' chunks, so the rows are cut for ``parallel_programs``
    times as many work items, and ``tile_tokens`` is the tile of those heads' rows together.
    """
    group_size = num_qo_heads // num_kv_heads
    if heads_per_item > 1 and (termination.mode != "off" or heads_per_item & (heads_per_item - 1)
                               or num_kv_heads % heads_per_item or heads_per_item * group_size > group_tile(group_size)):
        raise ValueError(f"heads_per_item {heads_per_item}: only in mode off, a power of two dividing num_kv_heads "
                         f"({num_kv_heads}) whose query heads fit the group's tile ({group_tile(group_size)} rows)")
    device = kv_indptr.device
    batch_size = kv_last_page_len.numel()
    block_pages = kernel_block_pages(termination, page_size, tile_tokens)
    if block_pages * page_size > MAX_BLOCK_TOKENS:
        raise ValueError(
            f"termination.block_pages * page_size must be <= {MAX_BLOCK_TOKENS} tokens, "
            f"got {block_pages} * {page_size}"
        )
    row_start = selection.indptr
    nnz = int(row_start[-1]) if row_start.numel() else 0
    lengths = (row_start[1:] - row_start[:-1]).long()
    num_rows = lengths.numel()
    visit_row = torch.arange(num_rows, device=device).repeat_interleave(lengths)
    visit_phys, visit_tokens = physical_pages(kv_indptr, kv_indices, kv_last_page_len, page_size,
                                              visit_row // num_kv_heads, selection.pages[:nnz])

    if heads_per_item > 1 and not heads_share_selection(selection, lengths, visit_row, num_kv_heads, heads_per_item):
        raise ValueError(f"heads_per_item {heads_per_item}: every group of that many adjacent KV heads must visit "
                         "the same pages in the same order")
    longest = int(lengths.max()) if num_rows else 0
    no_split = termination.mode == "bound" and termination.relative_to == "output"
    if chunk_pages is None:
        chunk_pages = longest if no_split else choose_chunk_pages(
            longest, num_rows, block_pages, parallel_programs * heads_per_item, termination.mode != "off")
    elif no_split and chunk_pages < longest:
        raise ValueError("chunk_pages: bound mode relative to the output cannot split a row; use relative_to='values'")
    if chunk_pages < 1:
        raise ValueError(f"chunk_pages must be >= 1, got {chunk_pages}")
    chunk_pages = math.ceil(chunk_pages / block_pages) * block_pages
    chunks_per_row = (lengths + chunk_pages - 1) // chunk_pages
    row_work_indptr = torch.zeros(num_rows + 1, dtype=torch.long, device=device)
    row_work_indptr[1:] = chunks_per_row.cumsum(0)
    work_row = torch.arange(num_rows, device=device).repeat_interleave(chunks_per_row)
    chunk_rank = torch.arange(work_row.numel(), device=device) - row_work_indptr[:-1][work_row]
    work_start = row_start[:-1].long()[work_row] + chunk_rank * chunk_pages
    work_end = torch.minimum(work_start + chunk_pages, row_start[1:].long()[work_row])
    visit_slot = None
    if termination.mode == "mass" and num_rows and int(chunks_per_row.max()) > 1:
        visit_slot = interleaved_slots(row_start, chunks_per_row, chunk_pages, block_pages).to(torch.int32)
        visit_phys, visit_tokens = dealt(visit_phys, visit_slot), dealt(visit_tokens, visit_slot)

    return DecodePlan(
        batch_size=batch_size,
        num_qo_heads=num_qo_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=page_size,
        block_pages=block_pages,
        termination=termination,
        sm_scale=sm_scale,
        max_page_index=int(kv_indices[: int(kv_indptr[-1])].max()) if batch_size else -1,
        row_start=row_start,
        visit_phys=visit_phys,
        visit_tokens=visit_tokens,
        visit_row=visit_row,
        work_row=work_row.to(torch.int32),
        work_start=work_start.to(torch.int32),
        work_end=work_end.to(torch.int32),
        row_work_indptr=row_work_indptr.to(torch.int32),
        selected_pages=lengths.view(batch_size, num_kv_heads).to(torch.int32),
        max_work_blocks=math.ceil(min(chunk_pages, longest) / block_pages) if num_rows else 0,
        visit_slot=visit_slot,
        heads_per_item=heads_per_item,
    )
