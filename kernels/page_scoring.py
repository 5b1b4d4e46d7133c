"""Triton kernel: Quest page scores from page metadata alone.

One program per (row, tile of logical pages). For each page it bounds every query head's
logit over the page's tokens from the page's key box,
``ub_g = sum_d max(q_gd kmax_d, q_gd kmin_d)``, and reduces over the GQA group (max or mean).
It reads 2 * D metadata values per page and nothing of K or V.
"""

import triton
import triton.language as tl


@triton.jit
def quest_page_scores_kernel(
    q_ptr, key_min_ptr, key_max_ptr, kv_indptr_ptr, kv_indices_ptr,
    scores_ptr,                            # out: [R, width] fp32 (-inf past a row's pages)
    width, stride_qb, stride_qh, stride_mp, stride_mh,
    NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, TILE: tl.constexpr, REDUCE_MAX: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr,
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
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + request * stride_qb + (head * GROUP_SIZE + g)[:, None] * stride_qh + dims[None, :],
                mask=g_ok[:, None], other=0.0)
    phys = tl.load(kv_indices_ptr + first + pages, mask=ok, other=0).to(tl.int64)
    box = phys[:, None] * stride_mp + head * stride_mh + dims[None, :]
    kmin = tl.load(key_min_ptr + box, mask=ok[:, None], other=0.0)
    kmax = tl.load(key_max_ptr + box, mask=ok[:, None], other=0.0)
    if DOT_IN_INPUT_DTYPE:  # 16-bit products are exact in the fp32 accumulator: tensor cores
        q = q.to(tl.float32)
        ub = tl.dot(tl.maximum(q, 0.0).to(kmax.dtype), tl.trans(kmax)) + \
            tl.dot(tl.minimum(q, 0.0).to(kmin.dtype), tl.trans(kmin))  # [GROUP_PAD, TILE]
    else:
        q = q.to(tl.float32)
        ub = tl.dot(tl.maximum(q, 0.0), tl.trans(kmax.to(tl.float32)), input_precision="ieee") + \
            tl.dot(tl.minimum(q, 0.0), tl.trans(kmin.to(tl.float32)), input_precision="ieee")
    if REDUCE_MAX:
        score = tl.max(tl.where(g_ok[:, None], ub, float("-inf")), 0)
    else:
        score = tl.sum(tl.where(g_ok[:, None], ub, 0.0), 0) / GROUP_SIZE
    tl.store(scores_ptr + row * width + pages, tl.where(ok, score, float("-inf")), mask=pages < width)
