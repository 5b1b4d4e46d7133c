"""H2O: heavy-hitter pages by accumulated attention mass, plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton

from .base import PagePolicy, PolicyContext, SelectionLayout, check_budget
from .registry import register
from .request_state import RequestSlots

# Mass below this is noise; a tie-break this small toward newer pages never overrides it.
RECENCY_TIE_BREAK = 1e-6
# Recent pages score above any mass (a page's mass is at most the GQA group size).
RECENT_SCORE = 1e6
# Pages per step of the state kernels (kernels/h2o_state.py), and selected pages compared at once.
STATE_TILE = 64
STATE_KEPT_TILE = 64


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


def launch_h2o_scores(ctx: PolicyContext, mass, evicted, slots, width: int, recent_pages: int) -> torch.Tensor:
    """``h2o_page_scores`` of every row by ``kernels/h2o_state.py``: ``[R, width]`` float32.

    ``mass`` and ``evicted``: ``[slots, H_kv, capacity]`` with ``slots`` ``[B]`` the batch's,
    or (``slots`` None) ``[pool pages, H_kv]`` indexed by physical page.
    """
    from art_runtime.kernels.h2o_state import h2o_page_scores_kernel

    scores = torch.empty(ctx.num_rows, width, dtype=torch.float32, device=mass.device)
    if ctx.num_rows and width:
        h2o_page_scores_kernel[(ctx.num_rows, triton.cdiv(width, STATE_TILE))](
            mass, evicted, ctx.kv_indptr if slots is None else slots, ctx.kv_indptr, ctx.kv_indices, scores, width,
            mass.stride(0), mass.stride(1), recent_pages, RECENCY_TIE_BREAK, RECENT_SCORE,
            NUM_KV_HEADS=ctx.num_kv_heads, TILE=STATE_TILE, PAGED=slots is None)
    return scores


def launch_h2o_observe(ctx: PolicyContext, layout: SelectionLayout, mass, evicted, slots, pages, page_mass) -> None:
    """H2O's state update by ``kernels/h2o_state.py`` (state as in ``launch_h2o_scores``)."""
    from art_runtime.kernels.h2o_state import h2o_observe_kernel

    if ctx.num_rows:
        h2o_observe_kernel[(ctx.num_rows,)](
            mass, evicted, ctx.kv_indptr if slots is None else slots, ctx.kv_indptr, ctx.kv_indices, layout.indptr,
            pages, page_mass.float(), mass.stride(0), mass.stride(1), NUM_KV_HEADS=ctx.num_kv_heads,
            TILE=STATE_TILE, KEPT_TILE=STATE_KEPT_TILE, PAGED=slots is None)


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

    The state is batched per layer, a slot per live request (``request_state.RequestSlots``;
    ``release`` gives the slot back), and scored and updated by two Triton kernels
    (``kernels/h2o_state.py``; torch on CPU tensors), so a batch costs the same launches
    whatever its size; only ``plan`` touches the host.

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
    # Per layer: accumulated mass (float32) and evicted (bool), [slots, H_kv, capacity].
    _state: RequestSlots = field(default_factory=lambda: RequestSlots(((torch.float32, 0.0), (torch.bool, False))),
                                 init=False, repr=False, compare=False)
    _pages: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # request_id -> its pages
    _batch_slots: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)  # [B] this plan's

    def __post_init__(self):
        check_budget("budget", self.budget)
        check_budget("recent_pages", self.recent_pages, minimum=1)
        if self.recent_pages >= self.budget:
            raise ValueError(f"recent_pages ({self.recent_pages}) must be below budget ({self.budget})")

    def budget_pages(self, ctx: PolicyContext) -> torch.Tensor:
        return torch.full_like(ctx.pages_per_row, self.budget)

    def layout(self, ctx: PolicyContext) -> SelectionLayout:
        """Also gives new requests a clean slot (host work, once per plan)."""
        self._batch_slots = self._state.batch(ctx.request_ids, ctx.batch_size, ctx.kv_indptr.device)
        self._pages.update(zip(ctx.request_ids, ctx.pages_per_request.tolist()))
        layout = super().layout(ctx)
        self._state.reserve(layout.width)
        return layout

    def _layer_state(self, ctx: PolicyContext, layer_id: int, width: int):
        return self._state.layer(layer_id, ctx.num_kv_heads, width, ctx.kv_indptr.device)

    def page_scores(self, ctx: PolicyContext, layer_id: int, q, page_meta, width: int,
                    kernel: bool | None = None) -> torch.Tensor:
        """``[R, width]`` scores from the state (``kernel``: Triton, default on CUDA; else torch)."""
        mass, evicted = self._layer_state(ctx, layer_id, width)
        slots = self._batch_slots
        if kernel if kernel is not None else slots.is_cuda:
            return launch_h2o_scores(ctx, mass, evicted, slots, width, self.recent_pages)
        positions = torch.arange(width, device=slots.device)
        scores = h2o_page_scores(mass[slots, :, :width], evicted[slots, :, :width], positions,
                                 ctx.pages_per_request[:, None, None], self.recent_pages)
        return scores.view(ctx.num_rows, width)

    def observe(self, ctx: PolicyContext, layout: SelectionLayout, layer_id: int, pages, page_mass,
                kernel: bool | None = None) -> None:
        """Add this step's page mass; evict every existing page the step did not select.

        ``kernel``: one Triton program per row (default on CUDA); else torch.
        """
        mass, evicted = self._layer_state(ctx, layer_id, layout.width)
        heads, width, slots = ctx.num_kv_heads, layout.width, self._batch_slots
        if kernel if kernel is not None else slots.is_cuda:
            launch_h2o_observe(ctx, layout, mass, evicted, slots, pages, page_mass)
            return
        request, head, columns = layout.row // heads, layout.row % heads, pages.long()
        mass.index_put_((slots[request], head, columns), page_mass.float(), accumulate=True)
        selected = torch.zeros(ctx.batch_size, heads, width, dtype=torch.bool, device=slots.device).index_put_(
            (request, head, columns), torch.ones_like(columns, dtype=torch.bool))  # values on the device: capturable
        existing = torch.arange(width, device=slots.device) < ctx.pages_per_request[:, None, None]
        evicted[slots, :, :width] = evicted[slots, :, :width] | (existing & ~selected)

    def request_state(self, request_id, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mass, evicted)`` of a live request at ``layer_id``: ``[H_kv, pages]`` views of the state."""
        if request_id not in self._state.slots or layer_id not in self._state.layers:
            raise ValueError(f"request_id, layer_id: no state for request {request_id!r} at layer {layer_id}")
        slot, pages = self._state.slots[request_id], self._pages[request_id]
        return tuple(quantity[slot, :, :pages] for quantity in self._state.layers[layer_id])

    def release(self, request_id) -> None:
        """Forget a finished request (every layer); its slot goes to the next new request."""
        self._state.release(request_id)
        self._pages.pop(request_id, None)
