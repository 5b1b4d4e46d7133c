"""SnapKV: pages chosen once per request from the prompt's observation-window votes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .base import PagePolicy, PolicyContext, SelectionLayout, check_budget
from .registry import register
from .request_state import RequestSlots

POOLINGS = ("max", "avg")


class _Prompt(NamedTuple):
    length: int
    page_size: int
    num_kv_heads: int


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@torch.no_grad()
def prompt_page_votes(queries: torch.Tensor, keys: torch.Tensor, page_size: int, kernel_size: int, pooling: str,
                      scale: float) -> torch.Tensor:
    """SnapKV's page votes of a prompt from its last queries (the observation window).

    Parameters
    ----------
    queries : torch.Tensor
        ``[window, H_qo, D]`` the queries of the prompt's last ``window`` positions.
    keys : torch.Tensor
        ``[n_prompt, H_kv, D]`` every key of the prompt (``n_prompt >= window``).
    page_size, kernel_size : int
    pooling : {"max", "avg"}
    scale : float
        Logit scale.

    Returns
    -------
    torch.Tensor
        ``[H_kv, ceil(n_prompt / page_size)]`` float32: each page's largest pooled vote (>= 0).
    """
    window, num_qo_heads, head_dim = queries.shape
    n_prompt, num_kv_heads = keys.shape[:2]
    group = num_qo_heads // num_kv_heads
    q = queries.float().view(window, num_kv_heads, group, head_dim)
    logits = torch.einsum("wkgd,nkd->kgwn", q, keys.float()) * scale  # [H_kv, G, window, n_prompt]
    query_pos = torch.arange(n_prompt - window, n_prompt, device=q.device)
    future = torch.arange(n_prompt, device=q.device)[None, :] > query_pos[:, None]  # [window, n_prompt]
    votes = logits.masked_fill_(future, float("-inf")).softmax(-1).sum((1, 2))  # [H_kv, n_prompt]
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    pooled = pool(votes[:, None], kernel_size, stride=1, padding=kernel_size // 2)[:, 0]
    prompt_pages = -(-n_prompt // page_size)
    pooled = F.pad(pooled, (0, prompt_pages * page_size - n_prompt), value=float("-inf"))
    return pooled.view(num_kv_heads, prompt_pages, page_size).amax(-1)


@register
@dataclass
class SnapKVPolicy(PagePolicy):
    """Keep, per KV head, the prompt pages that the prompt's last queries attend to most.

    Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation". At
    prefill (``prefill``, once per request and layer), each of the last ``window`` prompt
    queries (the observation window) votes for the prompt's tokens with its causal softmax
    attention; a token's vote is the sum over those queries. Choices:

    * GQA: the votes of the query heads sharing a KV head are summed, so the group shares one
      selection, chosen by the group's total attention.
    * The votes are pooled along the tokens (``kernel_size``, ``pooling``), as the paper does,
      so that the neighbours of a voted token are kept too; padded so that the length is
      kept (``avg`` divides by ``kernel_size`` at the edges too, like the paper's code).
    * A page's score is the largest pooled vote among its tokens, so one strongly voted token
      keeps its page. Scores are summed attention probabilities, in the same units across
      pages (and at most ``window * group``): no per-page normalization.
    * The votes are kept per layer in one tensor, a slot per live request
      (``request_state.RequestSlots``), so scoring a batch is one gather, whatever its size.
    * The selection is fixed after prefill: pages written during decoding (every page from
      the one holding the prompt's last token onward) score above every prompt page, newest
      first, so they are always kept and compete for the budget only among themselves. The
      base class puts the sink (page 0) and the current page first. The window's own pages
      are not forced (the paper keeps the window): they compete with their votes, which the
      causal diagonal makes large.

    Parameters
    ----------
    budget : int
        Pages kept per (request, KV head), the sink and current pages included (>= 2).
    window : int
        Observation window: the last ``window`` prompt queries vote (>= 1, <= prompt length).
    kernel_size : int
        Width of the 1-D pooling over token votes (odd, >= 1; 1: no pooling).
    pooling : {"max", "avg"}
    """

    name = "snapkv"
    stateful = True
    per_layer = True
    budget: int = 64
    window: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    # Per layer: each prompt page's vote, [slots, H_kv, capacity] float32 (request_state).
    _votes: RequestSlots = field(default_factory=lambda: RequestSlots(((torch.float32, -1.0),)),
                                 init=False, repr=False, compare=False)
    _prompts: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # request_id -> _Prompt
    _prefilled: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # request_id -> layers
    _batch_slots: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)  # [B] this plan's
    _voted_pages: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)  # [B, 1, 1]

    def __post_init__(self):
        check_budget("budget", self.budget)
        _check_positive_int("window", self.window)
        _check_positive_int("kernel_size", self.kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the pooling keeps the length), got {self.kernel_size}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    @torch.no_grad()
    def prefill(self, request_id, layer_id: int, queries: torch.Tensor, keys: torch.Tensor, page_size: int,
                sm_scale: float | None = None) -> None:
        """Score the prompt's pages of one layer from the observation window's attention.

        Parameters
        ----------
        request_id : hashable
            The id later passed in ``request_ids`` to ``plan``.
        layer_id : int
        queries : torch.Tensor
            ``[n_prompt, H_qo, D]`` the prompt's queries; only the last ``window`` rows are used.
        keys : torch.Tensor
            ``[n_prompt, H_kv, D]`` the prompt's keys, after RoPE (as stored in the cache).
        page_size : int
            Tokens per cache page.
        sm_scale : float, optional
            Logit scale; default ``1 / sqrt(D)``.

        Notes
        -----
        Builds the window's float32 logits, ``H_qo * window * n_prompt`` values (128 MiB for
        32 heads, a window of 32 and a 32K prompt), on the prompt's device.
        """
        for name, tensor in (("queries", queries), ("keys", keys)):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 or not tensor.is_floating_point():
                raise ValueError(f"{name} must be a 3-D floating-point tensor [n_prompt, heads, D]")
        n_prompt, num_qo_heads, head_dim = queries.shape
        num_kv_heads = keys.shape[1]
        if keys.shape[0] != n_prompt or keys.shape[2] != head_dim or keys.device != queries.device:
            raise ValueError(f"keys must be [n_prompt, H_kv, D] = [{n_prompt}, H_kv, {head_dim}] on {queries.device}, "
                             f"got {list(keys.shape)} on {keys.device}")
        if num_kv_heads == 0 or num_qo_heads % num_kv_heads:
            raise ValueError(f"queries' heads ({num_qo_heads}) must be a multiple of keys' heads ({num_kv_heads})")
        _check_positive_int("page_size", page_size)
        if self.window > n_prompt:
            raise ValueError(f"window ({self.window}) must not exceed the prompt length ({n_prompt})")
        scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"sm_scale must be a positive finite number, got {sm_scale!r}")

        prompt = _Prompt(n_prompt, page_size, num_kv_heads)
        if self._prompts.setdefault(request_id, prompt) != prompt:
            raise ValueError(f"request_id: {request_id!r} was prefilled with (prompt length, page_size, num_kv_heads) "
                             f"{self._prompts[request_id]}, now {prompt}")
        page_votes = prompt_page_votes(queries[-self.window:], keys, page_size, self.kernel_size, self.pooling, scale)
        slot = self._votes.assign(request_id)
        votes, = self._votes.layer(layer_id, num_kv_heads, page_votes.shape[1], queries.device)
        votes[slot, :, :page_votes.shape[1]] = page_votes
        self._prefilled.setdefault(request_id, set()).add(layer_id)

    def release(self, request_id) -> None:
        """Drop every layer's state of ``request_id`` (no-op if it has none)."""
        self._votes.release(request_id)
        self._prompts.pop(request_id, None)
        self._prefilled.pop(request_id, None)

    def budget_pages(self, ctx: PolicyContext) -> torch.Tensor:
        return torch.full_like(ctx.pages_per_row, self.budget)

    def layout(self, ctx: PolicyContext) -> SelectionLayout:
        """Also finds the batch's slots and voted pages (host work, once per plan)."""
        ids = ctx.request_ids
        RequestSlots.check_ids(ids, ctx.batch_size)
        for request_id in ids:
            prompt = self._prompts.get(request_id)
            if prompt is None:
                raise ValueError(f"request_ids: no prefill() state for request {request_id!r}")
            if (prompt.num_kv_heads, prompt.page_size) != (ctx.num_kv_heads, ctx.page_size):
                raise ValueError(
                    f"num_kv_heads, page_size: request {request_id!r} was prefilled with "
                    f"{(prompt.num_kv_heads, prompt.page_size)}, the batch has {(ctx.num_kv_heads, ctx.page_size)}"
                )
        device = ctx.kv_indptr.device
        self._batch_slots = self._votes.batch(ids, ctx.batch_size, device)
        # The pages before the one holding the prompt's last token carry votes.
        voted = [(self._prompts[request_id].length - 1) // ctx.page_size for request_id in ids]
        self._voted_pages = torch.tensor(voted, device=device)[:, None, None]
        layout = super().layout(ctx)
        self._votes.reserve(layout.width)
        return layout

    def page_scores(self, ctx: PolicyContext, layer_id: int, q, page_meta, width: int) -> torch.Tensor:
        """``[B * H_kv, width]`` float32: prompt pages by their votes, decode pages above them.

        Decode pages score ``window * group + 1 + position`` (a pooled vote is at most
        ``window * group``: each query head's attention sums to one), so newest first.
        """
        for request_id in ctx.request_ids or ():
            if layer_id not in self._prefilled.get(request_id, ()):
                raise ValueError(f"request_ids: no prefill() state for request {request_id!r} at layer {layer_id}")
        votes, = self._votes.layer(layer_id, ctx.num_kv_heads, width, ctx.kv_indptr.device)
        group = ctx.num_qo_heads // ctx.num_kv_heads
        positions = torch.arange(width, device=votes.device)
        decode = positions + (self.window * group + 1.0)
        scores = torch.where(positions < self._voted_pages, votes[self._batch_slots, :, :width], decode)
        return scores.view(ctx.num_rows, width)
