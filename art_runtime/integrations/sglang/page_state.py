"""SnapKV and H2O for SGLang: their per-request state kept per physical page, in fixed buffers.

The library's ``SnapKVPolicy`` and ``H2OPolicy`` key their state by request id in Python
dicts, read on the host every step. SGLang's backend sees no request ids or lifetimes, and a
CUDA graph can read only fixed buffers. Both states are per (layer, page of a request, KV
head), and a physical page of SGLang's pool belongs to one request at a time (with the radix
cache off, which the hook requires for these policies), so here the state lives in one
``[layers, pool pages, H_kv]`` tensor per quantity, indexed by physical page: a few bytes per
page, head and layer next to the page's ``2 * page_size * head_dim`` K/V elements. A page's
state is reset when its first token is written (:meth:`reset_pages`, from every KV write), so
a page freed by one request and taken by another starts clean. Scores and updates are device
operations on these tensors (no host synchronization), so they run inside CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from art_runtime.policies import H2OPolicy, PagePolicy, PolicyContext, SnapKVPolicy
from art_runtime.policies.h2o import h2o_page_scores, launch_h2o_observe, launch_h2o_scores
from art_runtime.policies.snapkv import prompt_page_votes

NO_VOTE = -1.0  # SnapKV: a page without prompt votes (votes are >= 0)


def _page_ids(ctx: PolicyContext, width: int):
    """``[R, width]`` logical positions (-1 past a row's pages), physical pages (page 0's there), ``[R, 1]`` heads."""
    positions = ctx.page_positions(width)
    rows = torch.arange(ctx.num_rows, device=positions.device)
    first = ctx.kv_indptr[rows // ctx.num_kv_heads].long()
    phys = ctx.kv_indices[first[:, None] + positions.clamp(min=0)].long()
    return positions, phys, (rows % ctx.num_kv_heads)[:, None]


@dataclass
class PagedH2OPolicy(H2OPolicy):
    """``H2OPolicy`` with its accumulated mass and evictions per physical page (see the module).

    Build with :meth:`allocate`. Attributes ``mass`` (float32) and ``evicted`` (bool) are
    ``[layers, pool pages, H_kv]``.
    """

    stateful = False  # no request ids: the state is keyed by page
    layout = PagePolicy.layout  # no per-request slots
    STATE_BYTES_PER_PAGE: ClassVar[int] = 5  # per (layer, page, KV head): mass float32 + evicted bool
    mass: torch.Tensor | None = field(default=None, repr=False)
    evicted: torch.Tensor | None = field(default=None, repr=False)
    layer_offset: int = 0

    @classmethod
    def allocate(cls, policy: H2OPolicy, num_layers: int, num_pages: int, num_kv_heads: int, device,
                 layer_offset: int = 0) -> "PagedH2OPolicy":
        shape = (num_layers, num_pages, num_kv_heads)
        return cls(budget=policy.budget, recent_pages=policy.recent_pages,
                   mass=torch.zeros(shape, device=device), evicted=torch.zeros(shape, dtype=torch.bool, device=device),
                   layer_offset=layer_offset)

    def page_scores(self, ctx: PolicyContext, layer_id: int, q, page_meta, width: int) -> torch.Tensor:
        layer = layer_id - self.layer_offset
        if self.mass.is_cuda:  # kernels/h2o_state.py, the state indexed by physical page
            return launch_h2o_scores(ctx, self.mass[layer], self.evicted[layer], None, width, self.recent_pages)
        positions, phys, head = _page_ids(ctx, width)
        return h2o_page_scores(self.mass[layer][phys, head], self.evicted[layer][phys, head], positions,
                               ctx.pages_per_row[:, None], self.recent_pages)

    def observe(self, ctx: PolicyContext, layout, layer_id: int, pages, page_mass) -> None:
        """Add the step's page mass; evict every page of a row that the step did not select.

        Padding entries of ``layout`` (page 0 of the last row, no mass) add nothing.
        """
        layer = layer_id - self.layer_offset
        if self.mass.is_cuda:
            launch_h2o_observe(ctx, layout, self.mass[layer], self.evicted[layer], None, pages, page_mass)
            return
        heads = ctx.num_kv_heads
        pages = pages.long()
        phys = ctx.kv_indices[ctx.kv_indptr[layout.row // heads].long() + pages].long()
        self.mass[layer].index_put_((phys, layout.row % heads), page_mass.float(), accumulate=True)
        selected = torch.zeros(ctx.num_rows, layout.width, dtype=torch.bool, device=pages.device).index_put_(
            (layout.row, pages), torch.ones_like(pages, dtype=torch.bool))  # values on the device: capturable
        positions, all_phys, head = _page_ids(ctx, layout.width)
        head = head.expand_as(all_phys)
        evicted = self.evicted[layer]
        # Past a row's pages the entry is page 0's and its value unchanged (page 0 is always selected).
        evicted[all_phys, head] = evicted[all_phys, head] | ((positions >= 0) & ~selected)

    def reset_pages(self, layer_id: int, pages: torch.Tensor, is_new: torch.Tensor) -> None:
        """Clear the state of ``pages`` whose ``is_new`` is set (the same flag for every entry of a page)."""
        layer = layer_id - self.layer_offset
        keep = ~is_new[:, None]
        self.mass[layer][pages] = torch.where(keep, self.mass[layer][pages], 0.0)
        self.evicted[layer][pages] = self.evicted[layer][pages] & keep


@dataclass
class PagedSnapKVPolicy(SnapKVPolicy):
    """``SnapKVPolicy`` with its prompt votes per physical page (see the module).

    Build with :meth:`allocate`. Attribute ``votes``: ``[layers, pool pages, H_kv]`` float32,
    ``NO_VOTE`` for pages without prompt votes (the page holding the prompt's last token and
    every page written later), which score as decode pages, newest first, above every vote.
    """

    stateful = False
    layout = PagePolicy.layout  # no per-request slots
    STATE_BYTES_PER_PAGE: ClassVar[int] = 4  # per (layer, page, KV head): votes float32
    votes: torch.Tensor | None = field(default=None, repr=False)
    layer_offset: int = 0

    @classmethod
    def allocate(cls, policy: SnapKVPolicy, num_layers: int, num_pages: int, num_kv_heads: int, device,
                 layer_offset: int = 0) -> "PagedSnapKVPolicy":
        return cls(budget=policy.budget, window=policy.window, kernel_size=policy.kernel_size, pooling=policy.pooling,
                   votes=torch.full((num_layers, num_pages, num_kv_heads), NO_VOTE, device=device),
                   layer_offset=layer_offset)

    def page_scores(self, ctx: PolicyContext, layer_id: int, q, page_meta, width: int) -> torch.Tensor:
        positions, phys, head = _page_ids(ctx, width)
        vote = self.votes[layer_id - self.layer_offset][phys, head]
        group = ctx.num_qo_heads // ctx.num_kv_heads
        return torch.where(vote >= 0, vote, positions.float() + (self.window * group + 1.0))

    def vote(self, layer_id: int, queries: torch.Tensor, keys: torch.Tensor, prompt_pages: torch.Tensor,
             page_size: int, scale: float) -> None:
        """Record one request's prompt votes of one layer (at prefill, after its K/V are written).

        Parameters
        ----------
        queries : torch.Tensor
            ``[w, H_qo, D]`` the queries of the prompt's last ``w`` positions (``w`` up to
            ``window``: a prefill chunk shorter than the window votes with what it has).
        keys : torch.Tensor
            ``[n_prompt, H_kv, D]`` the prompt's keys so far.
        prompt_pages : torch.Tensor
            ``[ceil(n_prompt / P)]`` physical page of each logical page of the prompt.
        page_size : int
        scale : float
        """
        votes = prompt_page_votes(queries, keys, page_size, self.kernel_size, self.pooling, scale)  # [H_kv, pages]
        voted = (keys.shape[0] - 1) // page_size  # the pages before the one holding the prompt's last token
        self.votes[layer_id - self.layer_offset][prompt_pages[:voted].long()] = votes[:, :voted].T

    def reset_pages(self, layer_id: int, pages: torch.Tensor, is_new: torch.Tensor) -> None:
        layer = layer_id - self.layer_offset
        self.votes[layer][pages] = torch.where(is_new[:, None], NO_VOTE, self.votes[layer][pages])


_PAGED_FORMS = ((H2OPolicy, PagedH2OPolicy), (SnapKVPolicy, PagedSnapKVPolicy))


def state_bytes_per_page(policy) -> int:
    """Bytes of ``paged_policy(policy, ...)``'s buffers per (layer, pool page, KV head)."""
    return next((paged.STATE_BYTES_PER_PAGE for library, paged in _PAGED_FORMS if type(policy) is library), 0)


def paged_policy(policy, num_layers: int, num_pages: int, num_kv_heads: int, device, layer_offset: int = 0):
    """``policy`` itself, or for SnapKV and H2O their page-keyed form with its buffers allocated."""
    for library, paged in _PAGED_FORMS:
        if type(policy) is library:
            return paged.allocate(policy, num_layers, num_pages, num_kv_heads, device, layer_offset)
    return policy
