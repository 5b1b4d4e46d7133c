"""Triton kernels: H2O's page scores from its accumulated state, and the state's update.

The state of one layer is a tensor per quantity (float32 mass, bool evicted), either
``[slots, H_kv, capacity]`` with a slot per live request (``art_runtime.policies.h2o``) or,
with ``PAGED``, ``[pool pages, H_kv]`` indexed by physical page (SGLang's CUDA-graph path,
``art_runtime.integrations.sglang.page_state``). Both kernels take one program per
(request, KV head) row: in torch the same work was about ten small operations over
``[B, H_kv, pages]`` per layer and call, which cost more than the selection itself.
"""

import triton
import triton.language as tl


@triton.jit
def _state_at(slots_ptr, kv_indices_ptr, first_page, request, head, pos, ok, stride_ms, stride_mh,
              PAGED: tl.constexpr):
    """Offsets of the state entries of one row's logical pages ``pos``."""
    if PAGED:
        phys = tl.load(kv_indices_ptr + first_page + pos, mask=ok, other=0).to(tl.int64)
        offsets = phys * stride_ms + head * stride_mh
    else:
        offsets = tl.load(slots_ptr + request).to(tl.int64) * stride_ms + head * stride_mh + pos
    return offsets


@triton.jit
def h2o_page_scores_kernel(
    mass_ptr, evicted_ptr,    # [slots, H_kv, capacity] float32 / bool
    slots_ptr,                # [B] int64: each request's slot (unless PAGED)
    kv_indptr_ptr, kv_indices_ptr,  # the page table (int32)
    scores_ptr,               # out: [R, width] float32 (-inf past a row's pages)
    width, stride_ms, stride_mh, recent_pages, tie_break, recent_score,
    NUM_KV_HEADS: tl.constexpr, TILE: tl.constexpr, PAGED: tl.constexpr,
):
    """``art_runtime.policies.h2o.h2o_page_scores`` for one tile of one row's pages."""
    row = tl.program_id(0)
    request = row // NUM_KV_HEADS
    head = row % NUM_KV_HEADS
    first_page = tl.load(kv_indptr_ptr + request)
    num_pages = tl.load(kv_indptr_ptr + request + 1) - first_page
    pos = tl.program_id(1) * TILE + tl.arange(0, TILE)
    ok = pos < num_pages
    state = _state_at(slots_ptr, kv_indices_ptr, first_page, request, head, pos, ok, stride_ms, stride_mh, PAGED)
    mass = tl.load(mass_ptr + state, mask=ok, other=0.0)
    evicted = tl.load(evicted_ptr + state, mask=ok, other=0).to(tl.int1)
    position = pos.to(tl.float32)
    score = mass + tl.math.div_rn(tie_break * position, num_pages.to(tl.float32))  # torch's rounding
    score = tl.where(evicted, float("-inf"), score)
    score = tl.where(pos >= num_pages - recent_pages, recent_score + position, score)
    tl.store(scores_ptr + row * width + pos, tl.where(ok, score, float("-inf")), mask=pos < width)


@triton.jit
def h2o_observe_kernel(
    mass_ptr, evicted_ptr,    # the state (see the module), updated in place
    slots_ptr,                # [B] int64 (unless PAGED)
    kv_indptr_ptr, kv_indices_ptr,  # the page table (int32)
    sel_indptr_ptr,           # [R + 1] int32 selection row pointers
    pages_ptr,                # [nnz] int32 the step's selected logical pages
    page_mass_ptr,            # [nnz] float32 the softmax mass each received
    stride_ms, stride_mh,
    NUM_KV_HEADS: tl.constexpr, TILE: tl.constexpr, KEPT_TILE: tl.constexpr, PAGED: tl.constexpr,
):
    """Add the step's mass to the selected pages; evict every other page of the row for good."""
    row = tl.program_id(0)
    request = row // NUM_KV_HEADS
    head = row % NUM_KV_HEADS
    first_page = tl.load(kv_indptr_ptr + request)
    num_pages = tl.load(kv_indptr_ptr + request + 1) - first_page
    start = tl.load(sel_indptr_ptr + row)
    kept = tl.load(sel_indptr_ptr + row + 1) - start
    k = tl.arange(0, KEPT_TILE)
    for k0 in range(0, kept, KEPT_TILE):  # a row's pages are distinct: no two entries add to one
        k_ok = k0 + k < kept
        page = tl.load(pages_ptr + start + k0 + k, mask=k_ok, other=0)
        state = _state_at(slots_ptr, kv_indices_ptr, first_page, request, head, page, k_ok, stride_ms, stride_mh,
                          PAGED)
        mass = tl.load(mass_ptr + state, mask=k_ok, other=0.0)
        tl.store(mass_ptr + state, mass + tl.load(page_mass_ptr + start + k0 + k, mask=k_ok, other=0.0), mask=k_ok)
    for p0 in range(0, num_pages, TILE):
        pos = p0 + tl.arange(0, TILE)
        ok = pos < num_pages
        selected = tl.zeros([TILE], tl.int32)
        for k0 in range(0, kept, KEPT_TILE):
            page = tl.load(pages_ptr + start + k0 + k, mask=k0 + k < kept, other=-1)
            selected = tl.maximum(selected, tl.max((page[None, :] == pos[:, None]).to(tl.int32), 1))
        state = _state_at(slots_ptr, kv_indices_ptr, first_page, request, head, pos, ok, stride_ms, stride_mh, PAGED)
        evicted = tl.load(evicted_ptr + state, mask=ok, other=0).to(tl.int1)
        tl.store(evicted_ptr + state, evicted | (selected == 0), mask=ok)
