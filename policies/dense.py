"""Dense: every page, in a chosen visit order."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .base import PagePolicy, PolicyContext
from .registry import register

ORDERS = ("auto", "mass", "quest", "recency")
# What order "auto" visits in, per termination mode (every other mode: "mass"). The stability
# rule cannot see unread pages, and Quest's bound puts pages with outlying keys (a needle's)
# first: in the mass order the stability rule at its defaults lost the 1.5K-token passkey of
# tests/test_transformers.py that Quest order keeps (benchmarks/results/dense_order_2026-11-28/).
AUTO_ORDER = {"stability": "quest"}


@register
@dataclass
class DensePolicy(PagePolicy):
    """Every page of every request; only the visit order is chosen.

    Parameters
    ----------
    order : {"auto", "mass", "quest", "recency"}
        ``mass``: sink, current page, then by the estimated softmax mass of the page summed over
        the GQA group (the estimate of termination mode ``mass``, from the key boxes), most
        first. ``quest``: sink, current page, then by the Quest upper bound of the page's
        logits (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
        Inference"), highest first. ``recency``: sink, current page, then newest to oldest.
        ``auto`` (default): the order measured best for the plan's termination mode
        (:meth:`for_mode`): ``quest`` for ``stability``, ``mass`` for every other mode.

    Why (``benchmarks/results/dense_order_2026-11-28/``): on real attention every termination
    mode stops earlier in the mass order than in Quest order. Simulated on the shared and
    fresh captures (Qwen2.5-0.5B at 16K, SmolLM2-135M at 8K, 8 layers): mode ``mass`` at
    eps 0.05 reads 13.6-59.2% of the bytes against 19.8-79.6%; ``bound`` (values, eps 0.05)
    38.2-75.1% against 39.5-87.5%; on the shared captures ``stability`` (patience 4) 24-58%
    of the pages against 28-68%, with a smaller p99 error; even the hindsight optimum (every
    head of the group within 1%) needs 17.5-75.3% of the pages against 29.8-86.5%. At task
    level (SmolLM2 1K-8K, Qwen2.5-Coder 4K-8K) mode ``mass`` at its default eps reads 8-11
    points fewer pages in the mass order, every answer as dense's. But the stability rule,
    which cannot see unread pages, lost a 1.5K-token passkey in the mass order (at patience 2
    and 4) that Quest order, which reads pages with outlying keys first, keeps; modes ``mass``
    and ``bound`` kept it in both orders. On an H100 at batch 64 (the captures tiled) the
    default mode reads 7.1-77.4% of the pages against 10.6-82.8%, 0.6-24% faster; the mass
    order's scoring costs 2.4-3.9 µs a layer more than Quest's, and ``bound`` is 4-5% slower
    on Qwen's layers (its sketch pass starts earlier) while reading fewer bytes.
    ``plan(policy=None)`` stays a recency-ordered dense selection, which needs neither the
    query nor page metadata. In termination mode ``off`` the wrapper plans this policy as
    ``policy=None``: every page is read, so the order would only cost its scoring and sort.
    """

    name = "dense"
    order: str = "auto"

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")

    @property
    def per_layer(self) -> bool:  # the Quest and mass orders depend on the query
        return self.order != "recency"

    def for_mode(self, mode: str) -> "DensePolicy":
        """This policy with ``auto`` replaced by its order for termination ``mode``."""
        return replace(self, order=AUTO_ORDER.get(mode, "mass")) if self.order == "auto" else self

    def key_box_score(self) -> str | None:  # "auto" unresolved (no plan): the mass order
        return {"quest": "max", "mass": "mass", "auto": "mass"}.get(self.order)

    def page_scores(self, ctx: PolicyContext, layer_id: int, q, page_meta, width: int) -> torch.Tensor:
        if self.order == "recency":
            return ctx.page_positions(width).float()
        return super().page_scores(ctx, layer_id, q, page_meta, width)
