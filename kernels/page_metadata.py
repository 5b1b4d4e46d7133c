"""Triton kernel: keep per-page key boxes and value norms current on append.

One program per (appended token, KV head). Only the program of the *first* appended token
of each touched page does work: it reads that page's new tokens (at most ``page_size``,
contiguous in the append buffer), reduces them, and merges with the stored summary, or
overwrites it when the page starts fresh (slot 0). Pages of different requests are
disjoint, so no two programs write the same page: no atomics, deterministic, and nothing
of the cache is re-read.
"""

import triton
import triton.language as tl


@triton.jit
def page_metadata_update_kernel(
    key_ptr, value_ptr,            # [nnz, H_kv, D] appended keys / values
    batch_indices_ptr, positions_ptr,  # [nnz] int32
    append_indptr_ptr,             # [B + 1] int32: first appended token of each request
    kv_indices_ptr, kv_indptr_ptr,  # page table (int32)
    kmin_ptr, kmax_ptr, vnorm_ptr,  # [max_pages, H_kv, D], [max_pages, H_kv, D], [max_pages, H_kv]
    nnz,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_mp, stride_mh, stride_np,
    PAGE_SIZE: tl.constexpr, PAGE_SIZE_POW2: tl.constexpr, HEAD_DIM: tl.constexpr,
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
        meta_offsets = page * stride_mp + head * stride_mh + dims
        vnorm_offset = page * stride_np + head
        if slot != 0:  # the page already holds tokens: merge with its summary
            new_min = tl.minimum(new_min, tl.load(kmin_ptr + meta_offsets).to(tl.float32))
            new_max = tl.maximum(new_max, tl.load(kmax_ptr + meta_offsets).to(tl.float32))
            new_vnorm = tl.maximum(new_vnorm, tl.load(vnorm_ptr + vnorm_offset))
        tl.store(kmin_ptr + meta_offsets, new_min.to(kmin_ptr.dtype.element_ty))
        tl.store(kmax_ptr + meta_offsets, new_max.to(kmax_ptr.dtype.element_ty))
        tl.store(vnorm_ptr + vnorm_offset, new_vnorm)
