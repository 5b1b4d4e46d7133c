"""Dense: every page, in a chosen visit order."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PagePolicy, PolicyContext
from .registry import register

ORDERS = ("recency", "quest")


@register
@dataclass
class DensePolicy(PagePolicy):
    """Every page of every request; only the visit order is chosen.

    Parameters
    ----------
    order : {"recency", "quest"}
        ``recency``: sink, current page, then newest to oldest. ``quest``: sink, current page,
        then by the Quest upper bound of the page's logits (Tang et al. 2024, "Quest:
        Query-Aware Sparsity for Efficient Long-Context LLM Inference"), highest first, so
        that the pages most likely to hold attention mass are read before ART decides.
    """

    name = "dense"
    order: str = "recency"

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")

    @property
    def per_layer(self) -> bool:  # the Quest order depends on the query
        return self.order == "quest"

    def page_scores(self, ctx: PolicyContext, layer_id: int, q, page_meta) -> torch.Tensor:
        width = int(ctx.pages_per_row.max()) if ctx.num_rows else 0
        if self.order == "recency":
            return ctx.page_positions(width).float()
        from art_runtime.page_scores import quest_page_scores

        return quest_page_scores(ctx, q, page_meta, width)
