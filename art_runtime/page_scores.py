"""Page scores from page metadata (Quest's upper bound, ART's mass estimate), on Triton or torch.

Used by the Quest policy and the Quest and mass visit orders of the dense policy. Reads only
the key boxes of ``PageMetadata``, never K or V.
"""

from __future__ import annotations

import torch
import triton

from .backend import tensor_core_dots, triton_runs_on
from .page_metadata import PageMetadata
from .plan import group_tile

# How a page's score comes from its key box: Quest's bound reduced over the GQA group by max
# or mean, or the estimated log-mass of mode ``mass`` summed over the group.
KEY_BOX_SCORES = ("max", "mean", "mass")
# Pages per program, head-dim slice and pipeline depth of the scoring kernel: the fastest of a
# sweep on an H100 with bf16 dots (benchmarks/NOTES.md, p5), the tile then doubled with fp16
# dots (an H200 sweep, p11).
SCORE_TILE = 128
SCORE_BLOCK_D = 64
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
    if group_reduce not in ("max", "mean"):
        raise ValueError(f"group_reduce must be 'max' or 'mean', got {group_reduce!r}")
    return key_box_scores(ctx, q, page_meta, width, group_reduce)


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
    return key_box_scores(ctx, q, page_meta, width, "mass", sm_scale)


def key_box_scores(ctx, q, page_meta, width: int, score: str, sm_scale: float | None = None) -> torch.Tensor:
    """``[B * H_kv, width]`` float32 page scores of kind ``score`` (one of ``KEY_BOX_SCORES``).

    ``sm_scale`` (the softmax scale) is needed by ``"mass"`` only.
    """
    _check(q, page_meta, score, sm_scale)
    if triton_runs_on(q.device):
        return _launch(ctx, q, page_meta, width, score, sm_scale)
    return _key_box_scores_torch(ctx, q, page_meta, width, score, sm_scale)


def _check(q, page_meta, score, sm_scale):
    if q is None or page_meta is None:
        raise ValueError("q and page_meta: scores from key boxes need the query and the page metadata")
    if score not in KEY_BOX_SCORES:
        raise ValueError(f"score must be one of {KEY_BOX_SCORES}, got {score!r}")
    if score == "mass" and sm_scale is None:
        raise ValueError("sm_scale: the mass estimate needs the softmax scale")


def _launch(ctx, q, page_meta, width, score, sm_scale):
    from .kernels.page_scoring import quest_page_scores_kernel

    scores = torch.empty(ctx.num_rows, width, dtype=torch.float32, device=q.device)
    if ctx.num_rows == 0 or width == 0:
        return scores
    group = ctx.num_qo_heads // ctx.num_kv_heads
    head_dim = q.shape[-1]
    quest_page_scores_kernel[(ctx.num_rows, triton.cdiv(width, SCORE_TILE))](
        q, page_meta.key_min, page_meta.key_max, page_meta.key_scale, ctx.kv_indptr, ctx.kv_indices, scores,
        width, q.stride(0), q.stride(1), page_meta.key_min.stride(0), page_meta.key_min.stride(1),
        page_meta.key_scale.stride(0), 1.0 if sm_scale is None else sm_scale,
        NUM_KV_HEADS=ctx.num_kv_heads, GROUP_SIZE=group, GROUP_PAD=group_tile(group),
        HEAD_DIM=head_dim, BLOCK_D=min(SCORE_BLOCK_D, head_dim), TILE=SCORE_TILE, REDUCE_MAX=score == "max",
        ESTIMATE=score == "mass", TENSOR_CORES=tensor_core_dots(q),
        num_warps=4, num_stages=SCORE_STAGES,
    )
    return scores


def _key_box_scores_torch(ctx, q, page_meta, width, score, sm_scale=None):
    positions = ctx.page_positions(width)  # [R, width], -1 past a row
    rows = torch.arange(ctx.num_rows, device=q.device)
    request, head = rows // ctx.num_kv_heads, rows % ctx.num_kv_heads
    phys = ctx.kv_indices[(ctx.kv_indptr[request].long()[:, None] + positions.clamp(min=0))].long()
    kmin, kmax = page_meta.key_bounds(phys, head[:, None])  # [R, width, D]
    group = ctx.num_qo_heads // ctx.num_kv_heads
    q_rows = q.float().view(ctx.batch_size, ctx.num_kv_heads, group, -1).flatten(0, 1)  # [R, G, D]
    if score == "mass":
        mean = torch.einsum("rgd,rwd->rgw", q_rows, (kmin + kmax) / 2)
        variance = torch.einsum("rgd,rwd->rgw", q_rows.square(), ((kmax - kmin) / 4).square())
        result = torch.logsumexp(mean * sm_scale + variance * (sm_scale * sm_scale / 2), dim=1)
    else:
        ub = torch.einsum("rgd,rwd->rgw", q_rows.clamp(min=0), kmax) + torch.einsum("rgd,rwd->rgw", q_rows.clamp(max=0), kmin)
        result = ub.amax(1) if score == "max" else ub.mean(1)
    return torch.where(positions >= 0, result, float("-inf"))
