"""Page selections: which logical pages each (request, KV head) visits, in which order.

A selection is CSR over ``B * H_kv`` rows (row ``b * H_kv + h``): ``indptr [B*H_kv + 1]`` and
``pages [nnz]``, logical page positions ``0 .. pages_of_request - 1`` in visit order. The
sink page (0) and the current, partial last page come first in every built-in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
