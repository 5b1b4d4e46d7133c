"""Triton kernels: per-page mass estimates and bounds, the pre-pass of modes ``mass`` and ``bound``.

Mode ``mass``:

1. ``block_mass_estimate_kernel``: every termination block's estimated log-mass (base 2), from
   its pages' key box centres and half-widths (``art_runtime.termination``, mode ``mass``),
   written at the block's first visit position. One program per (work item, tile of
   blocks); the head dimension is walked in slices as in ``page_scoring`` (the whole box in
   one load measured 15-50% slower there).
2. ``block_suffix_kernel``: one program per work item turns those into suffix sums over the
   work item's blocks, in place: at a block's first position, the estimated mass of that
   block and every later one, which the decode kernel's check reads. It also predicts how
   many blocks the item will read, so that the decode launch can run the longest first.

Mode ``bound``: every work item (a chunk of one (request, KV head)'s visit order) is cut into
segments of ``SEG_PAGES`` positions, one program each (grid ``[W, segments]``), so that a long
visit order is not a serial scan of one program:

1. ``page_mass_estimate_kernel``: backwards in tiles of ``TILE`` pages, each page's estimated
   log-mass (as above), its suffix sums (base 2) within the segment, the suffix max of the
   value norms, and the segment's totals.
2. ``segment_carry_kernel``: adds to every position the totals of the work item's later
   segments, which makes the segment-local suffixes suffixes over the whole work item.
3. ``page_sketch_bound_kernel``: the cut, the first position at which every head's estimated
   unread share is at most ``2^log2_cut_share`` of the work item's estimated mass (positions
   before it get infinite terms: no stop there); from the cut on, every token's logit bounded
   from its 8-bit key sketch (``art_runtime.reference.sketch_page_log2_mass``: one dot of the
   query with the token's codes times the page's power-of-two steps, exact in bf16, plus
   per-page terms and a rounding margin), giving each page's mass upper bound ``W_j`` and
   lower bound, and the page's bound of ``sum_g W_jg Vmax_j`` (``art_runtime.reference.tail_key``):
   the key by which the pages after the cut are visited.
4. ``tail_order_kernel``: one program per work item sorts its tail by that key
   (``art_runtime.reference.tail_visit_order``, the torch oracle) and writes the run's visit
   order: the permutation and the permuted physical pages, token counts and logical pages.
5. ``tail_suffix_kernel``: in that order, from the cut on, the segment-local suffix sums of
   ``W_j``, its lower bound and ``W_j Vmax_j``, the suffix max of ``Vmax_j``, and the segment's
   totals. Then ``segment_carry_kernel`` again, with the ``2^-9`` slack of the scans' fp32
   rounding. Both scan only the group's ``LANES`` (its size rounded up to a power of two), not
   the ``GROUP_PAD`` rows that ``tl.dot`` needs in the kernels before: the decode check reads
   no other (Qwen2.5's 7 heads: 31 -> 18 µs, NOTES v32).

The decode kernel's check is then a few scalar operations per block. Suffix sums use exact
log-sum-exp scans, so no range of logits underflows into a wrong zero.
"""

import triton
import triton.language as tl

from .page_metadata import _power_of_two, sketch_base
from .page_scoring import box_log2_mass
from .page_selection import float_order, unique_order_key

# Relative margin added to every logit bound, covering fp32 rounding of both this dot
# product and the decode kernel's (a D-term sum has relative error below D * 2^-24).
ROUNDING_MARGIN = tl.constexpr(2.0 ** -12)
SKETCH_LEVELS = tl.constexpr(256)


@triton.jit
def _logsumexp2_combine(m1, s1, m2, s2):
    m = tl.maximum(m1, m2)
    s = s1 * tl.where(m1 == m, 1.0, tl.exp2(m1 - m)) + s2 * tl.where(m2 == m, 1.0, tl.exp2(m2 - m))
    return m, s


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _suffix_log2_sum(x, ok, carry_m, carry_s):
    """Reverse scan of one tile: ``log2 sum 2^x`` over each position and the positions after it
    (``x [GROUP_PAD, TILE]``, invalid positions masked by ``ok [TILE]``), plus the carry from
    the tiles after this one; returns ``(suffix, carry_m, carry_s)`` for the next tile."""
    x = tl.where(ok[None, :], x, float("-inf"))
    ones = tl.where(ok[None, :], 1.0, 0.0) + tl.zeros(x.shape, tl.float32)
    suf_m, suf_s = tl.associative_scan((x, ones), 1, _logsumexp2_combine, reverse=True)
    suf_m, suf_s = _logsumexp2_combine(suf_m, suf_s, carry_m[:, None], carry_s[:, None])
    top = tl.max(x, 1)
    carry_m, carry_s = _logsumexp2_combine(carry_m, carry_s, top,
                                           tl.sum(tl.where(ok[None, :], tl.exp2(x - top[:, None]), 0.0), 1))
    return suf_m + tl.log2(suf_s), carry_m, carry_s


@triton.jit
def _segment(work_start_ptr, work_end_ptr, work, segment, SEG_PAGES: tl.constexpr):
    """``(start, end, seg_start, seg_end)`` of a work item and of its segment (empty past the end)."""
    start = tl.load(work_start_ptr + work)
    end = tl.load(work_end_ptr + work)
    seg_start = tl.minimum(start + segment * SEG_PAGES, end)
    seg_end = tl.minimum(seg_start + SEG_PAGES, end)
    return start, end, seg_start, seg_end


@triton.jit
def _load_group_query(q_ptr, work_row_ptr, work, stride_qb, stride_qh,
                      NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
                      HEAD_DIM: tl.constexpr):
    row = tl.load(work_row_ptr + work)
    request = row // NUM_KV_HEADS
    head = row % NUM_KV_HEADS
    g = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    q_group_ptr = q_ptr + request * stride_qb + head * GROUP_SIZE * stride_qh  # the group's first query head
    q = tl.load(q_group_ptr + g[:, None] * stride_qh + dims[None, :], mask=(g < GROUP_SIZE)[:, None], other=0.0)
    return q, q_group_ptr, head


@triton.jit
def block_mass_estimate_kernel(
    q_ptr, key_min_ptr, key_max_ptr, key_scale_ptr,
    visit_phys_ptr, visit_tokens_ptr, work_row_ptr, work_start_ptr, work_end_ptr,
    block_log2w_ptr,                    # out: [nnz, GROUP_PAD] fp32, at each block's first position
    stride_qb, stride_qh, stride_mp, stride_mh, stride_sp, qk_scale, sm_scale,
    NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_PAGES: tl.constexpr, PAGES_POW2: tl.constexpr,
    TILE_BLOCKS: tl.constexpr, TENSOR_CORES: tl.constexpr,
):
    """Base-2 log of each block's estimated softmax mass, per query head of the group.

    Grid ``[W, cdiv(blocks of the longest work item, TILE_BLOCKS)]``; a block is the decode
    kernel's: ``BLOCK_PAGES`` positions from the work item's start, the last one cut at its
    end. Each position of the tile is slot ``t % PAGES_POW2`` of block ``t // PAGES_POW2``.
    """
    work = tl.program_id(0)
    row = tl.load(work_row_ptr + work)
    request = row // NUM_KV_HEADS
    head = row % NUM_KV_HEADS
    start = tl.load(work_start_ptr + work)
    end = tl.load(work_end_ptr + work)
    t = tl.arange(0, TILE_BLOCKS * PAGES_POW2)
    slot = t % PAGES_POW2
    first = start + (tl.program_id(1) * TILE_BLOCKS + tl.arange(0, TILE_BLOCKS)) * BLOCK_PAGES  # [TILE_BLOCKS]
    pos = start + (tl.program_id(1) * TILE_BLOCKS + t // PAGES_POW2) * BLOCK_PAGES + slot
    ok = (slot < BLOCK_PAGES) & (pos < end)
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP_SIZE
    phys = tl.load(visit_phys_ptr + pos, mask=ok, other=0).to(tl.int64)
    tokens = tl.load(visit_tokens_ptr + pos, mask=ok, other=1)
    logit = box_log2_mass(q_ptr, key_min_ptr, key_max_ptr, key_scale_ptr, phys, ok, request, head,
                          stride_qb, stride_qh, stride_mp, stride_mh, stride_sp, qk_scale, sm_scale,
                          GROUP_SIZE, GROUP_PAD, HEAD_DIM, BLOCK_D, TILE_BLOCKS * PAGES_POW2, TENSOR_CORES)
    x = tl.where(ok[None, :], logit + tl.log2(tokens.to(tl.float32))[None, :], float("-inf"))
    x = tl.reshape(x, [GROUP_PAD, TILE_BLOCKS, PAGES_POW2])
    top = tl.max(x, 2)
    safe = tl.where(top == float("-inf"), 0.0, top)
    block = safe + tl.log2(tl.sum(tl.exp2(x - safe[:, :, None]), 2))
    tl.store(block_log2w_ptr + first[None, :] * GROUP_PAD + g[:, None], block,
             mask=(first < end)[None, :] & g_ok[:, None])


@triton.jit
def block_suffix_kernel(
    block_log2w_ptr,                    # in/out: [nnz, GROUP_PAD] fp32 at each block's first position
    work_start_ptr, work_end_ptr,
    predicted_blocks_ptr,               # out: [W] int32, blocks before the estimated share falls to 2^log2_share
    log2_share,
    GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_PAGES: tl.constexpr, TILE_BLOCKS: tl.constexpr,
):
    """Suffix log-sum-exp (base 2) of a work item's block estimates, backwards in tiles; and the
    item's predicted length, its blocks at which some head's estimated unread share of the
    item (the suffix over the total) is still above ``2^log2_share`` (the decode launch runs
    the longest first)."""
    work = tl.program_id(0)
    start = tl.load(work_start_ptr + work)
    blocks = tl.cdiv(tl.load(work_end_ptr + work) - start, BLOCK_PAGES)
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP_SIZE
    b = tl.arange(0, TILE_BLOCKS)
    carry_m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    carry_s = tl.zeros([GROUP_PAD], tl.float32)
    for tile in range(0, tl.cdiv(blocks, TILE_BLOCKS)):
        block = blocks - (tile + 1) * TILE_BLOCKS + b
        ok = block >= 0
        at = (start + block * BLOCK_PAGES)[None, :] * GROUP_PAD + g[:, None]
        lanes = ok[None, :] & g_ok[:, None]
        x = tl.load(block_log2w_ptr + at, mask=lanes, other=float("-inf"))
        suffix, carry_m, carry_s = _suffix_log2_sum(x, ok, carry_m, carry_s)
        tl.store(block_log2w_ptr + at, suffix, mask=lanes)
    tl.debug_barrier()  # the stores above are visible to the loads below
    threshold = carry_m + tl.log2(carry_s) + log2_share
    predicted = blocks * 0
    for tile in range(0, tl.cdiv(blocks, TILE_BLOCKS)):
        block = tile * TILE_BLOCKS + b
        lanes = (block < blocks)[None, :] & g_ok[:, None]
        suffix = tl.load(block_log2w_ptr + (start + block * BLOCK_PAGES)[None, :] * GROUP_PAD + g[:, None],
                         mask=lanes, other=float("-inf"))
        predicted += tl.sum(tl.max((suffix > threshold[:, None]).to(tl.int32), 0), 0)
    tl.store(predicted_blocks_ptr + work, predicted)


@triton.jit
def page_mass_estimate_kernel(
    q_ptr, key_min_ptr, key_max_ptr, key_scale_ptr, value_norm_ptr,
    visit_phys_ptr, visit_tokens_ptr, work_row_ptr, work_start_ptr, work_end_ptr,
    log2w_ptr, vrest_ptr,               # out: [nnz, GROUP_PAD] fp32, [nnz] fp32 (segment-local suffixes)
    seg_log2w_ptr, seg_vmax_ptr,        # out: [W, SEGMENTS, GROUP_PAD], [W, SEGMENTS] segment totals
    stride_qb, stride_qh, stride_mp, stride_mh, stride_np,
    qk_scale, sm_scale, value_norm_scale,
    NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr, SEG_PAGES: tl.constexpr,
    SEGMENTS: tl.constexpr, TENSOR_CORES: tl.constexpr,
):
    work = tl.program_id(0)
    segment = tl.program_id(1)
    start, end, seg_start, seg_end = _segment(work_start_ptr, work_end_ptr, work, segment, SEG_PAGES)
    row = tl.load(work_row_ptr + work)
    request = row // NUM_KV_HEADS
    head = row % NUM_KV_HEADS
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP_SIZE
    t = tl.arange(0, TILE)

    carry_m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    carry_s = tl.zeros([GROUP_PAD], tl.float32)
    carry_v = tl.max(tl.zeros([TILE], tl.float32), 0)
    for tile in range(0, tl.cdiv(seg_end - seg_start, TILE)):
        pos = seg_end - (tile + 1) * TILE + t
        ok = pos >= seg_start
        phys = tl.load(visit_phys_ptr + pos, mask=ok, other=0).to(tl.int64)
        tokens = tl.load(visit_tokens_ptr + pos, mask=ok, other=1)
        logit = box_log2_mass(q_ptr, key_min_ptr, key_max_ptr, key_scale_ptr, phys, ok, request, head,
                              stride_qb, stride_qh, stride_mp, stride_mh, stride_np, qk_scale, sm_scale,
                              GROUP_SIZE, GROUP_PAD, HEAD_DIM, BLOCK_D, TILE, TENSOR_CORES)
        x = logit + tl.log2(tokens.to(tl.float32))[None, :]
        estimate, carry_m, carry_s = _suffix_log2_sum(x, ok, carry_m, carry_s)
        tl.store(log2w_ptr + pos[None, :] * GROUP_PAD + g[:, None], estimate, mask=ok[None, :] & g_ok[:, None])
        vnorm = tl.load(value_norm_ptr + phys * stride_np + head, mask=ok, other=0.0) * value_norm_scale
        vrest = tl.maximum(tl.associative_scan(vnorm, 0, _max_combine, reverse=True), carry_v)
        tl.store(vrest_ptr + pos, vrest, mask=ok)
        carry_v = tl.maximum(carry_v, tl.max(vnorm, 0))
    at = work * SEGMENTS + segment
    tl.store(seg_log2w_ptr + at * GROUP_PAD + g, carry_m + tl.log2(carry_s))
    tl.store(seg_vmax_ptr + at, carry_v)


@triton.jit
def _later_segments_log2_sum(seg_ptr, work, segment, SEGMENTS: tl.constexpr, SEGMENTS_POW2: tl.constexpr,
                             GROUP_PAD: tl.constexpr, LANES: tl.constexpr):
    """``[LANES]`` base-2 log-sum-exp of the totals of the work item's segments after ``segment``
    (the first ``LANES`` of each total's ``GROUP_PAD``)."""
    s = tl.arange(0, SEGMENTS_POW2)
    g = tl.arange(0, LANES)
    later = (s > segment) & (s < SEGMENTS)
    totals = tl.load(seg_ptr + (work * SEGMENTS + s)[:, None] * GROUP_PAD + g[None, :], mask=later[:, None],
                     other=float("-inf"))
    top = tl.max(totals, 0)
    safe = tl.where(top == float("-inf"), 0.0, top)
    return safe + tl.log2(tl.sum(tl.exp2(totals - safe[None, :]), 0))


@triton.jit
def _log2_add(a, b):
    """``log2(2^a + 2^b)``, exact for infinite operands."""
    top = tl.maximum(a, b)
    safe = tl.where((top == float("-inf")) | (top == float("inf")), 0.0, top)
    return tl.where(top == float("inf"), top, safe + tl.log2(tl.exp2(a - safe) + tl.exp2(b - safe)))


@triton.jit
def segment_carry_kernel(
    log2w_ptr, log2w_low_ptr, log2wv_ptr, vrest_ptr,           # in/out: segment-local suffixes
    seg_log2w_ptr, seg_low_ptr, seg_wv_ptr, seg_vmax_ptr,      # in: segment totals
    work_start_ptr, work_end_ptr, log2_slack,
    GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, LANES: tl.constexpr, TILE: tl.constexpr,
    SEG_PAGES: tl.constexpr, SEGMENTS: tl.constexpr, SEGMENTS_POW2: tl.constexpr, CERTIFIED: tl.constexpr,
):
    """Turn segment-local suffix sums into suffix sums over the work item (see the module doc).

    ``CERTIFIED`` (bound): the three sketch suffixes and the value-norm suffix max of the
    positions from the cut on (``tail_suffix_kernel``'s), positions before the cut (``+inf``)
    left as they are, with ``log2_slack`` added to the upper sums and taken from the lower one;
    else the estimate (of the group's heads, the lanes ``page_mass_estimate_kernel`` wrote) and
    the value-norm suffix max.
    """
    work = tl.program_id(0)
    segment = tl.program_id(1)
    start, end, seg_start, seg_end = _segment(work_start_ptr, work_end_ptr, work, segment, SEG_PAGES)
    g = tl.arange(0, LANES)  # the group's query heads, rounded up (the lanes the decode check reads)
    g_ok = g < GROUP_SIZE
    t = tl.arange(0, TILE)
    carry = _later_segments_log2_sum(seg_log2w_ptr, work, segment, SEGMENTS, SEGMENTS_POW2, GROUP_PAD, LANES)
    if CERTIFIED:
        carry_low = _later_segments_log2_sum(seg_low_ptr, work, segment, SEGMENTS, SEGMENTS_POW2, GROUP_PAD, LANES)
        carry_wv = _later_segments_log2_sum(seg_wv_ptr, work, segment, SEGMENTS, SEGMENTS_POW2, GROUP_PAD, LANES)
    s = tl.arange(0, SEGMENTS_POW2)
    carry_v = tl.max(tl.load(seg_vmax_ptr + work * SEGMENTS + s, mask=(s > segment) & (s < SEGMENTS), other=0.0), 0)
    for tile in range(0, tl.cdiv(seg_end - seg_start, TILE)):
        pos = seg_start + tile * TILE + t
        ok = pos < seg_end
        at = pos[None, :] * GROUP_PAD + g[:, None]
        if CERTIFIED:
            local = tl.load(log2w_ptr + at, mask=ok[None, :], other=0.0)
            sketched = ok[None, :] & (local < float("inf"))
            tl.store(log2w_ptr + at, _log2_add(local, carry[:, None]) + log2_slack, mask=sketched)
            low = tl.load(log2w_low_ptr + at, mask=sketched, other=0.0)
            tl.store(log2w_low_ptr + at, _log2_add(low, carry_low[:, None]) - log2_slack, mask=sketched)
            wv = tl.load(log2wv_ptr + at, mask=sketched, other=0.0)
            tl.store(log2wv_ptr + at, _log2_add(wv, carry_wv[:, None]) + log2_slack, mask=sketched)
            # Before the cut the suffix max holds already (the same set of pages follows
            # whatever the tail's order); from it on, tail_suffix_kernel's needs the carry.
            vrest_at = ok & (tl.max(sketched.to(tl.int32), 0) > 0)
        else:
            lanes = ok[None, :] & g_ok[:, None]
            local = tl.load(log2w_ptr + at, mask=lanes, other=0.0)
            tl.store(log2w_ptr + at, _log2_add(local, carry[:, None]), mask=lanes)
            vrest_at = ok
        vrest = tl.load(vrest_ptr + pos, mask=vrest_at, other=0.0)
        tl.store(vrest_ptr + pos, tl.maximum(vrest, carry_v), mask=vrest_at)


@triton.jit
def page_sketch_bound_kernel(
    q_ptr, value_norm_ptr,
    key_min_ptr, key_scale_ptr,         # key box minima [max_pages, H_kv, D] fp8, scales [max_pages, H_kv]
    codes_ptr, exponent_ptr,            # key sketch [max_pages, H_kv, P, D] uint8, grid steps [max_pages, H_kv, D]
    visit_phys_ptr, visit_tokens_ptr, work_row_ptr, work_start_ptr, work_end_ptr,
    seg_est_ptr,                        # in: [W, SEGMENTS, GROUP_PAD] the mass estimate's segment totals
    log2w_ptr,                          # in: the estimate's suffixes; out: +inf before the cut
    log2w_low_ptr, log2wv_ptr,          # out: [nnz, GROUP_PAD] -inf / +inf before the cut
    page_upper_ptr, page_lower_ptr,     # out: [nnz, GROUP_PAD] each page's own mass bounds (from the cut on)
    tail_key_ptr,                       # out: [nnz] reference.tail_key (from the cut on)
    sketch_pages_ptr,                   # out: [W] int32 (zeroed before), pages whose key sketch was read
    stride_qb, stride_qh, stride_np, stride_mp, stride_mh, stride_cp, stride_ch, stride_gp, stride_gh,
    qk_scale, value_norm_scale, log2_cut_share,
    NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, TILE: tl.constexpr, SEG_PAGES: tl.constexpr, SEGMENTS: tl.constexpr,
    SEGMENTS_POW2: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr, PAGE_SIZE_POW2: tl.constexpr,
):
    work = tl.program_id(0)
    segment = tl.program_id(1)
    start, end, seg_start, seg_end = _segment(work_start_ptr, work_end_ptr, work, segment, SEG_PAGES)
    q_input, q_group_ptr, head = _load_group_query(q_ptr, work_row_ptr, work, stride_qb, stride_qh,
                                                   NUM_KV_HEADS, GROUP_SIZE, GROUP_PAD, HEAD_DIM)
    q = q_input.to(tl.float32)
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP_SIZE
    dims = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, TILE)

    # The cut: positions where some head's estimated unread share is above 2^log2_cut_share of
    # the work item's estimated mass cannot stop (a prefix of the work item, so of each
    # segment: suffix sums only shrink); they get infinite terms and no sketch.
    total = _later_segments_log2_sum(seg_est_ptr, work, -1, SEGMENTS, SEGMENTS_POW2, GROUP_PAD, GROUP_PAD)
    threshold = total + log2_cut_share
    early_count = start * 0
    for tile in range(0, tl.cdiv(seg_end - seg_start, TILE)):
        pos = seg_start + tile * TILE + t
        ok = pos < seg_end
        at = pos[None, :] * GROUP_PAD + g[:, None]
        estimate = tl.load(log2w_ptr + at, mask=ok[None, :] & g_ok[:, None], other=float("-inf"))
        early = tl.max((estimate > threshold[:, None]).to(tl.int32), 0)
        early_count += tl.sum(early, 0)
        before_cut = (ok & (early > 0))[None, :]
        tl.store(log2w_ptr + at, float("inf"), mask=before_cut)
        tl.store(log2w_low_ptr + at, float("-inf"), mask=before_cut)
        tl.store(log2wv_ptr + at, float("inf"), mask=before_cut)
    cut = seg_start + early_count
    tl.atomic_add(sketch_pages_ptr + work, seg_end - cut)

    # Certified mass bounds from the key sketch (reference.sketch_page_log2_mass) of the
    # segment's positions from the cut on.
    slots = tl.arange(0, PAGE_SIZE_POW2)
    for tile in range(0, tl.cdiv(seg_end - cut, TILE)):
        pos = cut + tile * TILE + t
        ok = pos < seg_end
        phys = tl.load(visit_phys_ptr + pos, mask=ok, other=0).to(tl.int64)
        tokens = tl.load(visit_tokens_ptr + pos, mask=ok, other=1)
        exponent = tl.load(exponent_ptr + phys[:, None] * stride_gp + head * stride_gh + dims[None, :],
                           mask=ok[:, None], other=0).to(tl.int32)
        step = _power_of_two(exponent)
        box_min = tl.load(key_min_ptr + phys[:, None] * stride_mp + head * stride_mh + dims[None, :],
                          mask=ok[:, None], other=0.0).to(tl.float32)
        scale = tl.load(key_scale_ptr + phys * stride_np + head, mask=ok, other=0.0)
        base = sketch_base(box_min, scale[:, None], exponent)  # [TILE, D], the grid's base is the box's
        reach = tl.maximum(tl.abs(base), tl.abs(base + SKETCH_LEVELS)) * step
        # The per-page sums of each query head (offset + up + margin, offset + down - margin),
        # head by head over [TILE, D]: only the group's heads, and no K-long dot operands in
        # registers (four fp32 dots here spilled and took 1.5x the time, NOTES v35). A head's
        # sums, reduced over D, are a column of [TILE, GROUP_PAD] in the grid's own layout (as
        # rows of [GROUP_PAD, TILE] each head cost two layout conversions, NOTES v36). q_h * base
        # is exact for 16-bit queries (8 x 15 bits; an fp32 query's product rounds once), the
        # rest are products by powers of two, and all rounding stays far inside ROUNDING_MARGIN.
        page_up = tl.zeros([TILE, GROUP_PAD], dtype=tl.float32)
        page_down = tl.zeros([TILE, GROUP_PAD], dtype=tl.float32)
        for h in tl.static_range(GROUP_SIZE):
            q_h = tl.load(q_group_ptr + h * stride_qh + dims).to(tl.float32)
            offset = q_h[None, :] * base
            margin = tl.abs(q_h)[None, :] * reach * ROUNDING_MARGIN
            up_h = tl.sum(step * (offset + tl.maximum(q_h, 0.0)[None, :]) + margin, 1)
            down_h = tl.sum(step * (offset + tl.minimum(q_h, 0.0)[None, :]) - margin, 1)
            page_up = tl.where(g[None, :] == h, up_h[:, None], page_up)
            page_down = tl.where(g[None, :] == h, down_h[:, None], page_down)
        # Every token's y = sum_d q_d s_d c_d: codes times steps are exact in bf16 and fp32.
        token_ok = ok[:, None] & (slots[None, :] < tokens[:, None])  # [TILE, P2]
        code_at = phys[:, None, None] * stride_cp + head * stride_ch + slots[None, :, None] * HEAD_DIM + \
            dims[None, None, :]
        codes = tl.load(codes_ptr + code_at, mask=token_ok[:, :, None], other=0).to(tl.float32)
        scaled = tl.reshape(codes * step[:, None, :], [TILE * PAGE_SIZE_POW2, HEAD_DIM])
        if DOT_IN_INPUT_DTYPE:
            scaled = scaled.to(tl.bfloat16)
            q_high = q_input.to(tl.bfloat16)
            y = tl.dot(q_high, tl.trans(scaled))
            if q_ptr.dtype.element_ty == tl.float16:  # fp16 q: its last 3 bits in a second bf16 dot
                y += tl.dot((q - q_high.to(tl.float32)).to(tl.bfloat16), tl.trans(scaled))
        else:
            y = tl.dot(q, tl.trans(scaled), input_precision="ieee")
        y = tl.reshape(y * qk_scale, [GROUP_PAD, TILE, PAGE_SIZE_POW2])
        y = tl.where(token_ok[None, :, :], y, float("-inf"))
        y_max = tl.max(y, 2)
        y_safe = tl.where(ok[None, :], y_max, 0.0)
        lse = y_safe + tl.log2(tl.sum(tl.exp2(y - y_safe[:, :, None]), 2))
        upper = tl.trans(page_up) * qk_scale + lse
        lower = tl.trans(page_down) * qk_scale + lse
        out = pos[None, :] * GROUP_PAD + g[:, None]
        tl.store(page_upper_ptr + out, upper, mask=ok[None, :])
        tl.store(page_lower_ptr + out, lower, mask=ok[None, :])
        group_upper = tl.where(g_ok[:, None], upper, float("-inf"))
        top = tl.max(group_upper, 0)
        vnorm = tl.load(value_norm_ptr + phys * stride_np + head, mask=ok, other=0.0) * value_norm_scale
        key = top + tl.log2(tl.sum(tl.exp2(group_upper - top[None, :]), 0)) + tl.log2(vnorm)
        tl.store(tail_key_ptr + pos, key, mask=ok)


@triton.jit
def tail_order_kernel(
    tail_key_ptr, sketch_pages_ptr,     # in: [nnz] page_sketch_bound_kernel's keys, [W] its sketched pages
    work_row_ptr, work_start_ptr, work_end_ptr, row_start_ptr,
    visit_phys_ptr, visit_tokens_ptr, pages_ptr,  # in: [nnz] int32 the plan's visit order
    visit_perm_ptr,                     # out: [nnz] int64, position p visits plan position visit_perm[p]
    run_phys_ptr, run_tokens_ptr, run_pages_ptr,  # out: [nnz] int32 the inputs in the run's order
    min_pages,
    WIDTH_POW2: tl.constexpr,
):
    """``art_runtime.reference.tail_visit_order`` for one work item (program): its positions from
    the cut on (never inside the row's first ``min_pages``) by their key, largest first, ties
    (and NaN, as +inf) by position; the others in place. One bitonic sort of unique 64-bit
    keys (``page_selection.unique_order_key``): the key's float order above, the position below."""
    work = tl.program_id(0)
    start = tl.load(work_start_ptr + work)
    end = tl.load(work_end_ptr + work)
    row_start = tl.load(row_start_ptr + tl.load(work_row_ptr + work))
    first = tl.minimum(tl.maximum(end - tl.load(sketch_pages_ptr + work), row_start + min_pages), end)
    offset = tl.arange(0, WIDTH_POW2)
    pos = start + offset
    valid = pos < end
    tail = valid & (pos >= first)
    key = tl.load(tail_key_ptr + pos, mask=tail, other=0.0)
    ordered = float_order(tl.where(key != key, float("inf"), key))
    # Before the tail: above every key (+inf's order key is below 2^31 - 1), in place; past the
    # end: below every key (-inf's is above -2^31).
    ordered = tl.where(tail, ordered, tl.where(valid, 2147483647, -2147483648))
    ranked = tl.sort(unique_order_key(ordered, offset, WIDTH_POW2), descending=True)
    source = start + (WIDTH_POW2 - 1 - (ranked & 0xFFFFFFFF)).to(tl.int32)
    tl.store(visit_perm_ptr + pos, source, mask=valid)
    tl.store(run_phys_ptr + pos, tl.load(visit_phys_ptr + source, mask=valid, other=0), mask=valid)
    tl.store(run_tokens_ptr + pos, tl.load(visit_tokens_ptr + source, mask=valid, other=0), mask=valid)
    tl.store(run_pages_ptr + pos, tl.load(pages_ptr + source, mask=valid, other=0), mask=valid)


@triton.jit
def tail_suffix_kernel(
    value_norm_ptr, visit_perm_ptr,
    visit_phys_ptr, work_row_ptr, work_start_ptr, work_end_ptr, sketch_pages_ptr,
    page_upper_ptr, page_lower_ptr,     # in: [nnz, GROUP_PAD] page_sketch_bound_kernel's, at plan positions
    log2w_ptr, log2w_low_ptr, log2wv_ptr, vrest_ptr,  # out: segment-local suffixes from the cut on
    seg_log2w_ptr, seg_low_ptr, seg_wv_ptr, seg_vmax_ptr,  # out: [W, SEGMENTS(, GROUP_PAD)] segment totals
    stride_np, value_norm_scale,
    NUM_KV_HEADS: tl.constexpr, GROUP_PAD: tl.constexpr, LANES: tl.constexpr, TILE: tl.constexpr,
    SEG_PAGES: tl.constexpr, SEGMENTS: tl.constexpr,
):
    """The bound's suffix terms in the run's visit order (``visit_phys`` already permuted;
    position ``p`` holds the page of plan position ``visit_perm[p]``), from the cut on."""
    work = tl.program_id(0)
    segment = tl.program_id(1)
    start, end, seg_start, seg_end = _segment(work_start_ptr, work_end_ptr, work, segment, SEG_PAGES)
    head = tl.load(work_row_ptr + work) % NUM_KV_HEADS
    first = tl.maximum(seg_start, end - tl.load(sketch_pages_ptr + work))
    g = tl.arange(0, LANES)  # the group's query heads, rounded up (the lanes the decode check reads)
    t = tl.arange(0, TILE)
    carry_m = tl.full([LANES], float("-inf"), tl.float32)
    carry_s = tl.zeros([LANES], tl.float32)
    low_m = tl.full([LANES], float("-inf"), tl.float32)
    low_s = tl.zeros([LANES], tl.float32)
    wv_m = tl.full([LANES], float("-inf"), tl.float32)
    wv_s = tl.zeros([LANES], tl.float32)
    carry_v = tl.max(tl.zeros([TILE], tl.float32), 0)
    for tile in range(0, tl.cdiv(seg_end - first, TILE)):
        pos = seg_end - (tile + 1) * TILE + t
        ok = pos >= first
        source = tl.load(visit_perm_ptr + pos, mask=ok, other=0)
        phys = tl.load(visit_phys_ptr + pos, mask=ok, other=0).to(tl.int64)
        vnorm = tl.load(value_norm_ptr + phys * stride_np + head, mask=ok, other=0.0) * value_norm_scale
        at = source[None, :] * GROUP_PAD + g[:, None]
        upper = tl.load(page_upper_ptr + at, mask=ok[None, :], other=float("-inf"))
        lower = tl.load(page_lower_ptr + at, mask=ok[None, :], other=float("-inf"))
        log2w, carry_m, carry_s = _suffix_log2_sum(upper, ok, carry_m, carry_s)
        log2w_low, low_m, low_s = _suffix_log2_sum(lower, ok, low_m, low_s)
        log2wv, wv_m, wv_s = _suffix_log2_sum(upper + tl.log2(vnorm)[None, :], ok, wv_m, wv_s)
        out = pos[None, :] * GROUP_PAD + g[:, None]
        tl.store(log2w_ptr + out, log2w, mask=ok[None, :])
        tl.store(log2w_low_ptr + out, log2w_low, mask=ok[None, :])
        tl.store(log2wv_ptr + out, log2wv, mask=ok[None, :])
        vrest = tl.maximum(tl.associative_scan(vnorm, 0, _max_combine, reverse=True), carry_v)
        tl.store(vrest_ptr + pos, vrest, mask=ok)
        carry_v = tl.maximum(carry_v, tl.max(vnorm, 0))
    at = (work * SEGMENTS + segment) * GROUP_PAD + g
    tl.store(seg_log2w_ptr + at, carry_m + tl.log2(carry_s))
    tl.store(seg_low_ptr + at, low_m + tl.log2(low_s))
    tl.store(seg_wv_ptr + at, wv_m + tl.log2(wv_s))
    tl.store(seg_vmax_ptr + work * SEGMENTS + segment, carry_v)
