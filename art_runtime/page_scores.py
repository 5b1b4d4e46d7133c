"""Page scores from page metadata (Quest's upper bound), on Triton or torch.

Used by the Quest policy and the Quest visit order of the dense policy. Reads only the key
boxes of ``PageMetadata``, never K or V.
"""

from __future__ import annotations

import torch
import triton

from .backend import triton_interpreter_enabled, triton_runs_on
from .page_metadata import PageMetadata
from .plan import group_tile

GROUP_REDUCTIONS = ("max", "mean")
SCORE_TILE = 32


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
    if q is None or page_meta is None:
        raise ValueError("q and page_meta: Quest scores need the query and the page metadata")
    if group_reduce not in GROUP_REDUCTIONS:
        raise ValueError(f"group_reduce must be one of {GROUP_REDUCTIONS}, got {group_reduce!r}")
    group = ctx.num_qo_heads // ctx.num_kv_heads
    head_dim = q.shape[-1]
    scores = torch.empty(ctx.num_rows, width, dtype=torch.float32, device=q.device)
    if ctx.num_rows == 0 or width == 0:
        return scores
    if triton_runs_on(q.device):
        from .kernels.page_scoring import quest_page_scores_kernel

        grid = (ctx.num_rows, triton.cdiv(width, SCORE_TILE))
        quest_page_scores_kernel[grid](
            q, page_meta.key_min, page_meta.key_max, ctx.kv_indptr, ctx.kv_indices, scores,
            width, q.stride(0), q.stride(1), page_meta.key_min.stride(0), page_meta.key_min.stride(1),
            NUM_KV_HEADS=ctx.num_kv_heads, GROUP_SIZE=group, GROUP_PAD=group_tile(group),
            HEAD_DIM=head_dim, TILE=SCORE_TILE, REDUCE_MAX=group_reduce == "max",
            DOT_IN_INPUT_DTYPE=page_meta.key_min.dtype != torch.float32 and not triton_interpreter_enabled(),
        )
        return scores
    return _quest_page_scores_torch(ctx, q, page_meta, width, group, group_reduce)


def _quest_page_scores_torch(ctx, q, page_meta, width, group, group_reduce):
    positions = ctx.page_positions(width)  # [R, width], -1 past a row
    rows = torch.arange(ctx.num_rows, device=q.device)
    request, head = rows // ctx.num_kv_heads, rows % ctx.num_kv_heads
    phys = ctx.kv_indices[(ctx.kv_indptr[request].long()[:, None] + positions.clamp(min=0))].long()
    kmin = page_meta.key_min[phys, head[:, None]].float()  # [R, width, D]
    kmax = page_meta.key_max[phys, head[:, None]].float()
    q_rows = q.float().view(ctx.batch_size, ctx.num_kv_heads, group, -1).flatten(0, 1)  # [R, G, D]
    ub = torch.einsum("rgd,rwd->rgw", q_rows.clamp(min=0), kmax) + torch.einsum("rgd,rwd->rgw", q_rows.clamp(max=0), kmin)
    score = ub.amax(1) if group_reduce == "max" else ub.mean(1)
    return torch.where(positions >= 0, score, float("-inf"))
