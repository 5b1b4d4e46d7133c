"""Triton kernel: page scores from page metadata alone (Quest's bound or ART's mass estimate).

One program per (row, tile of logical pages). For each page it bounds every query head's
logit over the page's tokens from the page's key box,
``ub_g = scale * sum_d max(q_gd kmax_d, q_gd kmin_d)``, and reduces over the GQA group (max or
mean); with ``ESTIMATE`` it instead estimates each query head's log-mass of the page from the
box centre and half-width (``art_runtime.termination``, mode ``mass``) and reduces over the
group by log-sum-exp (the group's estimated mass). It reads the page's fp8 box (2 * D bytes) and its scale, and nothing of K or V. The
head dimension is walked in slices so that the box loads of the next slice are in flight
while the tensor cores work on this one (a whole [TILE, D] box per load measured 15-50%
slower on an H100: see benchmarks/NOTES.md).
"""

import triton
import triton.language as tl


@triton.jit
def quest_page_scores_kernel(
    q_ptr, key_min_ptr, key_max_ptr, key_scale_ptr, kv_indptr_ptr, kv_indices_ptr,
    scores_ptr,                            # out: [R, width] fp32 (-inf past a row's pages)
    width, stride_qb, stride_qh, stride_mp, stride_mh, stride_sp, sm_scale,
    NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr, REDUCE_MAX: tl.constexpr,
    ESTIMATE: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr,
):
    row = tl.program_id(0)
    request = row // NUM_KV_HEADS
    head = row % NUM_KV_HEADS
    first = tl.load(kv_indptr_ptr + request)
    num_pages = tl.load(kv_indptr_ptr + request + 1) - first
    pages = tl.program_id(1) * TILE + tl.arange(0, TILE)
    ok = pages < num_pages
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP_SIZE
    phys = tl.load(kv_indices_ptr + first + pages, mask=ok, other=0).to(tl.int64)
    # The scales first: a gather of its own whose latency then hides behind the box loads
    # (loaded after the loop it cost 16-20% at batch 64 on an H100, benchmarks/NOTES.md p5).
    scale = tl.load(key_scale_ptr + phys * stride_sp + head, mask=ok, other=0.0)
    ub = tl.zeros([GROUP_PAD, TILE], tl.float32)  # the bound, or the estimate's mean term
    variance = tl.zeros([GROUP_PAD, TILE], tl.float32)
    for d0 in range(0, HEAD_DIM, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + request * stride_qb + (head * GROUP_SIZE + g)[:, None] * stride_qh + dims[None, :],
                    mask=g_ok[:, None], other=0.0)
        box = phys[:, None] * stride_mp + head * stride_mh + dims[None, :]
        kmin = tl.load(key_min_ptr + box, mask=ok[:, None], other=0.0)
        kmax = tl.load(key_max_ptr + box, mask=ok[:, None], other=0.0)
        if ESTIMATE:  # an estimate: 16-bit rounding of the centre, q^2 and the spread is harmless
            dot_dtype = q.dtype if DOT_IN_INPUT_DTYPE else tl.float32
            q32 = q.to(tl.float32)
            centre = ((kmin.to(tl.float32) + kmax.to(tl.float32)) * 0.5).to(dot_dtype)
            spread = (kmax.to(tl.float32) - kmin.to(tl.float32)) * 0.25
            if DOT_IN_INPUT_DTYPE:
                ub += tl.dot(q, tl.trans(centre))
                variance += tl.dot((q32 * q32).to(dot_dtype), tl.trans((spread * spread).to(dot_dtype)))
            else:
                ub += tl.dot(q32, tl.trans(centre), input_precision="ieee")
                variance += tl.dot(q32 * q32, tl.trans(spread * spread), input_precision="ieee")
        elif DOT_IN_INPUT_DTYPE:
            # e4m3 values are exact in q's 16-bit type and 16-bit products are exact in the
            # fp32 accumulator: tensor cores.
            ub += tl.dot(tl.maximum(q, 0.0).to(q.dtype), tl.trans(kmax.to(q.dtype)))
            ub += tl.dot(tl.minimum(q, 0.0).to(q.dtype), tl.trans(kmin.to(q.dtype)))
        else:
            q = q.to(tl.float32)
            ub += tl.dot(tl.maximum(q, 0.0), tl.trans(kmax.to(tl.float32)), input_precision="ieee")
            ub += tl.dot(tl.minimum(q, 0.0), tl.trans(kmin.to(tl.float32)), input_precision="ieee")
    ub = ub * scale[None, :]  # [GROUP_PAD, TILE]
    if ESTIMATE:  # natural-log mass per head, summed over the group
        log_mass = ub * sm_scale + variance * (scale * scale * (0.5 * sm_scale * sm_scale))[None, :]
        log_mass = tl.where(g_ok[:, None], log_mass, float("-inf"))
        top = tl.max(log_mass, 0)
        score = top + tl.log(tl.sum(tl.exp(log_mass - top[None, :]), 0))
    elif REDUCE_MAX:
        score = tl.max(tl.where(g_ok[:, None], ub, float("-inf")), 0)
    else:
        score = tl.sum(tl.where(g_ok[:, None], ub, 0.0), 0) / GROUP_SIZE
    tl.store(scores_ptr + row * width + pages, tl.where(ok, score, float("-inf")), mask=pages < width)
