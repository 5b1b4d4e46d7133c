"""StreamingLLM: attention sinks plus a window of recent pages."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PagePolicy, PolicyContext, check_budget
from .registry import register


@register
@dataclass
class StreamingLLMPolicy(PagePolicy):
    """Keep the first ``sink_pages`` pages and the ``window_pages`` most recent ones.

    Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks". The window
    includes the current page; the budget is ``sink_pages + window_pages``. Visit order:
    sink, current page, the other sink pages, then the window newest to oldest.

    Parameters
    ----------
    sink_pages : int
        Pages kept from the start (>= 1: page 0 is the attention sink).
    window_pages : int
        Most recent pages kept (>= 1: the current page).
    """

    name = "streaming_llm"
    sink_pages: int = 1
    window_pages: int = 64

    def __post_init__(self):
        check_budget("sink_pages", self.sink_pages, minimum=1)
        check_budget("window_pages", self.window_pages, minimum=1)

    def budget_pages(self, ctx: PolicyContext) -> torch.Tensor:
        return torch.full_like(ctx.pages_per_row, self.sink_pages + self.window_pages)

    def page_scores(self, ctx: PolicyContext, layer_id: int, q, page_meta, width: int) -> torch.Tensor:
        positions = ctx.page_positions(width).float()
        # Sink pages above every window page, the window newest first; the rest never kept.
        in_window = positions >= (ctx.pages_per_row[:, None] - self.window_pages)
        in_sink = (positions >= 0) & (positions < self.sink_pages)
        return torch.where(in_sink, width + 1.0 - positions, torch.where(in_window, positions, float("-inf")))
