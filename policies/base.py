"""The mechanics every page-selection policy shares.

A policy only scores pages: ``page_scores`` returns, per (request, KV head) row and logical
page, a number where higher means "keep, and visit earlier". The base class turns scores
into a selection: the sink page (0) first and the current page (the request's last) second,
both always kept, then the highest-scoring pages, ``budget`` pages in all, in score order.
Everything runs on the device with no host synchronization once the layout (how many pages
each row keeps) is fixed, which ``plan`` does once per decode step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

@dataclass
class PolicyContext:
    """What a policy may know about the batch of one decode step.

    Attributes
    ----------
    kv_indptr, kv_indices, kv_last_page_len : torch.Tensor
        The page table (int32, FlashInfer format).
    num_qo_heads, num_kv_heads, page_size : int
    request_ids : list or None
        One hashable id per request, for policies that keep state per request.
    sm_scale : float or None
        The softmax scale of the attention (None: ``1 / sqrt(head_dim)``), for scores in
        logit units.
    """

    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor
    num_qo_heads: int
    num_kv_heads: int
    page_size: int
    request_ids: list | None = None
    sm_scale: float | None = None

    @property
    def batch_size(self) -> int:
        return self.kv_last_page_len.numel()

    @property
    def num_rows(self) -> int:
        return self.batch_size * self.num_kv_heads

    @property
    def pages_per_request(self) -> torch.Tensor:
        """``[B]`` int64."""
        return (self.kv_indptr[1:] - self.kv_indptr[:-1]).long()

    @property
    def pages_per_row(self) -> torch.Tensor:
        """``[B * H_kv]`` int64."""
        return self.pages_per_request.repeat_interleave(self.num_kv_heads)

    def page_positions(self, width: int) -> torch.Tensor:
        """``[R, width]`` logical page positions, with positions past a row's pages at -1."""
        positions = torch.arange(width, device=self.kv_indptr.device).expand(self.num_rows, width)
        return torch.where(positions < self.pages_per_row[:, None], positions, -1)


@dataclass
class SelectionLayout:
    """How many pages each row keeps, fixed at plan time.

    Attributes
    ----------
    indptr : torch.Tensor
        ``[R + 1]`` int32 CSR row pointers of the selection.
    row : torch.Tensor
        ``[nnz]`` int64 row of each selected entry.
    rank : torch.Tensor
        ``[nnz]`` int64 its rank within the row (0 = visited first).
    width : int
        Pages of the longest row (the score matrices' width).
    kept : int
        The most pages any row keeps.
    keeps_all : bool
        Every row keeps every page of its request (the selection is an order only).
    """

    indptr: torch.Tensor
    row: torch.Tensor
    rank: torch.Tensor
    width: int
    kept: int
    keeps_all: bool = False


class PagePolicy:
    """Base class of page-selection policies (subclasses are small dataclasses).

    Subclasses set ``name``, implement ``page_scores`` and, if they keep fewer than all
    pages, ``budget_pages``. ``per_layer`` policies (scores from the query or from per-layer
    state) are re-scored in every ``run``; the others once per ``plan``.
    """

    name: ClassVar[str]
    per_layer: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
    needs_page_mass: ClassVar[bool] = False  # if True, ``observe`` gets the mass of every run

    def observe(self, ctx: PolicyContext, layout: SelectionLayout, layer_id: int, pages, page_mass) -> None:
        """Receive the softmax mass each selected page got in a run (``needs_page_mass`` policies).

        ``pages`` and ``page_mass`` are ``[nnz]`` aligned with ``layout`` (rows in CSR order).
        """
        raise NotImplementedError

    def key_box_score(self) -> str | None:
        """How ``page_scores`` comes from the key boxes alone, or None for other scores.

        One of ``art_runtime.page_scores.KEY_BOX_SCORES``: ``"max"`` / ``"mean"`` (Quest's
        bound reduced over the GQA group) or ``"mass"`` (the estimated log-mass). Such policies
        read every page's key box (counted in ``kv_bytes_read``); the base class scores them.
        """
        return None

    @property
    def reads_key_boxes(self) -> bool:
        return self.key_box_score() is not None

    def budget_pages(self, ctx: PolicyContext) -> torch.Tensor:
        """``[R]`` pages to keep per row (the forced pages included). Default: all."""
        return ctx.pages_per_row

    def page_scores(self, ctx: PolicyContext, layer_id: int, q, page_meta, width: int) -> torch.Tensor:
        """``[R, width]`` float32 scores of each row's logical pages; higher is kept first.

        ``width`` is the longest row's page count (given, so that no policy has to ask the
        device for it); entries past a row's pages are ignored.
        ``q`` (``[B, H_qo, D]``) and ``page_meta`` are given to ``per_layer`` policies.
        The default serves ``key_box_score`` policies.
        """
        from art_runtime.page_scores import key_box_scores

        score = self.key_box_score()
        if score is None:
            raise NotImplementedError
        return key_box_scores(ctx, q, page_meta, width, score, _sm_scale(ctx, q))

    def layout(self, ctx: PolicyContext) -> SelectionLayout:
        """How many pages each row keeps: ``min(budget, pages)``. May synchronize (plan time)."""
        pages = ctx.pages_per_row
        kept = torch.minimum(self.budget_pages(ctx).to(pages.device), pages)
        indptr = torch.zeros(kept.numel() + 1, dtype=torch.long, device=pages.device)
        indptr[1:] = kept.cumsum(0)
        nnz = int(indptr[-1])
        row = torch.arange(kept.numel(), device=pages.device).repeat_interleave(kept)
        rank = torch.arange(nnz, device=pages.device) - indptr[:-1][row]
        width = int(pages.max()) if pages.numel() else 0
        return SelectionLayout(indptr.to(torch.int32), row, rank, width, int(kept.max()) if kept.numel() else 0,
                               bool((kept == pages).all()))

    def select(self, ctx: PolicyContext, layout: SelectionLayout, layer_id: int = 0, q=None, page_meta=None,
               out=None):
        """``[nnz]`` int32 logical pages in visit order, laid out as ``layout``. No host sync.

        ``out`` (an ``art_runtime.selection.VisitBuffers``): write the pages, with their
        physical ids and token counts, into a decode plan's visit arrays instead.
        """
        from art_runtime.selection import order_pages

        scores = self.page_scores(ctx, layer_id, q, page_meta, layout.width).float()
        return order_pages(scores, ctx, layout, out=out)


def _sm_scale(ctx: PolicyContext, q) -> float | None:
    if ctx.sm_scale is not None or q is None:
        return ctx.sm_scale
    return q.shape[-1] ** -0.5


def check_budget(name: str, value, minimum: int = 2) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an int >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(
            f"{name} must be an int >= {minimum} (the sink and current pages are always kept), got {value!r}"
        )
