"""Page selections: which logical pages each (request, KV head) visits, in which order.

A selection is CSR over ``B * H_kv`` rows (row ``b * H_kv + h``): ``indptr [B*H_kv + 1]`` and
``pages [nnz]``, logical page positions ``0 .. pages_of_request - 1`` in visit order. The
sink page (0) and the current, partial last page come first in every built-in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backend import triton_runs_on

# Scores that place the forced pages first: the sink, then the current page.
SINK_SCORE = float("inf")
CURRENT_SCORE = torch.finfo(torch.float32).max
TOP_POLICY_SCORE = 3.4028232635611926e38  # the float32 below CURRENT_SCORE: policies' scores are clamped to it
# The selection kernel ranks at most this many pages in the kept-th page's value bin among
# themselves; a row with more narrows that bin by rounds over the scores' order keys first.
SELECTION_EDGE = 64


@dataclass
class PageSelection:
    """Ordered logical pages per (request, KV head).

    Attributes
    ----------
    indptr : torch.Tensor
        ``[B * H_kv + 1]`` int32 row pointers.
    pages : torch.Tensor
        ``[nnz]`` int32 logical page positions, in visit order within each row.
    """

    indptr: torch.Tensor
    pages: torch.Tensor


@dataclass
class VisitBuffers:
    """A decode plan's visit arrays, which a per-layer selection overwrites in place.

    Attributes
    ----------
    pages : torch.Tensor
        ``[capacity]`` int32 logical page of each selected entry, in visit order.
    phys : torch.Tensor
        ``[capacity]`` int32 its physical page id in the page table.
    tokens : torch.Tensor
        ``[capacity]`` int32 its token count: the page size, or the request's last-page length.
    slot : torch.Tensor or None
        ``[capacity]`` int32 where each row's ``k``-th entry goes (a permutation within each
        row: the plan's ``visit_slot``); ``None``: at position ``k`` of its row.

    ``capacity`` is at least the layout's entries; entries past ``layout.indptr[-1]`` (the
    padding of preallocated buffers) are left as they are.
    """

    pages: torch.Tensor
    phys: torch.Tensor
    tokens: torch.Tensor
    slot: torch.Tensor | None = None


def dense_selection(kv_indptr: torch.Tensor, num_kv_heads: int) -> PageSelection:
    """Every page of every request, in recency order: sink, current, then newest to oldest.

    Parameters
    ----------
    kv_indptr : torch.Tensor
        ``[B + 1]`` int32 page-table row pointers.
    num_kv_heads : int

    Returns
    -------
    PageSelection
        Rows ``b * H_kv + h`` hold ``0, n_b - 1, n_b - 2, ..., 1`` (``n_b`` pages of request b).
    """
    num_pages = (kv_indptr[1:] - kv_indptr[:-1]).long().repeat_interleave(num_kv_heads)  # [R]
    indptr = torch.zeros(num_pages.numel() + 1, dtype=torch.long, device=kv_indptr.device)
    indptr[1:] = num_pages.cumsum(0)
    rank = torch.arange(int(indptr[-1]), device=kv_indptr.device) - indptr[:-1].repeat_interleave(num_pages)
    pages_of_row = num_pages.repeat_interleave(num_pages)
    pages = torch.where(rank == 0, 0, pages_of_row - rank)
    return PageSelection(indptr=indptr.to(torch.int32), pages=pages.to(torch.int32))


def physical_pages(kv_indptr, kv_indices, kv_last_page_len, page_size, request, logical):
    """Physical page id and token count of logical pages ``logical`` of requests ``request``.

    Both ``[n]`` int32, gathered on the device with no synchronization.
    """
    request, logical = request.long(), logical.long()
    first = kv_indptr[request].long()
    phys = kv_indices[first + logical]
    is_last = logical == kv_indptr[request + 1].long() - first - 1
    tokens = torch.where(is_last, kv_last_page_len[request], page_size)
    return phys.to(torch.int32), tokens.to(torch.int32)


def selection_warps(width_pow2: int, keeps_all: bool) -> int:
    """Warps of the selection kernel for rows of up to ``width_pow2`` pages: 4 keys a thread when
    a row keeps every page (the kernel is then its sort: with 32-bit keys and these warps, on an
    H200 at batch 64, 13.0 -> 6.3 µs for Qwen2.5's 128 rows of 1021 pages, 6.0 -> 4.3 µs for
    SmolLM2's 192 of 509; a probe of 512 rows of 2048 pages 108 -> 41 µs; ``benchmarks/NOTES.md``
    p16), else 8 keys a thread at most (they stay in registers)."""
    return min(16, max(4, width_pow2 // (128 if keeps_all else 256)))


# Rows that keep every page sort on 32-bit keys up to 2^12 pages, so that their scores keep at
# least 11 mantissa bits (a relative 2^-11); wider rows sort on exact 64-bit keys.
DENSE_KEY32_MAX_POS_BITS = 12


def dense_keys_fit_32_bits(keeps_all: bool, width_pow2: int) -> bool:
    """Whether the selection sorts rows of ``width_pow2`` positions on 32-bit keys: rows that
    keep every page (``SelectionLayout.keeps_all``), up to ``2^DENSE_KEY32_MAX_POS_BITS``."""
    return keeps_all and (width_pow2 - 1).bit_length() <= DENSE_KEY32_MAX_POS_BITS


def dense_order_keys(ordered: torch.Tensor, positions: torch.Tensor, num_pages: torch.Tensor,
                     width_pow2: int) -> torch.Tensor:
    """Sort keys (descending) of rows that keep every page, as the selection kernel builds them
    in 32 bits (``dense_keys_fit_32_bits``; ``kernels/page_selection.dense_order_key``):
    the scores' order keys without their lowest ``log2(width_pow2)`` bits, then the position
    (ties to the lower one); the sink page first and the current page second.

    Scores whose order keys agree above those bits count as equal: within a relative
    ``2^(log2(width_pow2) - 23)`` of each other (2.4e-4 at 2048 pages), finer than any page
    score's own error; the half-width keys make the row's sort faster (``selection_warps``).
    """
    pos_bits = (width_pow2 - 1).bit_length()
    top = (1 << (31 - pos_bits)) - 1
    coarse = (ordered >> pos_bits).clamp(max=top - 2).to(torch.int64)
    coarse = torch.where(positions == 0, top, torch.where(positions == num_pages - 1, top - 1, coarse))
    return (coarse << pos_bits) | (width_pow2 - 1 - positions)


def order_pages(scores: torch.Tensor, ctx, layout, *, kernel: bool | None = None,
                out: VisitBuffers | None = None) -> torch.Tensor:
    """Turn page scores into the selection's visit order; no host synchronization.

    Each row keeps the sink page (0) first and the current page (the request's last) second,
    then its highest-scoring pages in score order (ties: the lower position first), as many
    as ``layout`` gives the row. When every row keeps all its pages (a dense order) scores
    closer than the 32-bit sort keys tell apart count as ties (``dense_order_keys``).

    Parameters
    ----------
    scores : torch.Tensor
        ``[R, width]`` float32, ``R = B * H_kv``; higher is kept and visited first.
    ctx : art_runtime.policies.PolicyContext
        The page table (``kv_indptr``, ``kv_indices``, ``kv_last_page_len``), ``num_kv_heads``
        and ``page_size``.
    layout : art_runtime.policies.base.SelectionLayout
        Kept pages per row (``indptr``), with each entry's ``row`` and ``rank``.
    kernel : bool or None
        Use the Triton kernel (default: on CUDA). On the CPU the torch path runs unless
        ``kernel=True`` (the Triton interpreter, for tests: its sort is slow there).
    out : VisitBuffers, optional
        Write the logical pages, and each entry's physical page and token count, into these
        buffers (a plan's visit arrays, each row's entries at ``out.slot`` if given) instead of
        a new tensor: the kernel does it in its one launch.

    Returns
    -------
    torch.Tensor
        ``[nnz]`` int32 logical pages, row by row in visit order (``out.pages`` if given).
    """
    nnz = layout.row.numel()
    if kernel is None:
        kernel = scores.is_cuda
    if kernel and not triton_runs_on(scores.device):
        raise ValueError("kernel=True needs CUDA or TRITON_INTERPRET=1")
    if out is not None and min(out.pages.numel(), out.phys.numel(), out.tokens.numel()) < nnz:
        raise ValueError(f"out: every buffer needs the layout's {nnz} entries")
    if out is not None and out.slot is not None and out.slot.numel() < nnz:
        raise ValueError(f"out.slot needs the layout's {nnz} entries")
    width_pow2 = max(16, 1 << (layout.width - 1).bit_length())  # the kernel's row tile
    if kernel:
        from .kernels.page_selection import select_top_pages_kernel

        pages = torch.empty(nnz, dtype=torch.int32, device=scores.device) if out is None else out.pages
        if nnz:
            if layout.width > 1 << 20:  # the selection kernel packs page counts in 20 bits
                raise ValueError(f"a request of {layout.width} pages: the selection kernel takes at most 2^20 pages")
            physical = (pages, pages, pages, pages) if out is None else (
                ctx.kv_indices, ctx.kv_last_page_len, out.phys, out.tokens)
            slot = out.slot if out is not None and out.slot is not None else None
            kept_pow2 = width_pow2 if layout.keeps_all else max(16, 1 << (layout.kept - 1).bit_length())
            # A row's kept pages and its edge bin are compacted through this scratch; a keep-all
            # row sorts in registers.
            keys = pages if layout.keeps_all else torch.empty(scores.shape[0] * (kept_pow2 + SELECTION_EDGE),
                                                               dtype=torch.int64, device=scores.device)
            select_top_pages_kernel[(scores.shape[0],)](
                scores, ctx.kv_indptr, layout.indptr, keys, pages,
                *physical, pages if slot is None else slot, scores.stride(0), ctx.page_size,
                NUM_KV_HEADS=ctx.num_kv_heads, WIDTH_POW2=width_pow2, KEPT_POW2=kept_pow2, EDGE=SELECTION_EDGE,
                KEEP_ALL=layout.keeps_all, PHYSICAL=out is not None, SLOTS=slot is not None,
                KEY32=dense_keys_fit_32_bits(layout.keeps_all, width_pow2), POS_BITS=(width_pow2 - 1).bit_length(),
                num_warps=selection_warps(width_pow2, layout.keeps_all),
            )
        return pages
    num_kv_heads = ctx.num_kv_heads
    num_pages = (ctx.kv_indptr[1:] - ctx.kv_indptr[:-1]).long().repeat_interleave(num_kv_heads)[:, None]
    positions = torch.arange(layout.width, device=scores.device)[None, :]
    scores = scores.clamp(max=TOP_POLICY_SCORE)
    scores = torch.where(positions == num_pages - 1, CURRENT_SCORE, scores)
    scores = torch.where(positions == 0, SINK_SCORE, scores)
    scores = torch.where(positions < num_pages, scores, float("-inf"))
    bits = scores.contiguous().view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # two's-complement order = float order
    if dense_keys_fit_32_bits(layout.keeps_all, width_pow2):
        keys = dense_order_keys(ordered, positions, num_pages, width_pow2)
    else:
        keys = (ordered.to(torch.int64) << 32) | (layout.width - 1 - positions)  # unique: ties to the lower position
    order = torch.sort(keys, dim=1, descending=True).indices
    pages = order[layout.row, layout.rank].to(torch.int32)
    if out is None:
        return pages
    real = torch.arange(nnz, device=pages.device) < layout.indptr[-1]  # not padding
    pages = torch.where(real, pages, 0)
    phys, tokens = physical_pages(ctx.kv_indptr, ctx.kv_indices, ctx.kv_last_page_len, ctx.page_size,
                                  layout.row // num_kv_heads, pages)
    dest = torch.arange(nnz, device=pages.device) if out.slot is None else out.slot[:nnz].long()
    for buffer, value in ((out.pages, pages), (out.phys, phys), (out.tokens, tokens)):
        buffer[dest] = torch.where(real, value, buffer[dest])  # a mask index would sync with the device
    return out.pages


def validate_selection(selection: PageSelection, pages_per_request: torch.Tensor, num_kv_heads: int) -> None:
    """Check a selection against the page table; ``ValueError`` naming ``selection`` if wrong.

    Every row needs at least one page, positions must lie in ``0 .. pages_of_request - 1``,
    and no page may appear twice in a row. Synchronizes with the device (plan time only).
    """
    num_rows = pages_per_request.numel() * num_kv_heads
    indptr, pages = selection.indptr, selection.pages
    for name, tensor in (("selection.indptr", indptr), ("selection.pages", pages)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int32 or tensor.dim() != 1:
            raise ValueError(f"{name} must be a 1-D torch.int32 tensor")
        if tensor.device != pages_per_request.device:
            raise ValueError(f"{name} must be on {pages_per_request.device}, got {tensor.device}")
    if indptr.numel() != num_rows + 1:
        raise ValueError(f"selection.indptr must have B * num_kv_heads + 1 = {num_rows + 1} entries, got {indptr.numel()}")
    if num_rows == 0:
        return
    lengths = (indptr[1:] - indptr[:-1]).long()
    if (int(indptr[0]) != 0 or bool((lengths < 1).any())):
        raise ValueError("selection.indptr must start at 0 and be strictly increasing (every row selects a page)")
    if int(indptr[-1]) > pages.numel():
        raise ValueError(f"selection.indptr[-1] = {int(indptr[-1])} exceeds len(selection.pages) = {pages.numel()}")
    nnz = int(indptr[-1])
    row_of = torch.arange(num_rows, device=pages.device).repeat_interleave(lengths)
    limit = pages_per_request.long().repeat_interleave(num_kv_heads)[row_of]
    pos = pages[:nnz].long()
    if bool(((pos < 0) | (pos >= limit)).any()):
        raise ValueError("selection.pages holds a page position out of range for its request")
    if torch.unique(row_of * int(limit.max()) + pos).numel() != nnz:
        raise ValueError("selection.pages lists a page twice in one row")
