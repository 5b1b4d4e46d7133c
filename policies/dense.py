"""Dense: every page, in a chosen visit order."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PagePolicy, PolicyContext
from .registry import register

ORDERS = ("recency", "quest", "mass")


@register
@dataclass
class DensePolicy(PagePolicy):
    """Every page of every request; only the visit order is chosen.

    Parameters
    ----------
    order : {"quest", "mass", "recency"}
        ``quest`` (default): sink, current page, then by the Quest upper bound of the page's
        logits (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
        Inference"), highest first, so that the pages most likely to hold attention mass are
        read before ART decides. ``mass``: sink, current page, then by the estimated softmax
        mass of the page summed over the GQA group (the estimate of termination mode
        ``mass``, from the same key boxes). ``recency``: sink, current page, then newest to
        oldest.

    Why ``quest`` is the default (``benchmarks/results/visit_order_2026-11-26.md``: the
    shared captures of Qwen2.5-0.5B at 16K and SmolLM2-135M at 8K, 16 queries per layer):
    the certified bound, then built on key boxes, stops only in Quest order (SmolLM2:
    93-98.5% of pages read at eps 0.05-0.1 on the values; Qwen: none saved; in recency order
    it reads every page of both; the key-sketch bound that replaced it:
    ``benchmarks/results/bound_sketch_2026-11-26/``); the paper's stability rule stops earlier in recency order (15-30% of pages
    against 17-43%) but with larger errors (max over heads relative to |o| up to 0.74 against
    0.44; 0.36 against 0.13 on SmolLM2 layer 15). ``plan(policy=None)`` stays a recency-
    ordered dense selection, which needs neither the query nor page metadata. In termination
    mode ``off`` the wrapper plans this policy as ``policy=None``: every page is read, so the
    order would only cost its scoring and sort.
    """

    name = "dense"
    order: str = "quest"

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")

    @property
    def per_layer(self) -> bool:  # the Quest and mass orders depend on the query
        return self.order != "recency"

    def key_box_score(self) -> str | None:
        return {"quest": "max", "mass": "mass"}.get(self.order)

    def page_scores(self, ctx: PolicyContext, layer_id: int, q, page_meta, width: int) -> torch.Tensor:
        if self.order == "recency":
            return ctx.page_positions(width).float()
        return super().page_scores(ctx, layer_id, q, page_meta, width)
