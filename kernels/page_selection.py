"""Triton kernel: a policy's scores to its ordered page selection, one program per row.

One program per (request, KV head) row. It loads the row's page scores, forces the sink page
(0) first and the current page (the request's last) second, and finds the row's ``kept``-th
largest score exactly by a radix select on the scores' 32-bit order keys (rounds of a 256-bin
histogram over the row, in registers, in unsigned 32-bit arithmetic). Two rounds fix the
threshold's top 16 bits; the pages above them and the few sharing them are then sorted
together (``CAND_POW2`` slots), or, when too many share them, two more rounds find the exact
threshold and only the kept pages are sorted (score order, ties to the lower position). Sorting the kept pages instead of the whole row is what makes this cheap
next to the scoring pass that reads every page's key box: a top-k over the row costs as much
as that pass. (Selecting in the scoring kernel's last program of each row instead, to save
the launch, measured slower: the selection's registers cost the scoring its occupancy;
benchmarks/NOTES.md p5.)
"""

import triton
import triton.language as tl


@triton.jit
def _radix_rounds(key, present, threshold, remaining, FIRST_SHIFT: tl.constexpr, LAST_SHIFT: tl.constexpr):
    """Radix-select rounds on bytes ``FIRST_SHIFT`` down to ``LAST_SHIFT`` of the uint32 ``key``s:
    the threshold's bytes and how many keys equal to it are still to take."""
    bins = tl.arange(0, 256)
    for shift in tl.static_range(FIRST_SHIFT, LAST_SHIFT - 8, -8):
        if shift == 24:
            match = present
        else:
            match = present & ((key >> (shift + 8)) == (threshold >> (shift + 8)))
        hist = tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=match)
        at_least = tl.cumsum(hist, 0, reverse=True)  # matching keys with this byte >= bin
        best = tl.max(tl.where(at_least >= remaining, (bins << 20) | (at_least - hist), -1), 0)
        remaining -= best & 0xFFFFF
        threshold = threshold | ((best >> 20).to(tl.uint32) << shift)
    return threshold, remaining


@triton.jit
def _sort_kept(take, slot, unique_key, count, kept, scratch_ptr, pages_ptr,
               SORT_POW2: tl.constexpr, WIDTH_POW2: tl.constexpr):
    """Compact the ``take`` keys to their ``slot``s, sort the ``count`` of them, store the first ``kept`` pages."""
    tl.store(scratch_ptr + slot, unique_key, mask=take)
    tl.debug_barrier()  # the block's stores above are visible to its loads below
    c = tl.arange(0, SORT_POW2)
    chosen = tl.load(scratch_ptr + c, mask=c < count, other=-9223372036854775808)
    chosen = tl.sort(chosen, descending=True)
    page = WIDTH_POW2 - 1 - (chosen & 0xFFFFFFFF)
    tl.store(pages_ptr + c, page.to(tl.int32), mask=c < kept)


@triton.jit
def select_top_pages_kernel(
    scores_ptr,        # [R, width] fp32, higher is kept and visited first
    kv_indptr_ptr,     # [B + 1] int32 page-table row pointers
    sel_indptr_ptr,    # [R + 1] int32 selection row pointers (kept pages per row)
    scratch_ptr,       # scratch: [R, CAND_POW2] int64
    pages_ptr,         # out: [nnz] int32 logical pages in visit order
    stride_sr,
    NUM_KV_HEADS: tl.constexpr, WIDTH_POW2: tl.constexpr, KEPT_POW2: tl.constexpr, CAND_POW2: tl.constexpr,
):
    row = tl.program_id(0)
    request = row // NUM_KV_HEADS
    num_pages = tl.load(kv_indptr_ptr + request + 1) - tl.load(kv_indptr_ptr + request)
    start = tl.load(sel_indptr_ptr + row)
    kept = tl.load(sel_indptr_ptr + row + 1) - start
    pos = tl.arange(0, WIDTH_POW2)
    present = pos < num_pages
    score = tl.load(scores_ptr + row * stride_sr + pos, mask=present, other=float("-inf"))
    score = tl.minimum(score, 3.4028232635611926e38)  # below the forced pages' scores, even +inf
    score = tl.where(pos == num_pages - 1, 3.4028234663852886e38, score)  # the current page: second
    score = tl.where(pos == 0, float("inf"), score)  # the sink: first
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed int32 order = float order
    key = (ordered ^ -2147483648).to(tl.uint32, bitcast=True)  # the same order, unsigned: radix digits

    unique_key = (ordered.to(tl.int64) << 32) | (WIDTH_POW2 - 1 - pos).to(tl.int64)  # ties: the lower position first
    scratch = scratch_ptr + row * CAND_POW2

    # Radix select of the kept-th largest key, one byte per round from the top; per round one
    # histogram, one suffix sum and one max (the max packs the digit and the keys above it).
    # Two rounds resolve the top 16 bits (sign, exponent, 7 mantissa bits): the keys above
    # that prefix are kept, and those sharing it are candidates, usually a handful.
    threshold, remaining = _radix_rounds(key, present, tl.zeros([], dtype=tl.uint32), kept, 24, 16)
    above = present & ((key >> 16) > (threshold >> 16))
    candidate = present & ((key >> 16) == (threshold >> 16))
    count = kept - remaining + tl.sum(candidate.to(tl.int32), 0)
    if count <= CAND_POW2:
        # Sort the kept and the candidates together; the first `kept` are the selection.
        take = above | candidate
        _sort_kept(take, tl.cumsum(take.to(tl.int32), 0) - 1, unique_key, count, kept, scratch, pages_ptr + start,
                   CAND_POW2, WIDTH_POW2)
    else:
        # Too many share the prefix (ties): two more rounds find the exact threshold; keep the
        # keys above it and the first `remaining` equal to it (one scan counts both).
        threshold, remaining = _radix_rounds(key, present, threshold, remaining, 8, 0)
        above = present & (key > threshold)
        equal = present & (key == threshold)
        counts = tl.cumsum((above.to(tl.int64) << 32) | equal.to(tl.int64), 0)
        equal_rank = (counts & 0xFFFFFFFF).to(tl.int32)
        take = above | (equal & (equal_rank <= remaining))
        slot = (counts >> 32).to(tl.int32) + tl.minimum(equal_rank, remaining) - 1
        _sort_kept(take, slot, unique_key, kept, kept, scratch, pages_ptr + start, KEPT_POW2, WIDTH_POW2)
