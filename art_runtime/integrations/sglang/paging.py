"""SGLang's token-level KV bookkeeping turned into ART's page tables, on the device.

SGLang (``--page-size P > 1``) keeps one K and one V buffer per layer, ``[num_slots, H_kv, D]``,
and allocates whole pages: the token at position ``p`` of a request lives in slot
``page * P + p % P``. Viewed as ``[num_slots // P, P, H_kv, D]`` the buffers are FlashInfer's
NHD page format with no copy, and a request's page ``j`` is the page of its token ``j * P``.
Nothing here synchronizes with the host given the sizes, so it can run while SGLang captures
CUDA graphs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from art_runtime.decode import tile_tokens
from art_runtime.plan import DecodePlan, kernel_block_pages
from art_runtime.selection import VisitBuffers, physical_pages
from art_runtime.termination import TerminationConfig


def paged_view(buffer: torch.Tensor, page_size: int) -> torch.Tensor:
    """``[num_slots, H, D]`` -> ``[num_slots // P, P, H, D]`` view (a trailing partial page is left out)."""
    num_pages = buffer.shape[0] // page_size
    return buffer[: num_pages * page_size].view(num_pages, page_size, *buffer.shape[1:])


def page_table(seq_lens, token_indptr, token_indices, page_size: int, capacity: int):
    """FlashInfer page table of a decode batch from SGLang's token-level CSR.

    Parameters
    ----------
    seq_lens : torch.Tensor
        ``[B]`` tokens per request (>= 1).
    token_indptr, token_indices : torch.Tensor
        ``[B + 1]`` and ``[>= sum(seq_lens)]``: slots of every request's tokens in order
        (``TritonAttnBackend.forward_metadata.kv_indptr / kv_indices``).
    page_size : int
    capacity : int
        Entries of ``kv_indices`` to produce, ``>= sum(ceil(seq_lens / P))``; the ones past
        the table hold page 0.

    Returns
    -------
    tuple of torch.Tensor
        ``kv_indptr [B + 1]``, ``kv_indices [capacity]``, ``kv_last_page_len [B]``, all int32.
    """
    seq_lens = seq_lens.long()
    pages = (seq_lens + page_size - 1) // page_size
    kv_indptr = torch.zeros(pages.numel() + 1, dtype=torch.long, device=seq_lens.device)
    torch.cumsum(pages, 0, out=kv_indptr[1:])
    entry = torch.arange(capacity, device=seq_lens.device)
    request = torch.searchsorted(kv_indptr[1:], entry, right=True).clamp_max(max(pages.numel() - 1, 0))
    valid = entry < kv_indptr[-1]
    token = token_indptr.long()[request] + (entry - kv_indptr[request]) * page_size
    slot = token_indices[torch.where(valid, token, 0)].long()
    kv_indices = torch.where(valid, slot // page_size, 0)
    last = seq_lens - (pages - 1) * page_size
    return kv_indptr.to(torch.int32), kv_indices.to(torch.int32), last.to(torch.int32)


def appended_page_table(out_cache_loc, first_position, num_new, page_size: int):
    """The arguments of ``PageMetadata.update`` for tokens SGLang just wrote.

    Parameters
    ----------
    out_cache_loc : torch.Tensor
        ``[n]`` physical slots of the new tokens, request by request, in position order.
    first_position : torch.Tensor
        ``[B]`` position of each request's first new token (its cached prefix length).
    num_new : torch.Tensor
        ``[B]`` new tokens per request (``sum = n``).
    page_size : int

    Returns
    -------
    tuple of torch.Tensor
        ``batch_indices [n]``, ``positions [n]`` (int32), and a page table over the touched
        pages only: ``kv_indices [n]`` (int32; entries past the touched pages unused) and
        ``kv_indptr [B + 1]`` (int32, shifted so that ``kv_indptr[b] + position // P`` lands
        on request ``b``'s page of ``position``; it may be negative).
    """
    n = out_cache_loc.numel()
    device = out_cache_loc.device
    num_new, first = num_new.long(), first_position.long()
    batch = num_new.numel()
    request = torch.repeat_interleave(torch.arange(batch, device=device), num_new, output_size=n)
    start = torch.cumsum(num_new, 0) - num_new
    positions = first[request] + torch.arange(n, device=device) - start[request]
    first_page = first // page_size
    touched = torch.where(num_new > 0, (first + num_new - 1) // page_size - first_page + 1, 0)
    base = torch.cumsum(touched, 0) - touched
    kv_indices = torch.zeros(n, dtype=torch.long, device=device)
    kv_indices[base[request] + positions // page_size - first_page[request]] = out_cache_loc.long() // page_size
    kv_indptr = torch.zeros(batch + 1, dtype=torch.long, device=device)
    kv_indptr[:batch] = base - first_page
    return request.to(torch.int32), positions.to(torch.int32), kv_indices.to(torch.int32), kv_indptr.to(torch.int32)


def fill_chunks(row_start: torch.Tensor, chunks: int, block_pages: int, min_pages: int,
                work_start: torch.Tensor, work_end: torch.Tensor) -> None:
    """Cut each row into ``chunks`` work items of like size, in place and without synchronizing.

    Parameters
    ----------
    row_start : torch.Tensor
        ``[R + 1]`` selection row pointers.
    chunks : int
        Work items per row: item ``r * chunks + k`` is row ``r``'s ``k``-th.
    block_pages, min_pages : int
        Every chunk is ``max(ceil(n / chunks), min_pages)`` pages for the longest row's ``n``,
        rounded up to whole blocks (the chunks ``BatchARTDecodeWrapper.plan`` cuts with that
        ``chunk_pages``); those past a shorter row's end are empty (start = end = its end).
    work_start, work_end : torch.Tensor
        ``[R * chunks]`` int32, written.
    """
    start, end = row_start[:-1].long(), row_start[1:].long()
    size = ((end - start).max() + chunks - 1) // chunks
    size = (torch.clamp(size, min=min_pages) + block_pages - 1) // block_pages * block_pages
    rank = torch.arange(chunks, device=row_start.device)
    first = torch.minimum(start[:, None] + rank[None, :] * size, end[:, None])
    work_start.copy_(first.flatten())
    work_end.copy_(torch.minimum(first + size, end[:, None]).flatten())


@dataclass
class StaticPlanBuffers:
    """Fixed buffers of a decode plan: a batch's page table, its selection, its visit order.

    Row ``r = b * H_kv + h`` keeps ``row_start[r + 1] - row_start[r]`` pages, its entries
    ``row_start[r] .. row_start[r + 1]`` of the ``capacity``-long arrays (``plan``: one work
    item per row; ``StaticPlanDecodeWrapper`` may cut rows into chunks, ``fill_chunks``).
    Every method fills these tensors in place with device operations of fixed shapes and never
    synchronizes with the host, so kernels captured in a CUDA graph read the batch filled
    before each replay. Entries past the batch's last row are padding (``valid``
    False, no page to read).

    Attributes
    ----------
    page_indptr, page_indices, last_page_len : torch.Tensor
        ``[B_max + 1]``, ``[table_capacity]``, ``[B_max]`` int32: the batch's FlashInfer page table.
    row_start : torch.Tensor
        ``[R_max + 1]`` int32 selection row pointers (``R_max = B_max * H_kv``).
    entry_row, entry_rank : torch.Tensor
        ``[capacity]`` int64: each entry's row and rank within the row (padding: the last row, 0).
    valid : torch.Tensor
        ``[capacity]`` bool.
    visit_pages, visit_phys, visit_tokens : torch.Tensor
        ``[capacity]`` int32: logical page, physical page and tokens of each entry, in visit order.
    work_row : torch.Tensor
        ``[R_max]`` int32 ``arange`` (work item ``r`` is row ``r``).
    selected : torch.Tensor
        ``[R_max]`` int32 pages kept per row.
    num_kv_heads : int
    width : int
        Pages of the longest request the buffers hold (policies' score width).
    kept : int
        Pages any row keeps at most.
    """

    page_indptr: torch.Tensor
    page_indices: torch.Tensor
    last_page_len: torch.Tensor
    row_start: torch.Tensor
    entry_row: torch.Tensor
    entry_rank: torch.Tensor
    valid: torch.Tensor
    visit_pages: torch.Tensor
    visit_phys: torch.Tensor
    visit_tokens: torch.Tensor
    work_row: torch.Tensor
    selected: torch.Tensor
    num_kv_heads: int
    width: int
    kept: int

    @classmethod
    def allocate(cls, max_batch: int, num_kv_heads: int, width: int, kept: int, device,
                 capacity: int | None = None, table_capacity: int | None = None) -> "StaticPlanBuffers":
        """Buffers for up to ``max_batch`` requests of up to ``width`` pages, ``kept`` visited per row.

        ``capacity`` (default ``max_batch * num_kv_heads * kept``) and ``table_capacity``
        (default ``max_batch * width``) may be given smaller when the batch is known.
        """
        rows = max_batch * num_kv_heads
        capacity = rows * kept if capacity is None else capacity
        table_capacity = max_batch * width if table_capacity is None else table_capacity

        def buffer(n, dtype=torch.int32):
            return torch.zeros(n, dtype=dtype, device=device)

        return cls(
            page_indptr=buffer(max_batch + 1), page_indices=buffer(table_capacity),
            last_page_len=torch.ones(max_batch, dtype=torch.int32, device=device),
            row_start=buffer(rows + 1), entry_row=buffer(capacity, torch.long), entry_rank=buffer(capacity, torch.long),
            valid=buffer(capacity, torch.bool), visit_pages=buffer(capacity), visit_phys=buffer(capacity),
            visit_tokens=buffer(capacity), work_row=torch.arange(rows, dtype=torch.int32, device=device),
            selected=buffer(rows), num_kv_heads=num_kv_heads, width=width, kept=kept,
        )

    @property
    def visits(self) -> VisitBuffers:
        """The visit arrays, for a per-layer selection to write in place."""
        return VisitBuffers(self.visit_pages, self.visit_phys, self.visit_tokens)

    @property
    def capacity(self) -> int:
        """Entries of the visit order (all rows together)."""
        return self.visit_phys.numel()

    @property
    def table_capacity(self) -> int:
        """Entries of the page table (all requests together)."""
        return self.page_indices.numel()

    def fill_page_table(self, kv_indptr, kv_indices, kv_last_page_len) -> None:
        """Copy a batch's page table in (``kv_indices`` at most ``table_capacity`` long)."""
        batch = kv_last_page_len.numel()
        self.page_indptr[: batch + 1].copy_(kv_indptr)
        self.page_indices[: kv_indices.numel()].copy_(kv_indices)
        self.last_page_len[:batch].copy_(kv_last_page_len)

    def fill_layout(self, kept_per_row: torch.Tensor) -> None:
        """Lay out ``[R]`` kept pages per row (``R = B * H_kv``, each >= 1)."""
        rows = kept_per_row.numel()
        kept = kept_per_row.long()
        self.selected[:rows].copy_(kept)
        row_start = torch.zeros(rows + 1, dtype=torch.long, device=kept.device)
        torch.cumsum(kept, 0, out=row_start[1:])
        self.row_start[: rows + 1].copy_(row_start)
        entry = torch.arange(self.capacity, device=kept.device)
        row = torch.searchsorted(row_start[1:], entry, right=True).clamp_max(rows - 1)
        valid = entry < row_start[-1]
        self.valid.copy_(valid)
        self.entry_row.copy_(row)
        self.entry_rank.copy_(torch.where(valid, entry - row_start[row], 0))
        for visit in (self.visit_pages, self.visit_phys, self.visit_tokens):
            visit.masked_fill_(~valid, 0)  # padding: a per-layer selection writes the real entries only

    def recency_pages(self) -> torch.Tensor:
        """``[capacity]`` the dense recency order: sink, current page, then newest to oldest."""
        count = self.selected[self.entry_row].long()
        rank = self.entry_rank
        return torch.where(rank == 0, 0, count - rank).to(torch.int32)

    def set_visits(self, pages: torch.Tensor, page_size: int) -> None:
        """Point the visit order at ``[capacity]`` logical ``pages`` (padding entries ignored)."""
        pages = torch.where(self.valid, pages.long(), 0)
        phys, tokens = physical_pages(self.page_indptr, self.page_indices, self.last_page_len, page_size,
                                      self.entry_row // self.num_kv_heads, pages)
        self.visit_pages.copy_(pages)
        self.visit_phys.copy_(torch.where(self.valid, phys, 0))
        self.visit_tokens.copy_(torch.where(self.valid, tokens, 0))

    def plan(self, batch: int, num_qo_heads: int, head_dim: int, page_size: int, termination: TerminationConfig,
             sm_scale: float, num_pages: int) -> DecodePlan:
        """The ``DecodePlan`` of a ``batch``-request step: views of these buffers."""
        rows = batch * self.num_kv_heads
        pages_per_block = kernel_block_pages(termination, page_size, tile_tokens(head_dim))
        return DecodePlan(
            batch_size=batch, num_qo_heads=num_qo_heads, num_kv_heads=self.num_kv_heads, head_dim=head_dim,
            page_size=page_size, block_pages=pages_per_block, termination=termination, sm_scale=sm_scale,
            max_page_index=num_pages - 1,
            row_start=self.row_start[: rows + 1],
            visit_phys=self.visit_phys, visit_tokens=self.visit_tokens, visit_row=self.entry_row,
            work_row=self.work_row[:rows],
            work_start=self.row_start[:rows], work_end=self.row_start[1: rows + 1],
            row_work_indptr=torch.arange(rows + 1, dtype=torch.int32, device=self.row_start.device),
            selected_pages=self.selected[:rows].view(batch, self.num_kv_heads),
            max_work_blocks=math.ceil(self.kept / pages_per_block),
        )
