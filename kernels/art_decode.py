"""Triton kernels: paged decode attention with run-time termination (ART), and the split merge.

``art_decode_kernel`` runs one *work item* per program: a contiguous chunk of one
(request, KV head)'s visit order. It carries the whole GQA group (``GROUP_PAD`` query rows,
so that ``tl.dot`` runs on tensor cores), reads ``BLOCK_PAGES`` pages per step through the
page table, keeps the online softmax in base 2, and after every block decides whether the
group may stop (modes: 0 off, 1 stability, 2 bound, 3 mass; see ``art_runtime.termination``).
Work items that cover a whole visit order write the final output; split rows write partial
outputs and LSEs that ``art_merge_kernel`` combines. In mode off on a visit order that every KV
head shares, one program reads ``HEADS`` adjacent KV heads' work items together: whole token rows
of ``HEADS * HEAD_DIM`` elements, each query row dotted with its own head's columns only (q is
loaded block-diagonally), each work item's output written as its own.
"""

import triton
import triton.language as tl


@triton.jit
def _block_pages(visit_phys_ptr, visit_tokens_ptr, pos, end,
                 PAGE_SIZE: tl.constexpr, BLOCK_PAGES: tl.constexpr, BLOCK_N: tl.constexpr):
    """Physical page and token count behind each of the block's ``BLOCK_N`` token slots."""
    n = tl.arange(0, BLOCK_N)
    page_in_block = n // PAGE_SIZE
    page_pos = pos + page_in_block
    page_ok = (page_in_block < BLOCK_PAGES) & (page_pos < end)
    phys = tl.load(visit_phys_ptr + page_pos, mask=page_ok, other=0).to(tl.int64)
    tokens = tl.load(visit_tokens_ptr + page_pos, mask=page_ok, other=0)
    return phys, tokens


@triton.jit
def _attend_block(
    q, m_i, l_i, acc, k_ptr, v_ptr, phys, tokens, head,
    stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, qk_scale,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr,
    HEADS: tl.constexpr = 1,
):
    """Fold one block (its pages' ``phys`` ids and ``tokens`` counts per slot) into the state:
    heads ``head .. head + HEADS - 1``, side by side in the K/V tile's columns.

    Returns the new ``m, l, acc``, the block's token count, its scaled logits and its ``P.V``.
    """
    slot = tl.arange(0, BLOCK_N) % PAGE_SIZE
    token_ok = slot < tokens
    # One head keeps its own address form: the general one divides the columns by HEAD_DIM, and
    # every termination mode's loop, as measured, runs this branch.
    if HEADS == 1:
        dims = tl.arange(0, HEAD_DIM)
        k = tl.load(k_ptr + phys[:, None] * stride_kp + slot[:, None] * stride_kt + head * stride_kh + dims[None, :],
                    mask=token_ok[:, None], other=0.0)
        v = tl.load(v_ptr + phys[:, None] * stride_vp + slot[:, None] * stride_vt + head * stride_vh + dims[None, :],
                    mask=token_ok[:, None], other=0.0)
    else:
        cols = tl.arange(0, HEADS * HEAD_DIM)
        col_head, dims = head + cols // HEAD_DIM, cols % HEAD_DIM
        k = tl.load(k_ptr + phys[:, None] * stride_kp + slot[:, None] * stride_kt
                    + (col_head * stride_kh + dims)[None, :], mask=token_ok[:, None], other=0.0)
        v = tl.load(v_ptr + phys[:, None] * stride_vp + slot[:, None] * stride_vt
                    + (col_head * stride_vh + dims)[None, :], mask=token_ok[:, None], other=0.0)
    if DOT_IN_INPUT_DTYPE:
        s = tl.dot(q, tl.trans(k))
    else:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    s = tl.where(token_ok[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_IN_INPUT_DTYPE:
        # p in tf32 (10-bit mantissa), not bf16 (7-bit): 4x less rounding for a memory-bound loop.
        pv = tl.dot(p, v.to(tl.float32), input_precision="tf32")
    else:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc, tl.sum(token_ok.to(tl.int32), 0), s, pv


@triton.jit
def _add_pair(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _store_page_lse(page_lse_ptr, s, pos, end, GROUP_PAD: tl.constexpr, BLOCK_PAGES: tl.constexpr,
                    PAGE_SIZE: tl.constexpr):
    """Write log2 sum_tokens 2^s of each page of the block (the page's share of the softmax)."""
    per_page = tl.reshape(s, [GROUP_PAD, BLOCK_PAGES, PAGE_SIZE])
    page_max = tl.max(per_page, 2)
    page_lse = page_max + tl.log2(tl.sum(tl.exp2(per_page - page_max[:, :, None]), 2))
    pages = pos + tl.arange(0, BLOCK_PAGES)
    g = tl.arange(0, GROUP_PAD)
    tl.store(page_lse_ptr + pages[None, :] * GROUP_PAD + g[:, None], page_lse, mask=(pages < end)[None, :])


@triton.jit
def _rest_terms(bound_log2w_ptr, bound_vrest_ptr, bound_log2w_low_ptr, bound_log2wv_ptr, next_pos, end, g, g_ok,
                GROUP_PAD: tl.constexpr, MODE: tl.constexpr):
    """The pre-pass's terms for the unread rest from visit position ``next_pos`` on (none past
    ``end``): base-2 logs of the rest's mass (bound: upper), and for bound its lower mass, its
    value-weighted mass and its largest value norm."""
    rest = next_pos < end
    at = next_pos * GROUP_PAD + g
    log2w = tl.load(bound_log2w_ptr + at, mask=rest & g_ok, other=float("-inf"))
    if MODE == 2:
        log2w_low = tl.load(bound_log2w_low_ptr + at, mask=rest, other=float("-inf"))
        log2wv = tl.load(bound_log2wv_ptr + at, mask=rest, other=float("-inf"))
        vrest = tl.load(bound_vrest_ptr + next_pos, mask=rest, other=0.0)
    else:
        log2w_low = log2w
        log2wv = log2w
        vrest = tl.zeros([], tl.float32)
    return log2w, log2w_low, log2wv, vrest


@triton.jit
def art_decode_kernel(
    q_ptr, k_ptr, v_ptr,
    out_ptr, lse_ptr,                   # final [B, H_qo, D] / [B, H_qo] (unsplit plans)
    part_out_ptr, part_lse_ptr,         # [W, GROUP_PAD, D] fp32 / [W, GROUP_PAD] (split plans)
    visit_phys_ptr, visit_tokens_ptr,   # [nnz] int32: physical page and its token count, visit order
    work_order_ptr,                     # [programs] int64: each program's work item (HEADS > 1: its first head's)
    work_row_ptr, work_start_ptr, work_end_ptr, row_start_ptr,
    row_work_indptr_ptr,                # [R + 1] int32 work items of each row (read with HEADS > 1)
    bound_log2w_ptr, bound_vrest_ptr, row_vscale_ptr,  # bound / mass modes: [nnz, GROUP_PAD], [nnz], [R]
    bound_log2w_low_ptr, bound_log2wv_ptr,  # bound: [nnz, GROUP_PAD] each (page_bounds)
    visited_pages_ptr, visited_tokens_ptr, loaded_tokens_ptr, stable_at_ptr,  # stats: [W] x3, [W, GROUP_PAD]
    page_lse_ptr,                       # PAGE_MASS: [nnz, GROUP_PAD] log2 softmax mass of each page read
    stride_qb, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
    stride_ob, stride_oh,
    qk_scale, tau_mag, tau_dir, eps, patience, min_pages, overflow_log2, mass_max_share, mass_pull_checks,
    NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_PAGES: tl.constexpr, BLOCK_N: tl.constexpr,
    MODE: tl.constexpr, VALUES_RELATIVE: tl.constexpr, SPLIT: tl.constexpr,
    DOT_IN_INPUT_DTYPE: tl.constexpr, PAGE_MASS: tl.constexpr, PASS_BLOCKS: tl.constexpr,
    SPECULATE: tl.constexpr, HEADS: tl.constexpr,
):
    tl.static_assert(HEADS == 1 or (MODE == 0 and not PAGE_MASS), "heads read together only in mode off")
    work = tl.load(work_order_ptr + tl.program_id(0))
    row = tl.load(work_row_ptr + work)
    request = row // NUM_KV_HEADS
    head = row % NUM_KV_HEADS
    start = tl.load(work_start_ptr + work)
    end = tl.load(work_end_ptr + work)
    row_start = tl.load(row_start_ptr + row)

    g = tl.arange(0, GROUP_PAD)
    g_ok = g < HEADS * GROUP_SIZE  # the query heads of KV heads head .. head + HEADS - 1 are adjacent
    dims = tl.arange(0, HEAD_DIM)
    if HEADS == 1:
        q = tl.load(q_ptr + request * stride_qb + (head * GROUP_SIZE + g)[:, None] * stride_qh + dims[None, :],
                    mask=g_ok[:, None], other=0.0)
    else:  # block-diagonal: a query row holds its head's columns, zeros in the other heads'
        cols = tl.arange(0, HEADS * HEAD_DIM)
        own_cols = (cols // HEAD_DIM)[None, :] == (g // GROUP_SIZE)[:, None]
        q = tl.load(q_ptr + request * stride_qb + (head * GROUP_SIZE + g)[:, None] * stride_qh
                    + (cols % HEAD_DIM)[None, :], mask=g_ok[:, None] & own_cols, other=0.0)
    if not DOT_IN_INPUT_DTYPE:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEADS * HEAD_DIM], tl.float32)
    tokens_read = start * 0  # tokens folded into the output
    loaded_tokens = start * 0  # tokens read from memory (termination modes: past the stop too)
    stable_at = tl.full([GROUP_PAD], -1, tl.int32)

    if MODE == 0:
        # The page ids of block t+1 are loaded during block t, so that the K/V loads of a block
        # never wait on the page-table load in front of them.
        phys, tokens = _block_pages(visit_phys_ptr, visit_tokens_ptr, start, end, PAGE_SIZE, BLOCK_PAGES, BLOCK_N)
        for pos in range(start, end, BLOCK_PAGES):
            next_phys, next_tokens = _block_pages(visit_phys_ptr, visit_tokens_ptr, pos + BLOCK_PAGES, end,
                                                  PAGE_SIZE, BLOCK_PAGES, BLOCK_N)
            m_i, l_i, acc, block_tokens, s, _ = _attend_block(
                q, m_i, l_i, acc, k_ptr, v_ptr, phys, tokens, head,
                stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, qk_scale,
                PAGE_SIZE, BLOCK_N, HEAD_DIM, DOT_IN_INPUT_DTYPE, HEADS)
            if PAGE_MASS:
                _store_page_lse(page_lse_ptr, s, pos, end, GROUP_PAD, BLOCK_PAGES, PAGE_SIZE)
            phys, tokens = next_phys, next_tokens
            tokens_read += block_tokens
        loaded_tokens = tokens_read
        pos = end
    else:
        first_block = (start - row_start) // BLOCK_PAGES  # global index of this chunk's first block
        block = first_block
        pos = start
        prev_acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        prev_acc_norm = tl.zeros([GROUP_PAD], tl.float32)
        prev_norm = tl.zeros([GROUP_PAD], tl.float32)
        streak = tl.zeros([GROUP_PAD], tl.int32)
        if MODE == 2:
            vscale = tl.load(row_vscale_ptr + row)
        pull_sq = tl.full([GROUP_PAD], float("inf"), tl.float32)  # mode mass: the last measured
        o_sq = tl.zeros([GROUP_PAD], tl.float32)  # |o_t - mean|^2 and |o_t|^2 (none yet: no stop)
        if MODE >= 2:
            # Each check's terms are loaded one block ahead, while the block before the check is
            # read: loaded where they were used, every check waited on a global round trip (mode
            # mass at 14/2/64 took 1.57x the time of `off` on an H200, NOTES v28).
            next_log2w, next_log2w_low, next_log2wv, next_vrest = _rest_terms(
                bound_log2w_ptr, bound_vrest_ptr, bound_log2w_low_ptr, bound_log2wv_ptr, pos + BLOCK_PAGES, end,
                g, g_ok, GROUP_PAD, MODE)
        live = pos < end
        go = live
        while go:
            # PASS_BLOCKS blocks per pass through a `for` loop, which the compiler software-
            # pipelines (a `while` loop it does not) if its loads do not depend on `live`
            # (SPECULATE): block t+1's K/V are then in flight while block t is checked, and
            # once the group stops the rest of the pass is still read (loaded_tokens) but
            # changes nothing. Without SPECULATE the rest of the pass is masked off (no
            # memory read) and each block's loads wait for the previous block's check.
            pass_end = tl.minimum(pos + PASS_BLOCKS * BLOCK_PAGES, end)
            if SPECULATE:
                phys, tokens = _block_pages(visit_phys_ptr, visit_tokens_ptr, pos, end, PAGE_SIZE, BLOCK_PAGES,
                                            BLOCK_N)
            for block_pos in range(pos, pass_end, BLOCK_PAGES):
                live_end = tl.where(live, end, block_pos)
                if SPECULATE:
                    # As in mode off, the next block's page ids are loaded during this block:
                    # loaded in front of their own block's K/V they took a stage of the
                    # compiler's pipeline, which left K and V one buffer each (NOTES v39).
                    next_phys, next_tokens = _block_pages(visit_phys_ptr, visit_tokens_ptr, block_pos + BLOCK_PAGES,
                                                          end, PAGE_SIZE, BLOCK_PAGES, BLOCK_N)
                else:
                    phys, tokens = _block_pages(visit_phys_ptr, visit_tokens_ptr, block_pos, live_end, PAGE_SIZE,
                                                BLOCK_PAGES, BLOCK_N)
                m_new, l_new, acc_new, block_tokens, s, pv = _attend_block(
                    q, m_i, l_i, acc, k_ptr, v_ptr, phys, tokens, head,
                    stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, qk_scale,
                    PAGE_SIZE, BLOCK_N, HEAD_DIM, DOT_IN_INPUT_DTYPE)
                loaded_tokens += block_tokens
                if SPECULATE:
                    m_i = tl.where(live, m_new, m_i)
                    l_i = tl.where(live, l_new, l_i)
                    acc = tl.where(live, acc_new, acc)
                    block_tokens = tl.where(live, block_tokens, 0)
                else:  # a masked block changes nothing
                    m_i, l_i, acc = m_new, l_new, acc_new
                if PAGE_MASS:
                    _store_page_lse(page_lse_ptr, s, block_pos, live_end, GROUP_PAD, BLOCK_PAGES, PAGE_SIZE)
                if SPECULATE:
                    phys, tokens = next_phys, next_tokens
                tokens_read += block_tokens
                next_pos = block_pos + BLOCK_PAGES
                rest = next_pos < end  # the criterion only means something while pages remain
                # o_t = acc / l is never divided out: |o_t| = |acc| / l, and o_t points where acc
                # does (the cosine is scale-free), so each check costs two row reductions, done
                # as one (one exchange across the warps instead of two).
                if MODE == 1:
                    acc_sq, acc_dot = tl.reduce((acc * acc, acc * prev_acc), 1, _add_pair)
                    acc_norm = tl.sqrt(acc_sq)
                else:
                    acc_norm = tl.sqrt(tl.sum(acc * acc, 1))
                o_norm = acc_norm / l_i
                if MODE == 1:
                    mag_change = tl.abs(o_norm - prev_norm) / tl.maximum(o_norm, 1e-30)
                    dir_change = 1.0 - acc_dot / tl.maximum(acc_norm * prev_acc_norm, 1e-30)
                    calm = (mag_change < tau_mag) & (dir_change < tau_dir) & (block > first_block)
                    streak = tl.where(live, tl.where(calm, streak + 1, 0), streak)
                    head_ok = streak >= patience
                    prev_acc = tl.where(live, acc, prev_acc)
                    prev_acc_norm = tl.where(live, acc_norm, prev_acc_norm)
                    prev_norm = tl.where(live, o_norm, prev_norm)
                else:
                    # Bound (MODE 2: certified) or estimate (MODE 3) of the unread rest of this chunk.
                    log2w, log2w_low, log2wv, v_rest = next_log2w, next_log2w_low, next_log2wv, next_vrest
                    next_log2w, next_log2w_low, next_log2wv, next_vrest = _rest_terms(
                        bound_log2w_ptr, bound_vrest_ptr, bound_log2w_low_ptr, bound_log2wv_ptr, next_pos + BLOCK_PAGES,
                        end, g, g_ok, GROUP_PAD, MODE)
                    log2_rest = log2w - m_i
                    # W / (L + W), written so that W = 0 or huge W give 0 or 1, never NaN.
                    rest_fraction = 1.0 / (1.0 + l_i * tl.exp2(-log2_rest))
                    if MODE == 3:
                        # Estimated error: the unread share times how far the unread values (like
                        # the block just read, by its plain mean) sit from o_t, |o_t - mean| / |o_t|
                        # measured every mass_pull_checks checks (reductions across the warps cost
                        # ~5% of the kernel each on real attention when run at every check) and
                        # only once some head's share is at most mass_max_share.
                        share_ok = rest_fraction <= mass_max_share
                        measure = ((block - first_block) % mass_pull_checks == 0) & \
                            (tl.max((share_ok & g_ok).to(tl.int32), 0) > 0)
                        if measure:
                            # Row GROUP_SIZE has a zero query (the plan pads mass groups by one row):
                            # its softmax is uniform, so its share of the block's P.V is the plain sum
                            # of the block's values, free from the tensor cores (a reduction of the
                            # V tile instead made the kernel 1.3-1.5x slower).
                            block_sum = tl.sum(tl.where((g == GROUP_SIZE)[:, None], pv, 0.0), 0)
                            block_mean = block_sum * (1.0 / tl.maximum(block_tokens, 1))
                            o_t = acc * (1.0 / l_i)[:, None]
                            pull = o_t - block_mean[None, :]
                            pull_sq, o_sq = tl.reduce((pull * pull, o_t * o_t), 1, _add_pair)
                        head_ok = share_ok & (rest_fraction * rest_fraction * pull_sq <= (eps * eps) * o_sq)
                    else:
                        # |o| of the merged output: this chunk's own output only when the row is whole.
                        if SPLIT:
                            o_ref = vscale + tl.zeros([GROUP_PAD], tl.float32)
                        else:
                            o_ref = o_norm
                        weighted = log2wv - m_i
                        low = tl.minimum(log2w_low - m_i, log2_rest)
                        err_weighted = (tl.exp2(weighted) + tl.exp2(log2_rest) * o_ref) / (l_i + tl.exp2(low))
                        err_weighted = tl.where(tl.maximum(weighted, log2_rest) > overflow_log2, float("inf"),
                                                err_weighted)
                        err = tl.minimum(rest_fraction * (v_rest + o_ref), err_weighted)
                        if VALUES_RELATIVE:
                            head_ok = err <= eps * vscale
                        else:
                            head_ok = err <= eps * o_norm
                head_ok = head_ok & rest & live
                stable_at = tl.where(head_ok & (stable_at < 0), block, stable_at)
                group_ok = tl.min(tl.where(g_ok, head_ok, True).to(tl.int32), 0) == 1
                stop = group_ok & (next_pos - row_start >= min_pages)
                pos = tl.where(live, next_pos, pos)
                block = tl.where(live, block + 1, block)
                live = live & rest & ~stop
            go = live

    # An empty work item (a fixed-buffer plan's chunk past its row's end) merges with weight 0.
    o = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
    lse = m_i + tl.log2(l_i)
    if HEADS == 1:
        tl.store(visited_pages_ptr + work, tl.minimum(pos, end) - start)
        tl.store(visited_tokens_ptr + work, tokens_read)
        tl.store(loaded_tokens_ptr + work, loaded_tokens)
        tl.store(stable_at_ptr + work * GROUP_PAD + g, stable_at)
    else:
        # The same chunk of heads head + 1 .. : work items at a stride of the row's chunk count.
        row_chunks = tl.load(row_work_indptr_ptr + row + 1) - tl.load(row_work_indptr_ptr + row)
        h = tl.arange(0, HEADS)
        items = work + h * row_chunks
        tl.store(visited_pages_ptr + items, tl.zeros([HEADS], tl.int32) + (tl.minimum(pos, end) - start))
        tl.store(visited_tokens_ptr + items, tl.zeros([HEADS], tl.int32) + tokens_read)
        tl.store(loaded_tokens_ptr + items, tl.zeros([HEADS], tl.int32) + loaded_tokens)
        tl.store(stable_at_ptr + items[:, None] * GROUP_PAD + g[None, :], tl.full([HEADS, GROUP_PAD], -1, tl.int32))
        # Each query row's output: its own head's columns of the tile.
        own = (g // GROUP_SIZE)[:, None, None] == h[None, :, None]
        o = tl.sum(tl.where(own, tl.reshape(o, [GROUP_PAD, HEADS, HEAD_DIM]), 0.0), 1)
    if SPLIT and HEADS > 1:
        item_row = (work + (g // GROUP_SIZE) * row_chunks) * GROUP_PAD + g % GROUP_SIZE
        tl.store(part_out_ptr + item_row[:, None] * HEAD_DIM + dims[None, :], o, mask=g_ok[:, None])
        tl.store(part_lse_ptr + item_row, lse, mask=g_ok)
    elif SPLIT:
        tl.store(part_out_ptr + (work * GROUP_PAD + g)[:, None] * HEAD_DIM + dims[None, :], o)
        tl.store(part_lse_ptr + work * GROUP_PAD + g, lse)
    else:
        out_rows = head * GROUP_SIZE + g
        tl.store(out_ptr + request * stride_ob + out_rows[:, None] * stride_oh + dims[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
        tl.store(lse_ptr + request * NUM_KV_HEADS * GROUP_SIZE + out_rows, lse, mask=g_ok)


@triton.jit
def art_merge_kernel(
    part_out_ptr, part_lse_ptr, row_work_indptr_ptr, out_ptr, lse_ptr, stride_ob, stride_oh,
    NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, CHUNKS: tl.constexpr,
):
    """Combine the chunks of one (request, KV head) row for one query head by their base-2 LSEs.

    Grid ``(rows, GROUP_SIZE)``. One pass, ``CHUNKS`` chunks a step (one load of their LSEs and
    one of their ``[CHUNKS, D]`` outputs, issued together), rescaling the running sum when the
    maximum grows: a small batch splits a row into up to 64 chunks, and every dependent load is
    a round trip that the merge cannot hide (folding chunks one by one cost more than the
    decode itself, 14/2/64 at batch 1 / 32K on an H100: 19 µs against 12, NOTES v14; a first
    pass for the maximum cost another, v23).
    """
    row = tl.program_id(0)
    g = tl.program_id(1)
    request = row // NUM_KV_HEADS
    head = row % NUM_KV_HEADS
    c = tl.arange(0, CHUNKS)
    dims = tl.arange(0, HEAD_DIM)
    first = tl.load(row_work_indptr_ptr + row)
    last = tl.load(row_work_indptr_ptr + row + 1)
    m = tl.max(tl.full([CHUNKS], float("-inf"), tl.float32), 0)
    s = tl.sum(tl.zeros([CHUNKS], tl.float32), 0)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for start in range(first, last, CHUNKS):
        work = start + c
        ok = work < last
        lse = tl.load(part_lse_ptr + work * GROUP_PAD + g, mask=ok, other=float("-inf"))
        o = tl.load(part_out_ptr + (work * GROUP_PAD + g)[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None],
                    other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)
        s = s * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        m = m_new
    out_row = head * GROUP_SIZE + g
    tl.store(out_ptr + request * stride_ob + out_row * stride_oh + dims, (acc / s).to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + request * NUM_KV_HEADS * GROUP_SIZE + out_row, m + tl.log2(s))
