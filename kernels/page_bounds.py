"""Triton kernel: per-page mass bounds (or estimates) and their suffix sums over a visit order.

One program per work item (a chunk of one (request, KV head)'s visit order), three passes:

1. Backwards in tiles of ``TILE`` pages: each page's estimated log-mass from its key box
   centre and half-width (``art_runtime.termination``, mode ``mass``), its suffix sums
   (base 2, over the positions from ``p`` to the chunk's end) and the suffix max of the value
   norms. Mode ``mass`` (``ESTIMATE``) stops here: the decode kernel reads these.
2. Mode ``bound``: the cut, the first position at which every head's estimated unread share
   is at most ``2^log2_cut_share``; positions before it get infinite terms (no stop there).
3. Backwards from the end to the cut: every token's logit bounded from its 8-bit key sketch
   (``art_runtime.reference.sketch_page_log2_mass``: one dot of the query with the token's
   codes times the page's power-of-two steps, exact in bf16, plus per-page terms and a
   rounding margin), giving each page's mass upper bound ``W_j`` and lower bound; written:
   the base-2 logs of the suffix sums of ``W_j``, of the lower bounds and of ``W_j Vmax_j``.

The decode kernel's check is then a few scalar operations per block. Suffix sums use an
exact log-sum-exp scan, so no range of logits underflows into a wrong zero.
"""

import triton
import triton.language as tl

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
def _dot(a, b, DOT_IN_INPUT_DTYPE: tl.constexpr):
    if DOT_IN_INPUT_DTYPE:
        return tl.dot(a, b)
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def page_bound_suffix_kernel(
    q_ptr, key_min_ptr, key_max_ptr, key_scale_ptr, value_norm_ptr,
    codes_ptr, base_ptr, exponent_ptr,  # key sketch: [max_pages, H_kv, P, D] uint8, [max_pages, H_kv, D] x2
    visit_phys_ptr, visit_tokens_ptr, work_row_ptr, work_start_ptr, work_end_ptr,
    log2w_ptr, vrest_ptr,               # out: [nnz, GROUP_PAD] fp32, [nnz] fp32
    log2w_low_ptr, log2wv_ptr,          # out (bound): [nnz, GROUP_PAD] fp32 each
    sketch_pages_ptr,                   # out (bound): [W] int32, pages whose key sketch was read (from the cut on)
    stride_qb, stride_qh, stride_mp, stride_mh, stride_np, stride_cp, stride_ch, stride_gp, stride_gh,
    qk_scale, sm_scale, value_norm_scale, log2_slack, log2_cut_share,
    NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, TILE: tl.constexpr, ESTIMATE: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr,
    PAGE_SIZE_POW2: tl.constexpr,
):
    work = tl.program_id(0)
    row = tl.load(work_row_ptr + work)
    request = row // NUM_KV_HEADS
    head = row % NUM_KV_HEADS
    start = tl.load(work_start_ptr + work)
    end = tl.load(work_end_ptr + work)

    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP_SIZE
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + request * stride_qb + (head * GROUP_SIZE + g)[:, None] * stride_qh + dims[None, :],
                mask=g_ok[:, None], other=0.0)
    q_input = q
    q = q.to(tl.float32)
    dot_dtype = q_input.dtype if DOT_IN_INPUT_DTYPE else tl.float32
    t = tl.arange(0, TILE)

    # Pass 1: the mass estimate from the key boxes (mode mass's criterion; bound's cut), and Vrest.
    carry_m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    carry_s = tl.zeros([GROUP_PAD], tl.float32)
    carry_v = tl.max(tl.zeros([TILE], tl.float32), 0)
    for tile in range(0, tl.cdiv(end - start, TILE)):
        pos = end - (tile + 1) * TILE + t
        ok = pos >= start
        phys = tl.load(visit_phys_ptr + pos, mask=ok, other=0).to(tl.int64)
        tokens = tl.load(visit_tokens_ptr + pos, mask=ok, other=1)
        # log-mass of keys spread around the box centre with deviation half the half-width
        box = phys[:, None] * stride_mp + head * stride_mh + dims[None, :]
        kmin = tl.load(key_min_ptr + box, mask=ok[:, None], other=0.0).to(tl.float32)
        kmax = tl.load(key_max_ptr + box, mask=ok[:, None], other=0.0).to(tl.float32)
        scale = tl.load(key_scale_ptr + phys * stride_np + head, mask=ok, other=0.0)[None, :]
        centre = ((kmin + kmax) * 0.5).to(dot_dtype)
        spread = (kmax - kmin) * 0.25
        mean = _dot(q.to(dot_dtype), tl.trans(centre), DOT_IN_INPUT_DTYPE)
        variance = _dot((q * q).to(dot_dtype), tl.trans((spread * spread).to(dot_dtype)), DOT_IN_INPUT_DTYPE)
        logit = mean * scale * qk_scale + variance * (scale * scale) * (qk_scale * sm_scale * 0.5)
        x = logit + tl.log2(tokens.to(tl.float32))[None, :]
        estimate, carry_m, carry_s = _suffix_log2_sum(x, ok, carry_m, carry_s)
        tl.store(log2w_ptr + pos[None, :] * GROUP_PAD + g[:, None], estimate, mask=ok[None, :])
        vnorm = tl.load(value_norm_ptr + phys * stride_np + head, mask=ok, other=0.0) * value_norm_scale
        vrest = tl.maximum(tl.associative_scan(vnorm, 0, _max_combine, reverse=True), carry_v)
        tl.store(vrest_ptr + pos, vrest, mask=ok)
        carry_v = tl.maximum(carry_v, tl.max(vnorm, 0))

    if not ESTIMATE:
        # Pass 2, the cut: positions where some head's estimated unread share is above
        # 2^log2_cut_share cannot stop (a prefix: suffix sums only shrink); they get no sketch.
        threshold = carry_m + tl.log2(carry_s) + log2_cut_share
        early_count = start * 0
        for tile in range(0, tl.cdiv(end - start, TILE)):
            pos = start + tile * TILE + t
            ok = pos < end
            estimate = tl.load(log2w_ptr + pos[None, :] * GROUP_PAD + g[:, None], mask=ok[None, :] & g_ok[:, None],
                               other=float("-inf"))
            early = tl.max((estimate > threshold[:, None]).to(tl.int32), 0)
            early_count += tl.sum(early, 0)
            tl.store(log2w_ptr + pos[None, :] * GROUP_PAD + g[:, None], float("inf"),
                     mask=(ok & (early > 0))[None, :])
            tl.store(log2w_low_ptr + pos[None, :] * GROUP_PAD + g[:, None], float("-inf"),
                     mask=(ok & (early > 0))[None, :])
            tl.store(log2wv_ptr + pos[None, :] * GROUP_PAD + g[:, None], float("inf"),
                     mask=(ok & (early > 0))[None, :])
        cut = start + early_count
        tl.store(sketch_pages_ptr + work, end - cut)

        # Pass 3: certified mass bounds from the key sketch (reference.sketch_page_log2_mass)
        # of the positions from the cut on, and their suffix sums.
        carry_m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        carry_s = tl.zeros([GROUP_PAD], tl.float32)
        low_m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        low_s = tl.zeros([GROUP_PAD], tl.float32)
        wv_m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        wv_s = tl.zeros([GROUP_PAD], tl.float32)
        slots = tl.arange(0, PAGE_SIZE_POW2)
        for tile in range(0, tl.cdiv(end - cut, TILE)):
            pos = end - (tile + 1) * TILE + t
            ok = pos >= cut
            phys = tl.load(visit_phys_ptr + pos, mask=ok, other=0).to(tl.int64)
            tokens = tl.load(visit_tokens_ptr + pos, mask=ok, other=1)
            vnorm = tl.load(value_norm_ptr + phys * stride_np + head, mask=ok, other=0.0) * value_norm_scale
            grid = phys[:, None] * stride_gp + head * stride_gh + dims[None, :]
            exponent = tl.load(exponent_ptr + grid, mask=ok[:, None], other=0).to(tl.int32)
            step = ((exponent + 127) << 23).to(tl.float32, bitcast=True)  # 2^exponent, exactly
            base = tl.load(base_ptr + grid, mask=ok[:, None], other=0).to(tl.float32)
            offset = _dot(q, tl.trans(step * base), False)  # [GROUP_PAD, TILE]; ieee: base has 16 bits
            up = _dot(tl.maximum(q, 0.0), tl.trans(step), False)
            down = _dot(tl.minimum(q, 0.0), tl.trans(step), False)
            reach = tl.maximum(tl.abs(base), tl.abs(base + SKETCH_LEVELS)) * step
            margin = _dot(tl.abs(q), tl.trans(reach), False) * ROUNDING_MARGIN
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
            upper = (offset + up + margin) * qk_scale + lse
            lower = (offset + down - margin) * qk_scale + lse
            log2w, carry_m, carry_s = _suffix_log2_sum(upper, ok, carry_m, carry_s)
            log2w_low, low_m, low_s = _suffix_log2_sum(lower, ok, low_m, low_s)
            log2wv, wv_m, wv_s = _suffix_log2_sum(upper + tl.log2(vnorm)[None, :], ok, wv_m, wv_s)
            out = pos[None, :] * GROUP_PAD + g[:, None]
            tl.store(log2w_ptr + out, log2w + log2_slack, mask=ok[None, :])
            tl.store(log2w_low_ptr + out, log2w_low - log2_slack, mask=ok[None, :])
            tl.store(log2wv_ptr + out, log2wv + log2_slack, mask=ok[None, :])
