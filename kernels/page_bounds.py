"""Triton kernel: per-page logit bounds (or mass estimates) and their suffix sums over a visit order.

One program per work item (a chunk of one (request, KV head)'s visit order). It walks the
chunk backwards in tiles, bounds every page's logits from its key box,
``ub_j = sum_d max(q_d kmax_jd, q_d kmin_jd)`` (plus a rounding margin; the fp8 boxes are
exact in q's type and scaled by the page's power-of-two scale after the dot), and writes for every
position ``p`` the base-2 log of ``sum_{j >= p in chunk} n_j 2^(qk_scale * ub_j)`` and the
largest value norm over the same suffix. With ``ESTIMATE`` (mode ``mass``) a page's term is
instead its estimated log-mass from the box centre and half-width (``art_runtime.termination``).
The decode kernel's check is then a few scalar operations per block. Suffix sums use an exact log-sum-exp scan, so no range of
logits underflows into a wrong zero.
"""

import triton
import triton.language as tl

# Relative margin added to every logit bound, covering fp32 rounding of both this dot
# product and the decode kernel's (a D-term sum has relative error below D * 2^-24).
ROUNDING_MARGIN = tl.constexpr(2.0 ** -12)


@triton.jit
def _logsumexp2_combine(m1, s1, m2, s2):
    m = tl.maximum(m1, m2)
    s = s1 * tl.where(m1 == m, 1.0, tl.exp2(m1 - m)) + s2 * tl.where(m2 == m, 1.0, tl.exp2(m2 - m))
    return m, s


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def page_bound_suffix_kernel(
    q_ptr, key_min_ptr, key_max_ptr, key_scale_ptr, value_norm_ptr,
    visit_phys_ptr, visit_tokens_ptr, work_row_ptr, work_start_ptr, work_end_ptr,
    log2w_ptr, vrest_ptr,               # out: [nnz, GROUP_PAD] fp32, [nnz] fp32
    stride_qb, stride_qh, stride_mp, stride_mh, stride_np,
    qk_scale, sm_scale, value_norm_scale,
    NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, TILE: tl.constexpr, ESTIMATE: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr,
):
    work = tl.program_id(0)
    row = tl.load(work_row_ptr + work)
    request = row // NUM_KV_HEADS
    head = row % NUM_KV_HEADS
    start = tl.load(work_start_ptr + work)
    end = tl.load(work_end_ptr + work)

    g = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + request * stride_qb + (head * GROUP_SIZE + g)[:, None] * stride_qh + dims[None, :],
                mask=(g < GROUP_SIZE)[:, None], other=0.0)
    # 16-bit operands: exact products, fp32 accumulation on tensor cores (the margin covers
    # its rounding); fp32 operands: ieee.
    dot_dtype = q.dtype if DOT_IN_INPUT_DTYPE else tl.float32
    q = q.to(tl.float32)
    q_pos = tl.maximum(q, 0.0).to(dot_dtype)  # exact: q's values come from dot_dtype
    q_neg = tl.minimum(q, 0.0).to(dot_dtype)
    q_abs = tl.abs(q).to(dot_dtype)
    q_full = q.to(dot_dtype)
    q_square = (q * q).to(dot_dtype)  # an estimate: rounding q^2 to 16 bits is harmless

    carry_m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    carry_s = tl.zeros([GROUP_PAD], tl.float32)
    carry_v = tl.max(tl.zeros([TILE], tl.float32), 0)
    t = tl.arange(0, TILE)
    for tile in range(0, tl.cdiv(end - start, TILE)):
        pos = end - (tile + 1) * TILE + t
        ok = pos >= start
        phys = tl.load(visit_phys_ptr + pos, mask=ok, other=0).to(tl.int64)
        tokens = tl.load(visit_tokens_ptr + pos, mask=ok, other=1)
        box = phys[:, None] * stride_mp + head * stride_mh + dims[None, :]
        kmin = tl.load(key_min_ptr + box, mask=ok[:, None], other=0.0).to(dot_dtype)
        kmax = tl.load(key_max_ptr + box, mask=ok[:, None], other=0.0).to(dot_dtype)
        scale = tl.load(key_scale_ptr + phys * stride_np + head, mask=ok, other=0.0)[None, :]
        if ESTIMATE:
            # log-mass of keys spread around the box centre with deviation half the half-width
            centre = ((kmin.to(tl.float32) + kmax.to(tl.float32)) * 0.5).to(dot_dtype)
            spread = (kmax.to(tl.float32) - kmin.to(tl.float32)) * 0.25
            spread_square = (spread * spread).to(dot_dtype)
            if DOT_IN_INPUT_DTYPE:
                mean = tl.dot(q_full, tl.trans(centre))
                variance = tl.dot(q_square, tl.trans(spread_square))
            else:
                mean = tl.dot(q_full, tl.trans(centre), input_precision="ieee")
                variance = tl.dot(q_square, tl.trans(spread_square), input_precision="ieee")
            logit = mean * scale * qk_scale + variance * (scale * scale) * (qk_scale * sm_scale * 0.5)
        else:
            k_abs = tl.maximum(tl.abs(kmin), tl.abs(kmax)).to(dot_dtype)
            if DOT_IN_INPUT_DTYPE:
                ub = tl.dot(q_pos, tl.trans(kmax)) + tl.dot(q_neg, tl.trans(kmin))
                margin = tl.dot(q_abs, tl.trans(k_abs)) * ROUNDING_MARGIN
            else:
                ub = tl.dot(q_pos, tl.trans(kmax), input_precision="ieee") + \
                    tl.dot(q_neg, tl.trans(kmin), input_precision="ieee")
                margin = tl.dot(q_abs, tl.trans(k_abs), input_precision="ieee") * ROUNDING_MARGIN
            logit = (ub + margin) * scale * qk_scale
        x = tl.where(ok[None, :], logit + tl.log2(tokens.to(tl.float32))[None, :], float("-inf"))
        ones = tl.where(ok[None, :], 1.0, 0.0) + tl.zeros([GROUP_PAD, TILE], tl.float32)
        suf_m, suf_s = tl.associative_scan((x, ones), 1, _logsumexp2_combine, reverse=True)
        suf_m, suf_s = _logsumexp2_combine(suf_m, suf_s, carry_m[:, None], carry_s[:, None])
        log2w = suf_m + tl.log2(suf_s)
        tl.store(log2w_ptr + pos[None, :] * GROUP_PAD + g[:, None], log2w, mask=ok[None, :])
        carry_m, carry_s = _logsumexp2_combine(carry_m, carry_s, tl.max(x, 1),
                                               tl.sum(tl.where(ok[None, :], tl.exp2(x - tl.max(x, 1)[:, None]), 0.0), 1))
        vnorm = tl.load(value_norm_ptr + phys * stride_np + head, mask=ok, other=0.0) * value_norm_scale
        vrest = tl.maximum(tl.associative_scan(vnorm, 0, _max_combine, reverse=True), carry_v)
        tl.store(vrest_ptr + pos, vrest, mask=ok)
        carry_v = tl.maximum(carry_v, tl.max(vnorm, 0))
