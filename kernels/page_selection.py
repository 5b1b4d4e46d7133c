"""Triton kernel: a policy's scores to its ordered page selection, one program per row.

One program per (request, KV head) row. It loads the row's page scores and forces the sink
page (0) first and the current page (the request's last) second. The other pages are
narrowed down to the edge, the pages that hold the kept-th highest: a first round of a
256-bin histogram between the row's lowest and highest score (scores are dense in value, so
the edge is a handful of pages: every page in a higher bin is kept), then, while the edge is
crowded (more than ``EDGE`` pages: ties, or one far outlier that stretched the bins), rounds
over the scores' 32-bit order keys, each cutting the edge's key span by 2^7 at least. The
edge is ranked among itself by pairwise comparison (or, when all its keys are equal, in
position order), the kept pages are compacted through a scratch row, and only those are
sorted (score order, ties to the lower position). This replaced an exact radix select of
four fixed rounds: each round is a chain of block-wide reductions (~1.5 µs of latency a row
on an H100), and one round usually suffices (benchmarks/NOTES.md p12). When every row keeps
all its pages (``KEEP_ALL``, a dense order) the row is sorted as it is, with ``KEY32`` on
32-bit keys (``dense_order_key``: half the data of the 64-bit keys through the sort's
stages). With ``PHYSICAL`` it also writes each entry's physical page id and token count, so
that a per-layer selection
fills the decode plan's visit arrays in this one launch (the dozen gathers that did it in
torch cost about as much as the selection itself); with ``SLOTS`` each entry lands where the
plan's slot map puts it (mode ``mass`` deals a split row's blocks to its chunks in turn).
Sorting the kept pages instead of the whole row is what makes this cheap next to the scoring
pass that reads every page's key box: a top-k over the row costs as much as that pass. (Selecting in the scoring kernel's last
program of each row instead, to save the launch, measured slower: the selection's registers
cost the scoring its occupancy; benchmarks/NOTES.md p5.) Registers matter here too: the
64-bit keys are built only where they are stored, which keeps the kernel at 126 registers,
two programs an SM at 8 warps (built before the narrowing, 150-171).
"""

import triton
import triton.language as tl


@triton.jit
def float_order(x):
    """int32 keys in the order of float32 ``x`` (two's-complement order = float order)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def unique_order_key(ordered, pos, WIDTH_POW2: tl.constexpr):
    """64-bit keys in the order of the 32-bit order keys, ties to the lower position first
    (``pos`` in ``[0, WIDTH_POW2)``: the low half is ``WIDTH_POW2 - 1 - pos``)."""
    return (ordered.to(tl.int64) << 32) | (WIDTH_POW2 - 1 - pos).to(tl.int64)


@triton.jit
def dense_order_key(ordered, pos, num_pages, WIDTH_POW2: tl.constexpr, POS_BITS: tl.constexpr):
    """int32 sort keys of a row that keeps every page: the score's order key without its lowest
    ``POS_BITS`` bits (``WIDTH_POW2 = 2^POS_BITS``), then the position (ties to the lower one);
    the sink page highest and the current page next. Half the width of ``unique_order_key``'s,
    so the row's sort moves half the data (``art_runtime.selection.dense_order_keys``, the torch
    oracle)."""
    top = (1 << (31 - POS_BITS)) - 1
    coarse = tl.minimum(ordered >> POS_BITS, top - 2)
    coarse = tl.where(pos == 0, top, tl.where(pos == num_pages - 1, top - 1, coarse))
    return (coarse << POS_BITS) | (WIDTH_POW2 - 1 - pos)


@triton.jit
def _min_max(low_a, high_a, low_b, high_b):
    return tl.minimum(low_a, low_b), tl.maximum(high_a, high_b)


@triton.jit
def _narrow(bin, sure, edge, need):
    """One round: of the ``edge`` pages (``bin`` in 0..255, monotone in their order), find the
    bin of the ``need``-th highest; the pages above it become ``sure``, those in it the new edge.
    Returns ``(sure, edge, need, edge count)``."""
    hist = tl.histogram(tl.where(edge, bin, 0), 256, mask=edge)
    at_least = tl.cumsum(hist, 0, reverse=True)  # edge pages in this bin or above
    bins = tl.arange(0, 256).to(tl.int64)
    # The bin, the pages above it and in it, packed so that one max finds all three.
    best = tl.max(tl.where(at_least >= need, (bins << 40) | ((at_least - hist).to(tl.int64) << 20) | hist, -1), 0)
    edge_bin = (best >> 40).to(tl.int32)
    return (sure | (edge & (bin > edge_bin)), edge & (bin == edge_bin), need - ((best >> 20) & 0xFFFFF).to(tl.int32),
            (best & 0xFFFFF).to(tl.int32))


@triton.jit
def select_top_pages_kernel(
    scores_ptr,        # [R, width] fp32, higher is kept and visited first
    kv_indptr_ptr,     # [B + 1] int32 page-table row pointers
    sel_indptr_ptr,    # [R + 1] int32 selection row pointers (kept pages per row)
    keys_ptr,          # scratch: [R, KEPT_POW2 + EDGE] int64
    pages_ptr,         # out: [nnz] int32 logical pages in visit order
    kv_indices_ptr,    # [pages in table] int32 physical page ids (read with PHYSICAL)
    kv_last_page_len_ptr,  # [B] int32 tokens in each request's last page (read with PHYSICAL)
    phys_ptr,          # out (PHYSICAL): [nnz] int32 physical page of each entry
    tokens_ptr,        # out (PHYSICAL): [nnz] int32 tokens of each entry's page
    slot_ptr,          # (SLOTS) [nnz] int32 where each row's k-th entry goes; else entry k of the row
    stride_sr, page_size,
    NUM_KV_HEADS: tl.constexpr, WIDTH_POW2: tl.constexpr, KEPT_POW2: tl.constexpr, EDGE: tl.constexpr,
    KEEP_ALL: tl.constexpr, PHYSICAL: tl.constexpr, SLOTS: tl.constexpr, KEY32: tl.constexpr,
    POS_BITS: tl.constexpr,
):
    row = tl.program_id(0)
    request = row // NUM_KV_HEADS
    first_page = tl.load(kv_indptr_ptr + request)
    num_pages = tl.load(kv_indptr_ptr + request + 1) - first_page
    start = tl.load(sel_indptr_ptr + row)
    kept = tl.load(sel_indptr_ptr + row + 1) - start
    pos = tl.arange(0, WIDTH_POW2)
    present = pos < num_pages
    forced = present & ((pos == 0) | (pos == num_pages - 1))
    score = tl.load(scores_ptr + row * stride_sr + pos, mask=present, other=float("-inf"))
    score = tl.minimum(score, 3.4028232635611926e38)  # below the forced pages' scores, even +inf
    score = tl.where(pos == num_pages - 1, 3.4028234663852886e38, score)  # the current page: second
    ordered = float_order(tl.where(pos == 0, float("inf"), score))  # the sink: first
    k = tl.arange(0, KEPT_POW2)
    if KEEP_ALL and KEY32:  # the whole row, in registers, on 32-bit keys
        key = tl.where(present, dense_order_key(ordered, pos, num_pages, WIDTH_POW2, POS_BITS), -2147483648)
        page = (WIDTH_POW2 - 1 - (tl.sort(key, descending=True) & (WIDTH_POW2 - 1))).to(tl.int32)
    elif KEEP_ALL:  # KEPT_POW2 == WIDTH_POW2: the whole row, in registers
        chosen = tl.sort(tl.where(present, unique_order_key(ordered, pos, WIDTH_POW2), -9223372036854775808),
                         descending=True)
        page = (WIDTH_POW2 - 1 - (chosen & 0xFFFFFFFF)).to(tl.int32)
    else:
        # Narrow the pages that are not forced down to an edge of at most EDGE pages that holds
        # the kept-th: a first round of 256 equal bins between the lowest and the highest score
        # (scores are dense in value, so the edge is small), then rounds over the order keys
        # while it is crowded (ties, or one far outlier that stretched the bins).
        candidate = present & ~forced
        wanted = kept - tl.sum(forced.to(tl.int32), 0)  # pages to choose besides the forced ones
        low, high = tl.reduce((tl.where(candidate, score, float("inf")), tl.where(candidate, score, float("-inf"))),
                              0, _min_max)
        span = high - low
        spread = (span > 0) & (span < float("inf"))  # else (one value, or infinite scores) every page in bin 0
        offset = tl.where(spread, tl.where(candidate, score - low, 0.0), 0.0)
        bin = tl.minimum((offset * (256.0 / tl.where(spread, span, 1.0))).to(tl.int32), 255)
        sure, edge, need, num_edge = _narrow(bin, forced, candidate & (wanted > 0), wanted)
        key = (ordered ^ -2147483648).to(tl.uint32, bitcast=True)  # the same order, unsigned
        low_key, high_key = tl.reduce((tl.where(edge, key, 0xFFFFFFFF), tl.where(edge, key, 0)), 0, _min_max)
        while (num_edge > EDGE) & (low_key < high_key):  # each round cuts the key span by 2^7 at least
            span_bits = ((high_key - low_key).to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 126  # >= its bit length
            bin = tl.minimum(((key - low_key) >> tl.maximum(span_bits - 8, 0)).to(tl.int32), 255)
            sure, edge, need, num_edge = _narrow(bin, sure, edge, need)
            low_key, high_key = tl.reduce((tl.where(edge, key, 0xFFFFFFFF), tl.where(edge, key, 0)), 0, _min_max)
        # Compact: the sure pages into the row's first slots, and of the edge the `need` highest:
        # ranked among themselves by pairwise comparison, or, when all its keys are equal, in
        # position order (one scan counts both sets: sure in the high word, edge in the low).
        unique_key = unique_order_key(ordered, pos, WIDTH_POW2)
        counts = tl.cumsum((sure.to(tl.int64) << 32) | edge.to(tl.int64), 0)
        edge_rank = (counts & 0xFFFFFFFF).to(tl.int32)  # 1-based, in position order
        row_keys = keys_ptr + row * (KEPT_POW2 + EDGE)
        tl.store(row_keys + (counts >> 32) - 1, unique_key, mask=sure)
        if num_edge <= EDGE:
            tl.store(row_keys + KEPT_POW2 + edge_rank - 1, unique_key, mask=edge)
            tl.debug_barrier()  # the block's stores above are visible to its loads below
            e = tl.arange(0, EDGE)
            edge_key = tl.load(row_keys + KEPT_POW2 + e, mask=e < num_edge, other=-9223372036854775808)
            rank = tl.sum((edge_key[None, :] > edge_key[:, None]).to(tl.int32), 1)  # edge keys above it
            tl.store(row_keys + kept - need + rank, edge_key, mask=(e < num_edge) & (rank < need))
        else:
            tl.store(row_keys + kept - need + edge_rank - 1, unique_key, mask=edge & (edge_rank <= need))
        tl.debug_barrier()
        chosen = tl.sort(tl.load(row_keys + k, mask=k < kept, other=-9223372036854775808), descending=True)
        page = (WIDTH_POW2 - 1 - (chosen & 0xFFFFFFFF)).to(tl.int32)
    dest = start + k
    if SLOTS:
        dest = tl.load(slot_ptr + start + k, mask=k < kept, other=0)
    tl.store(pages_ptr + dest, page, mask=k < kept)
    if PHYSICAL:
        phys = tl.load(kv_indices_ptr + first_page + page, mask=k < kept, other=0)
        tokens = tl.where(page == num_pages - 1, tl.load(kv_last_page_len_ptr + request), page_size)
        tl.store(phys_ptr + dest, phys, mask=k < kept)
        tl.store(tokens_ptr + dest, tokens, mask=k < kept)
