"""Triton kernel: a policy's scores to its ordered page selection, one program per row.

One program per (request, KV head) row. It loads the row's page scores, forces the sink page
(0) first and the current page (the request's last) second, and finds the row's ``kept``-th
largest score exactly by a radix select on the scores' 32-bit order keys (four rounds of a
256-bin histogram over the row, in registers, in unsigned 32-bit arithmetic). The pages above
that threshold, and as many tied with it as fit (the lower positions first), are compacted
into the selection, and only those ``kept`` entries are sorted (score order, ties to the
lower position); when every row keeps all its pages (``KEEP_ALL``, a dense order) the row is
sorted as it is, with no threshold to find. With ``PHYSICAL`` it also writes each entry's physical page id and token
count, so that a per-layer selection fills the decode plan's visit arrays in this one launch
(the dozen gathers that did it in torch cost about as much as the selection itself). Sorting the kept pages instead of the whole row is what makes this cheap
next to the scoring pass that reads every page's key box: a top-k over the row costs as much
as that pass. (Selecting in the scoring kernel's last program of each row instead, to save
the launch, measured slower: the selection's registers cost the scoring its occupancy;
benchmarks/NOTES.md p5.)
"""

import triton
import triton.language as tl


@triton.jit
def select_top_pages_kernel(
    scores_ptr,        # [R, width] fp32, higher is kept and visited first
    kv_indptr_ptr,     # [B + 1] int32 page-table row pointers
    sel_indptr_ptr,    # [R + 1] int32 selection row pointers (kept pages per row)
    keys_ptr,          # scratch: [nnz] int64
    pages_ptr,         # out: [nnz] int32 logical pages in visit order
    kv_indices_ptr,    # [pages in table] int32 physical page ids (read with PHYSICAL)
    kv_last_page_len_ptr,  # [B] int32 tokens in each request's last page (read with PHYSICAL)
    phys_ptr,          # out (PHYSICAL): [nnz] int32 physical page of each entry
    tokens_ptr,        # out (PHYSICAL): [nnz] int32 tokens of each entry's page
    stride_sr, page_size,
    NUM_KV_HEADS: tl.constexpr, WIDTH_POW2: tl.constexpr, KEPT_POW2: tl.constexpr, KEEP_ALL: tl.constexpr,
    PHYSICAL: tl.constexpr,
):
    row = tl.program_id(0)
    request = row // NUM_KV_HEADS
    first_page = tl.load(kv_indptr_ptr + request)
    num_pages = tl.load(kv_indptr_ptr + request + 1) - first_page
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
    unique_key = (ordered.to(tl.int64) << 32) | (WIDTH_POW2 - 1 - pos).to(tl.int64)  # ties: the lower position first
    k = tl.arange(0, KEPT_POW2)
    if KEEP_ALL:  # KEPT_POW2 == WIDTH_POW2: the whole row, in registers
        chosen = tl.sort(tl.where(present, unique_key, -9223372036854775808), descending=True)
    else:
        # Radix select: the kept-th largest key, one byte per round from the top. Per round
        # one histogram, one suffix sum and one max: the max packs (digit, keys above it) so
        # that a single reduction finds both.
        key = (ordered ^ -2147483648).to(tl.uint32, bitcast=True)  # the same order, unsigned: radix digits
        threshold = tl.zeros([], dtype=tl.uint32)
        remaining = kept  # how many of the keys matching the threshold so far are still to take
        bins = tl.arange(0, 256)
        for shift in tl.static_range(24, -8, -8):
            if shift == 24:
                match = present
            else:
                match = present & ((key >> (shift + 8)) == (threshold >> (shift + 8)))
            hist = tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=match)
            at_least = tl.cumsum(hist, 0, reverse=True)  # matching keys with this byte >= bin
            best = tl.max(tl.where(at_least >= remaining, (bins << 20) | (at_least - hist), -1), 0)
            remaining -= best & 0xFFFFF
            threshold = threshold | ((best >> 20).to(tl.uint32) << shift)

        # Keep the keys above the threshold and the first `remaining` equal to it, compacted:
        # one scan counts both (above: high word, equal: low word).
        above = present & (key > threshold)
        equal = present & (key == threshold)
        counts = tl.cumsum((above.to(tl.int64) << 32) | equal.to(tl.int64), 0)
        equal_rank = (counts & 0xFFFFFFFF).to(tl.int32)
        take = above | (equal & (equal_rank <= remaining))
        slot = (counts >> 32).to(tl.int32) + tl.minimum(equal_rank, remaining) - 1
        tl.store(keys_ptr + start + slot, unique_key, mask=take)
        tl.debug_barrier()  # the block's stores above are visible to its loads below
        chosen = tl.load(keys_ptr + start + k, mask=k < kept, other=-9223372036854775808)
        chosen = tl.sort(chosen, descending=True)
    page = (WIDTH_POW2 - 1 - (chosen & 0xFFFFFFFF)).to(tl.int32)
    tl.store(pages_ptr + start + k, page, mask=k < kept)
    if PHYSICAL:
        phys = tl.load(kv_indices_ptr + first_page + page, mask=k < kept, other=0)
        tokens = tl.where(page == num_pages - 1, tl.load(kv_last_page_len_ptr + request), page_size)
        tl.store(phys_ptr + start + k, phys, mask=k < kept)
        tl.store(tokens_ptr + start + k, tokens, mask=k < kept)
