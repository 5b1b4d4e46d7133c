"""Quest: query-aware page selection from per-page key boxes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import PagePolicy, PolicyContext, check_budget
from .registry import register


@register
@dataclass
class QuestPolicy(PagePolicy):
    """Per KV head, keep the ``budget`` pages with the highest Quest bound, visited in that order.

    Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference".
    A page's score is the upper bound of ``q . k`` over its tokens from its key box (min and
    max per dimension, ``PageMetadata``), so scoring reads metadata only. With GQA, the query
    heads sharing a KV head share one selection; ``group_reduce="max"`` (default) keeps a page
    if any of them may need it, which is the only reduction that keeps Quest's per-head
    guarantee for every head (a page whose bound is high for one head is never dropped
    because the others' bounds are low); ``"mean"`` is offered for comparison.

    Parameters
    ----------
    budget : int
        Pages kept per (request, KV head), the sink and current pages included (>= 2).
    token_budget : int or None
        Alternatively, a budget in tokens: ``ceil(token_budget / page_size)`` pages.
    group_reduce : {"max", "mean"}
    """

    name = "quest"
    per_layer = True
    budget: int | None = 64
    token_budget: int | None = None
    group_reduce: str = "max"

    def __post_init__(self):
        if self.token_budget is not None:
            check_budget("token_budget", self.token_budget, minimum=1)
            self.budget = None
        else:
            check_budget("budget", self.budget)
        if self.group_reduce not in ("max", "mean"):
            raise ValueError(f"group_reduce must be 'max' or 'mean', got {self.group_reduce!r}")

    def budget_pages(self, ctx: PolicyContext) -> torch.Tensor:
        pages = self.budget if self.token_budget is None else max(2, math.ceil(self.token_budget / ctx.page_size))
        return torch.full_like(ctx.pages_per_row, pages)

    def key_box_score(self) -> str:
        return self.group_reduce
