"""Triton kernel: keep per-page key boxes, key sketches and value norms current on append.

One program per (appended token, KV head). Only the program of the *first* appended token
of each touched page does work: it reads that page's new tokens (at most ``page_size``,
contiguous in the append buffer), reduces them, and merges with the stored summary, or
overwrites it when the page starts fresh (slot 0). Pages of different requests are
disjoint, so no two programs write the same page: no atomics, deterministic, and nothing
of the cache is re-read. Boxes are rounded outward onto the fp8 grid of a power-of-two scale
per (page, head), exactly as ``art_runtime.page_metadata.quantize_key_box`` does (every step
is exact in fp32, so the two agree bit for bit). The key sketch, where the metadata stores one
(``SKETCH``), is rebuilt from the page's old cells (on the old grid, whose base is the old box's)
and its new keys exactly as ``art_runtime.page_metadata.build_key_sketch`` does (powers of two
and exact corrections again: bit for bit); ``sketch_base`` is also how the bound's pre-pass
finds each page's grid base.
"""

import triton
import triton.language as tl

BOX_TOP_EXPONENT = tl.constexpr(7)  # the largest |key| scales into [128, 256)
E4M3_MIN_EXPONENT = tl.constexpr(-6)
E4M3_MANTISSA_BITS = tl.constexpr(3)
SKETCH_LEVELS = tl.constexpr(256)
SKETCH_FLOOR_SHIFT = tl.constexpr(-6)


@triton.jit
def _power_of_two(exponent):
    """2^exponent as float32, exactly (exponent an int32 in -126..127)."""
    return ((exponent + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _floor_log2(x):
    """floor(log2 |x|) for normal float32 x (-127 for zero)."""
    return ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _box_scale(max_abs):
    scale = _power_of_two(tl.maximum(_floor_log2(max_abs) - BOX_TOP_EXPONENT, -126))
    return tl.where(max_abs > 0, scale, 0.0)


@triton.jit
def _round_outward_to_e4m3(x, UP: tl.constexpr):
    """x rounded down (or up) to e4m3's grid: steps of 2^(floor(log2|x|) - 3), at least 2^-9.

    Multiplications by powers of two only (a division may be approximate on the GPU).
    """
    exponent = tl.maximum(_floor_log2(x), E4M3_MIN_EXPONENT) - E4M3_MANTISSA_BITS
    units = x * _power_of_two(-exponent)
    if UP:
        units = tl.ceil(units)
    else:
        units = tl.floor(units)
    return units * _power_of_two(exponent)


@triton.jit
def sketch_base(box_min, scale, exponent):
    """The sketch grid's base in cells, ``floor(box minimum / 2^exponent)``, exactly
    (``art_runtime.page_metadata.sketch_base``; ``box_min`` the stored fp8 value as float32,
    in units of ``scale``, a power of two)."""
    return tl.floor(box_min * _power_of_two(_floor_log2(scale) - exponent))


@triton.jit
def _key_sketch(key_ptr, codes_ptr, exponent_ptr, token, slot, count, page, head, old_min, old_scale, box_min, scale,
                stride_kt, stride_kh, stride_cp, stride_ch, stride_gp, stride_gh,
                HEAD_DIM: tl.constexpr, PAGE_SIZE_POW2: tl.constexpr):
    """The key sketch of one (page, head): codes by slot ``[PAGE_SIZE_POW2, HEAD_DIM]`` int32 and
    the grid steps' exponents ``[HEAD_DIM]`` (``build_key_sketch``).

    Slots before ``slot`` hold old tokens, read back as the lower ends of their cells on the
    old grid (whose base is the old box's: ``old_min`` in units of ``old_scale``); the
    ``count`` new keys go to the slots from ``slot`` on. ``box_min`` (units of ``scale``) is
    the new box's minimum.
    """
    slots = tl.arange(0, PAGE_SIZE_POW2)
    dims = tl.arange(0, HEAD_DIM)
    is_old = slots < slot
    is_new = (slots >= slot) & (slots < slot + count)
    keys = tl.load(key_ptr + (token + slots - slot)[:, None] * stride_kt + head * stride_kh + dims[None, :],
                   mask=is_new[:, None], other=0.0).to(tl.float32)
    old_codes = tl.load(codes_ptr + page * stride_cp + head * stride_ch + slots[:, None] * HEAD_DIM + dims[None, :],
                        mask=is_old[:, None], other=0).to(tl.float32)
    grid = page * stride_gp + head * stride_gh + dims
    old_exponent = tl.load(exponent_ptr + grid).to(tl.int32)
    old_step = _power_of_two(old_exponent)
    old_lo = (sketch_base(old_min, old_scale, old_exponent)[None, :] + old_codes) * old_step[None, :]
    points = tl.where(is_new[:, None], keys, old_lo)
    top_key = tl.max(tl.where(is_new[:, None], keys, float("-inf")), 0)
    top_cell = tl.max(tl.where(is_old[:, None], old_lo + old_step[None, :], float("-inf")), 0)
    floor = tl.maximum(scale * (2.0 ** SKETCH_FLOOR_SHIFT), 2.0 ** -126)
    least = tl.maximum(floor, tl.where(slot > 0, old_step, 0.0))
    span = tl.maximum(tl.maximum(top_key, top_cell) - box_min * scale, 0.0)
    wide = tl.maximum(_power_of_two(_floor_log2(tl.maximum(span * (1.0 / (SKETCH_LEVELS - 1)), 2.0 ** -126)) + 1),
                      least)
    step = wide * 2.0  # fits even if the division rounded down
    for shrink in tl.static_range(3):
        candidate = wide * (0.5 ** shrink)
        top_of = (sketch_base(box_min, scale, _floor_log2(candidate)) + SKETCH_LEVELS) * candidate
        fits = (candidate >= least) & (top_key < top_of) & (top_cell <= top_of)
        step = tl.where(fits, candidate, step)
    exponent = _floor_log2(step)
    origin = (sketch_base(box_min, scale, exponent) * step)[None, :]
    inv_step = _power_of_two(-exponent)
    codes = tl.floor((points - origin) * inv_step[None, :])
    codes = tl.where(origin + codes * step[None, :] > points, codes - 1, codes)
    codes = tl.where(origin + (codes + 1) * step[None, :] <= points, codes + 1, codes)
    valid = (is_new | is_old)[:, None]
    codes = tl.where(valid, tl.minimum(tl.maximum(codes, 0.0), SKETCH_LEVELS - 1), 0.0).to(tl.int32)
    return codes, exponent


@triton.jit
def page_metadata_update_kernel(
    key_ptr, value_ptr,            # [nnz, H_kv, D] appended keys / values
    batch_indices_ptr, positions_ptr,  # [nnz] int32
    append_indptr_ptr,             # [B + 1] int32: first appended token of each request
    kv_indices_ptr, kv_indptr_ptr,  # page table (int32)
    kmin_ptr, kmax_ptr,            # [max_pages, H_kv, D] fp8 boxes
    kscale_ptr, vnorm_ptr,         # [max_pages, H_kv] fp32 box scales and value norms
    codes_ptr,                     # [max_pages, H_kv, PAGE_SIZE, D] uint8 key sketch (if SKETCH)
    exponent_ptr,                  # [max_pages, H_kv, D] int8 sketch grid steps (if SKETCH)
    nnz,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_mp, stride_mh, stride_np, stride_cp, stride_ch, stride_gp, stride_gh,
    PAGE_SIZE: tl.constexpr, PAGE_SIZE_POW2: tl.constexpr, HEAD_DIM: tl.constexpr,
    SKETCH: tl.constexpr,          # whether the metadata stores the key sketch
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    request = tl.load(batch_indices_ptr + token)
    position = tl.load(positions_ptr + token)
    slot = position % PAGE_SIZE
    request_first = tl.load(append_indptr_ptr + request)
    request_end = tl.load(append_indptr_ptr + request + 1)
    # This program owns the page iff its token is the first new token written into it.
    if (slot == 0) | (token == request_first):
        count = tl.minimum(PAGE_SIZE - slot, request_end - token)
        page = tl.load(kv_indices_ptr + tl.load(kv_indptr_ptr + request) + position // PAGE_SIZE)
        rows = tl.arange(0, PAGE_SIZE_POW2)
        dims = tl.arange(0, HEAD_DIM)
        row_mask = rows < count
        mask = row_mask[:, None]
        k = tl.load(key_ptr + (token + rows)[:, None] * stride_kt + head * stride_kh + dims[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        v = tl.load(value_ptr + (token + rows)[:, None] * stride_vt + head * stride_vh + dims[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        new_min = tl.min(tl.where(mask, k, float("inf")), axis=0)
        new_max = tl.max(tl.where(mask, k, float("-inf")), axis=0)
        new_vnorm = tl.max(tl.where(row_mask, tl.sqrt(tl.sum(v * v, axis=1)), 0.0), axis=0)
        scale = _box_scale(tl.max(tl.maximum(tl.abs(new_min), tl.abs(new_max)), axis=0))
        meta_offsets = page * stride_mp + head * stride_mh + dims
        scalar_offset = page * stride_np + head
        old_min = tl.zeros([HEAD_DIM], dtype=tl.float32)  # the old box minimum, in units of the old scale
        old_scale = 0.0
        if slot != 0:  # the page already holds tokens: merge with its summary
            old_scale = tl.load(kscale_ptr + scalar_offset)
            old_min = tl.load(kmin_ptr + meta_offsets).to(tl.float32)
            new_min = tl.minimum(new_min, old_min * old_scale)
            new_max = tl.maximum(new_max, tl.load(kmax_ptr + meta_offsets).to(tl.float32) * old_scale)
            new_vnorm = tl.maximum(new_vnorm, tl.load(vnorm_ptr + scalar_offset))
            scale = tl.maximum(scale, old_scale)  # scales only grow: the old one covers the old keys
        inv_scale = tl.where(scale > 0, _power_of_two(tl.minimum(-_floor_log2(scale), 127)), 0.0)
        # Outward onto the grid: the values are then exact in e4m3, so the store does not round.
        box_min = _round_outward_to_e4m3(new_min * inv_scale, UP=False)
        box_max = _round_outward_to_e4m3(new_max * inv_scale, UP=True)
        tl.store(kmin_ptr + meta_offsets, box_min.to(kmin_ptr.dtype.element_ty))
        tl.store(kmax_ptr + meta_offsets, box_max.to(kmax_ptr.dtype.element_ty))
        if SKETCH:
            codes, exponent = _key_sketch(
                key_ptr, codes_ptr, exponent_ptr, token, slot, count, page, head, old_min, old_scale, box_min, scale,
                stride_kt, stride_kh, stride_cp, stride_ch, stride_gp, stride_gh, HEAD_DIM, PAGE_SIZE_POW2)
            slots = tl.arange(0, PAGE_SIZE_POW2)
            tl.store(codes_ptr + page * stride_cp + head * stride_ch + slots[:, None] * HEAD_DIM + dims[None, :],
                     codes.to(codes_ptr.dtype.element_ty), mask=(slots < PAGE_SIZE)[:, None])
            tl.store(exponent_ptr + page * stride_gp + head * stride_gh + dims,
                     exponent.to(exponent_ptr.dtype.element_ty))
        tl.store(kscale_ptr + scalar_offset, scale)
        tl.store(vnorm_ptr + scalar_offset, new_vnorm)
