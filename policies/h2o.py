"""H2O: heavy-hitter pages by accumulated attention mass, plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import PagePolicy, PolicyContext, SelectionLayout, check_budget
from .registry import register

# Mass below this is noise; a tie-break this small toward newer pages never overrides it.
RECENCY_TIE_BREAK = 1e-6
# Recent pages score above any mass (a page's mass is at most the GQA group size).
RECENT_SCORE = 1e6


def h2o_page_scores(mass: torch.Tensor, evicted: torch.Tensor, positions: torch.Tensor, pages: torch.Tensor,
                    recent_pages: int) -> torch.Tensor:
    """H2O's page scores from the accumulated mass (same shapes in, float32 out).

    ``mass`` and ``evicted`` of each page, its logical ``positions`` and its request's
    ``pages`` (broadcastable): the mass plus a tie-break toward newer pages, ``-inf`` once
    evicted, and the ``recent_pages`` newest pages above any mass, newest first.
    """
    positions, pages = positions.float(), pages.float()
    score = mass + RECENCY_TIE_BREAK * positions / pages
    score = torch.where(evicted, float("-inf"), score)
    return torch.where(positions >= pages - recent_pages, RECENT_SCORE + positions, score)


@register
@dataclass
class H2OPolicy(PagePolicy):
    """Keep the pages that received the most attention so far, plus the most recent ones.

    Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
    Language Models", at page granularity. Per (request, layer, KV head) a page's score is the
    softmax mass it received in earlier decode steps, summed over the query heads of the
    group; the decode kernel records it as a by-product (``record_page_mass``), so no extra
    pass over K is made. As in H2O, eviction is final: a page left out of a step's selection
    is never selected again. The ``recent_pages`` newest pages are always kept. Mass
    accumulates from the first decode step; ties (no history yet) go to newer pages.

    Parameters
    ----------
    budget : int
        Pages kept per (request, KV head), the sink, current and recent pages included (>= 2).
    recent_pages : int
        Newest pages always kept (>= 1: the current page), at most ``budget - 1``.
    """

    name = "h2o"
    per_layer = True
    stateful = True
    needs_page_mass = True
    budget: int = 64
    recent_pages: int = 8
    # (request_id, layer_id) -> (accumulated mass [H_kv, pages], evicted [H_kv, pages])
    _state: dict = field(default_factory=dict, init=False, repr=False)
    _pages_per_request: list = field(default_factory=list, init=False, repr=False)  # this plan's, on the host

    def __post_init__(self):
        check_budget("budget", self.budget)
        check_budget("recent_pages", self.recent_pages, minimum=1)
        if self.recent_pages >= self.budget:
            raise ValueError(f"recent_pages ({self.recent_pages}) must be below budget ({self.budget})")

    def budget_pages(self, ctx: PolicyContext) -> torch.Tensor:
        return torch.full_like(ctx.pages_per_row, self.budget)

    def layout(self, ctx: PolicyContext) -> SelectionLayout:
        # Page counts on the host once per plan, so that run() never synchronizes.
        self._pages_per_request = ctx.pages_per_request.tolist()
        return super().layout(ctx)

    def _request_state(self, request_id, layer_id: int, pages: int, heads: int, device):
        """The request's state grown to ``pages`` pages (new pages: no mass, not evicted)."""
        mass, evicted = self._state.get((request_id, layer_id), (None, None))
        if mass is None or mass.shape[1] < pages:
            grown_mass = torch.zeros(heads, pages, device=device)
            grown_evicted = torch.zeros(heads, pages, dtype=torch.bool, device=device)
            if mass is not None:
                grown_mass[:, : mass.shape[1]] = mass
                grown_evicted[:, : evicted.shape[1]] = evicted
            mass, evicted = grown_mass, grown_evicted
            self._state[(request_id, layer_id)] = (mass, evicted)
        return mass, evicted

    def page_scores(self, ctx: PolicyContext, layer_id: int, q, page_meta, width: int) -> torch.Tensor:
        heads, device = ctx.num_kv_heads, ctx.kv_indptr.device
        scores = torch.full((ctx.num_rows, width), float("-inf"), device=device)
        for b, (request_id, pages) in enumerate(zip(ctx.request_ids, self._pages_per_request)):
            mass, evicted = self._request_state(request_id, layer_id, pages, heads, device)
            positions = torch.arange(pages, device=device)
            scores[b * heads:(b + 1) * heads, :pages] = h2o_page_scores(
                mass[:, :pages], evicted[:, :pages], positions, torch.tensor(pages, device=device), self.recent_pages)
        return scores

    def observe(self, ctx: PolicyContext, layout: SelectionLayout, layer_id: int, pages, page_mass) -> None:
        """Add this step's page mass; evict every existing page the step did not select."""
        heads, device, width = ctx.num_kv_heads, ctx.kv_indptr.device, layout.width
        rows, columns = layout.row, pages.long()
        step_mass = torch.zeros(ctx.num_rows, width, device=device).index_put_((rows, columns), page_mass, accumulate=True)
        selected = torch.zeros(ctx.num_rows, width, dtype=torch.bool, device=device).index_put_(
            (rows, columns), torch.ones_like(columns, dtype=torch.bool))
        for b, (request_id, count) in enumerate(zip(ctx.request_ids, self._pages_per_request)):
            mass, evicted = self._request_state(request_id, layer_id, count, heads, device)
            mass[:, :count] += step_mass[b * heads:(b + 1) * heads, :count]
            evicted[:, :count] |= ~selected[b * heads:(b + 1) * heads, :count]

    def release(self, request_id) -> None:
        """Forget a finished request (every layer)."""
        for key in [key for key in self._state if key[0] == request_id]:
            del self._state[key]
