"""Triton kernel: page scores from page metadata alone (Quest's bound or ART's mass estimate).

One program per (row, tile of logical pages). For each page it bounds every query head's
logit over the page's tokens from the page's key box,
``ub_g = scale * sum_d max(q_gd kmax_d, q_gd kmin_d)``, and reduces over the GQA group (max or
mean); with ``ESTIMATE`` it instead estimates each query head's log-mass of the page from the
box centre and half-width (``art_runtime.termination``, mode ``mass``) and reduces over the
group by log-sum-exp (the group's estimated mass). It reads the page's fp8 box (2 * D bytes)
and its scale, and nothing of K or V. The head dimension is walked in slices so that the box
loads of the next slice are in flight while the tensor cores work on this one (a whole
[TILE, D] box per load measured 15-50% slower on an H100, p5; with fp16 dots, the whole
2 * D box in one load and one dot: 1-5% slower at batch 16, 1-5% faster at batch 64 on an H100
and an H200, p13: see benchmarks/NOTES.md).

With ``TENSOR_CORES`` (16-bit queries, off the Triton interpreter) Quest's bound dots in fp16:
an fp8 box converts to fp16 in one instruction per pair, where bf16 takes a detour through
fp32 that cost a sixth of the kernel's time on an H200 (benchmarks/NOTES.md p11). In each
head-dim slice every query head is first scaled by the power of two that brings its largest
|q_d| there to [2^14, 2^15): every bf16 or fp16 component then converts exactly (components
below 2^-31 of the largest excepted), the products are exact in the fp32 accumulator, and
scaling the slice's dot back by the inverse power of two is exact too. Mode ``mass``'s
estimate (``box_log2_mass``, shared with its pre-pass in ``page_bounds``) dots in bf16.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _group_query(q_ptr, request, head, stride_qb, stride_qh, dims,
                 GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr):
    """``[GROUP_PAD, len(dims)]`` fp32: the group's query heads at ``dims`` (rows past the group 0)."""
    g = tl.arange(0, GROUP_PAD)
    return tl.load(q_ptr + request * stride_qb + (head * GROUP_SIZE + g)[:, None] * stride_qh + dims[None, :],
                   mask=(g < GROUP_SIZE)[:, None], other=0.0).to(tl.float32)


@triton.jit
def _fp16_row_scale(q, LOG2_TOP: tl.constexpr):
    """``[rows]`` powers of two that bring each row's largest |q| into [2^LOG2_TOP, 2^(LOG2_TOP + 1)),
    at most 2^126 (a zero row, or one below 2^-112), built from the float's exponent bits, and
    their inverses (normal floats: exact)."""
    exponent = (tl.max(tl.abs(q), 1).to(tl.int32, bitcast=True) >> 23) & 0xFF
    biased = tl.minimum(254 + LOG2_TOP - exponent, 253)
    return (biased << 23).to(tl.float32, bitcast=True), ((254 - biased) << 23).to(tl.float32, bitcast=True)


@triton.jit
def box_upper_bound(q_ptr, key_min_ptr, key_max_ptr, phys, ok, request, head,
                    stride_qb, stride_qh, stride_mp, stride_mh,
                    GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, TILE: tl.constexpr, TENSOR_CORES: tl.constexpr):
    """``[GROUP_PAD, TILE]``: ``sum_d max(q_gd kmax_d, q_gd kmin_d)`` over the boxes of the pages
    ``phys`` (``[TILE]`` int64, ``ok`` valid), in box units (times the page's key scale: q . k);
    exact products in fp16 on tensor cores (the module docstring), else in fp32."""
    ub = tl.zeros([GROUP_PAD, TILE], tl.float32)
    for d0 in range(0, HEAD_DIM, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        q = _group_query(q_ptr, request, head, stride_qb, stride_qh, dims, GROUP_SIZE, GROUP_PAD)
        box = phys[:, None] * stride_mp + head * stride_mh + dims[None, :]
        kmin = tl.load(key_min_ptr + box, mask=ok[:, None], other=0.0)
        kmax = tl.load(key_max_ptr + box, mask=ok[:, None], other=0.0)
        if TENSOR_CORES:
            q_scale, q_unscale = _fp16_row_scale(q, 14)
            q = q * q_scale[:, None]
            part = tl.dot(tl.maximum(q, 0.0).to(tl.float16), tl.trans(kmax.to(tl.float16)))
            part = tl.dot(tl.minimum(q, 0.0).to(tl.float16), tl.trans(kmin.to(tl.float16)), part)
            ub += part * q_unscale[:, None]
        else:
            ub += tl.dot(tl.maximum(q, 0.0), tl.trans(kmax.to(tl.float32)), input_precision="ieee")
            ub += tl.dot(tl.minimum(q, 0.0), tl.trans(kmin.to(tl.float32)), input_precision="ieee")
    return ub


@triton.jit
def box_log2_mass(q_ptr, key_min_ptr, key_max_ptr, key_scale_ptr, phys, ok, request, head,
                  stride_qb, stride_qh, stride_mp, stride_mh, stride_sp, qk_scale, sm_scale,
                  GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  TILE: tl.constexpr, TENSOR_CORES: tl.constexpr):
    """``[GROUP_PAD, TILE]``: mode mass's estimate of the base-2 log-mass of the pages ``phys``
    (``[TILE]`` int64, ``ok`` valid) without their token counts, keys spread around the box
    centre with deviation half the half-width; the head dimension in slices of ``BLOCK_D``.
    On tensor cores in bf16 (fp32's range, so q^2 cannot overflow; the rounding of an
    estimate is harmless, and fp16 measured no faster here: the box is converted to fp32 for
    the centre and spread either way)."""
    scale = tl.load(key_scale_ptr + phys * stride_sp + head, mask=ok, other=0.0)  # before the loop: p5
    mean = tl.zeros([GROUP_PAD, TILE], tl.float32)
    variance = tl.zeros([GROUP_PAD, TILE], tl.float32)
    for d0 in range(0, HEAD_DIM, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        q = _group_query(q_ptr, request, head, stride_qb, stride_qh, dims, GROUP_SIZE, GROUP_PAD)
        box = phys[:, None] * stride_mp + head * stride_mh + dims[None, :]
        kmin = tl.load(key_min_ptr + box, mask=ok[:, None], other=0.0).to(tl.float32)
        kmax = tl.load(key_max_ptr + box, mask=ok[:, None], other=0.0).to(tl.float32)
        centre = (kmin + kmax) * 0.5
        spread = (kmax - kmin) * 0.25
        if TENSOR_CORES:
            mean += tl.dot(q.to(tl.bfloat16), tl.trans(centre.to(tl.bfloat16)))
            variance += tl.dot((q * q).to(tl.bfloat16), tl.trans((spread * spread).to(tl.bfloat16)))
        else:
            mean += tl.dot(q, tl.trans(centre), input_precision="ieee")
            variance += tl.dot(q * q, tl.trans(spread * spread), input_precision="ieee")
    return mean * (scale * qk_scale)[None, :] + variance * (scale * scale * (qk_scale * sm_scale * 0.5))[None, :]


@triton.jit
def quest_page_scores_kernel(
    q_ptr, key_min_ptr, key_max_ptr, key_scale_ptr, kv_indptr_ptr, kv_indices_ptr,
    scores_ptr,                            # out: [R, width] fp32 (-inf past a row's pages)
    width, stride_qb, stride_qh, stride_mp, stride_mh, stride_sp, sm_scale,
    NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr, REDUCE_MAX: tl.constexpr,
    ESTIMATE: tl.constexpr, TENSOR_CORES: tl.constexpr,
):
    row = tl.program_id(0)
    request = row // NUM_KV_HEADS
    head = row % NUM_KV_HEADS
    first = tl.load(kv_indptr_ptr + request)
    num_pages = tl.load(kv_indptr_ptr + request + 1) - first
    pages = tl.program_id(1) * TILE + tl.arange(0, TILE)
    ok = pages < num_pages
    g_ok = tl.arange(0, GROUP_PAD) < GROUP_SIZE
    phys = tl.load(kv_indices_ptr + first + pages, mask=ok, other=0).to(tl.int64)
    if ESTIMATE:  # natural-log mass per head, summed over the group
        log2_mass = box_log2_mass(q_ptr, key_min_ptr, key_max_ptr, key_scale_ptr, phys, ok, request, head,
                                  stride_qb, stride_qh, stride_mp, stride_mh, stride_sp, sm_scale * LOG2E, sm_scale,
                                  GROUP_SIZE, GROUP_PAD, HEAD_DIM, BLOCK_D, TILE, TENSOR_CORES)
        log2_mass = tl.where(g_ok[:, None], log2_mass, float("-inf"))
        top = tl.max(log2_mass, 0)
        score = (top + tl.log2(tl.sum(tl.exp2(log2_mass - top[None, :]), 0))) * LN2
    else:
        # The scales first: a gather of its own whose latency then hides behind the box loads
        # (loaded after the loop it cost 16-20% at batch 64 on an H100, benchmarks/NOTES.md p5).
        scale = tl.load(key_scale_ptr + phys * stride_sp + head, mask=ok, other=0.0)
        ub = box_upper_bound(q_ptr, key_min_ptr, key_max_ptr, phys, ok, request, head, stride_qb, stride_qh,
                             stride_mp, stride_mh, GROUP_SIZE, GROUP_PAD, HEAD_DIM, BLOCK_D, TILE,
                             TENSOR_CORES) * scale[None, :]
        if REDUCE_MAX:
            score = tl.max(tl.where(g_ok[:, None], ub, float("-inf")), 0)
        else:
            score = tl.sum(tl.where(g_ok[:, None], ub, 0.0), 0) / GROUP_SIZE
    tl.store(scores_ptr + row * width + pages, tl.where(ok, score, float("-inf")), mask=pages < width)
