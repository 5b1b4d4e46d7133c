"""Page scores from page metadata (Quest's upper bound, ART's mass estimate), on Triton or torch.

Used by the Quest policy and the Quest and mass visit orders of the dense policy. Reads only
the key boxes of ``PageMetadata``, never K or V.
"""

from __future__ import annotations

import torch
import triton

from .backend import triton_interpreter_enabled, triton_runs_on
from .page_metadata import PageMetadata
from .plan import group_tile

GROUP_REDUCTIONS = ("max", "mean")
# Pages per program, head-dim slice and pipeline depth of the scoring kernel: the fastest of a
# sweep on an H100 (benchmarks/NOTES.md, p4).
SCORE_TILE = 64
SCORE_BLOCK_D = 32
SCORE_STAGES = 3


def quest_page_scores(ctx, q: torch.Tensor, page_meta: PageMetadata, width: int, group_reduce: str = "max"):
    """Upper bound of each page's logits, reduced over each GQA group.

    Parameters
    ----------
    ctx : art_runtime.policies.PolicyContext
        Page table and head counts.
    q : torch.Tensor
        ``[B, H_qo, D]``.
    page_meta : PageMetadata
        Key boxes of the cache's pages.
    width : int
        Columns of the result (the longest row's page count).
    group_reduce : {"max", "mean"}
        How the query heads of one KV head combine their bounds.

    Returns
    -------
    torch.Tensor
        ``[B * H_kv, width]`` float32 (``-inf`` past a row's pages), unscaled ``q . k`` units.
    """
    if group_reduce not in GROUP_REDUCTIONS:
        raise ValueError(f"group_reduce must be one of {GROUP_REDUCTIONS}, got {group_reduce!r}")
    return _page_scores(ctx, q, page_meta, width, group_reduce, sm_scale=None)


def estimated_page_log_mass(ctx, q: torch.Tensor, page_meta: PageMetadata, width: int, sm_scale: float):
    """Estimated natural-log softmax mass of each page (up to its token count), summed over each group.

    The estimate of mode ``mass`` (``art_runtime.termination``):
    ``log sum_g exp(s q_g.c + s^2 / 2 sum_d q_gd^2 (r_d / 2)^2)`` with ``c`` and ``r`` the
    page's box centre and half-width and ``s = sm_scale``.

    Returns
    -------
    torch.Tensor
        ``[B * H_kv, width]`` float32 (``-inf`` past a row's pages).
    """
    return _page_scores(ctx, q, page_meta, width, "logsumexp", sm_scale=sm_scale)


def _page_scores(ctx, q, page_meta, width, group_reduce, sm_scale):
    if q is None or page_meta is None:
        raise ValueError("q and page_meta: scores from key boxes need the query and the page metadata")
    group = ctx.num_qo_heads // ctx.num_kv_heads
    head_dim = q.shape[-1]
    scores = torch.empty(ctx.num_rows, width, dtype=torch.float32, device=q.device)
    if ctx.num_rows == 0 or width == 0:
        return scores
    estimate = sm_scale is not None
    if triton_runs_on(q.device):
        from .kernels.page_scoring import quest_page_scores_kernel

        grid = (ctx.num_rows, triton.cdiv(width, SCORE_TILE))
        quest_page_scores_kernel[grid](
            q, page_meta.key_min, page_meta.key_max, page_meta.key_scale, ctx.kv_indptr, ctx.kv_indices, scores,
            width, q.stride(0), q.stride(1), page_meta.key_min.stride(0), page_meta.key_min.stride(1),
            page_meta.key_scale.stride(0), sm_scale if estimate else 1.0,
            NUM_KV_HEADS=ctx.num_kv_heads, GROUP_SIZE=group, GROUP_PAD=group_tile(group),
            HEAD_DIM=head_dim, BLOCK_D=min(SCORE_BLOCK_D, head_dim), TILE=SCORE_TILE, REDUCE_MAX=group_reduce == "max",
            ESTIMATE=estimate, DOT_IN_INPUT_DTYPE=q.dtype != torch.float32 and not triton_interpreter_enabled(),
            num_warps=4, num_stages=SCORE_STAGES,
        )
        return scores
    return _page_scores_torch(ctx, q, page_meta, width, group, group_reduce, sm_scale)


def _page_scores_torch(ctx, q, page_meta, width, group, group_reduce, sm_scale=None):
    positions = ctx.page_positions(width)  # [R, width], -1 past a row
    rows = torch.arange(ctx.num_rows, device=q.device)
    request, head = rows // ctx.num_kv_heads, rows % ctx.num_kv_heads
    phys = ctx.kv_indices[(ctx.kv_indptr[request].long()[:, None] + positions.clamp(min=0))].long()
    kmin, kmax = page_meta.key_bounds(phys, head[:, None])  # [R, width, D]
    q_rows = q.float().view(ctx.batch_size, ctx.num_kv_heads, group, -1).flatten(0, 1)  # [R, G, D]
    if group_reduce == "logsumexp":
        mean = torch.einsum("rgd,rwd->rgw", q_rows, (kmin + kmax) / 2)
        variance = torch.einsum("rgd,rwd->rgw", q_rows.square(), ((kmax - kmin) / 4).square())
        score = torch.logsumexp(mean * sm_scale + variance * (sm_scale * sm_scale / 2), dim=1)
    else:
        ub = torch.einsum("rgd,rwd->rgw", q_rows.clamp(min=0), kmax) + torch.einsum("rgd,rwd->rgw", q_rows.clamp(max=0), kmin)
        score = ub.amax(1) if group_reduce == "max" else ub.mean(1)
    return torch.where(positions >= 0, score, float("-inf"))
