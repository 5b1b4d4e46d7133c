"""The torch backend: ART decode's semantic oracle and its CPU execution path.

It follows the Triton kernel step for step (same blocks, same base-2 online softmax, same
termination checks), vectorized over every work item of the batch at once: the Python loop
runs over blocks of ``block_pages`` pages (64 tokens by default), never over pages or
requests, and ends as soon as every work item has stopped.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .kernels.page_bounds import ROUNDING_MARGIN as _KERNEL_ROUNDING_MARGIN
from .page_metadata import SKETCH_LEVELS, PageMetadata
from .plan import DecodePlan
from .termination import MASS_MAX_SHARE, MASS_PULL_CHECKS

LOG2E = math.log2(math.e)
# The kernel's logit margin (one definition for both backends) and the norm margin the
# wrapper passes to it.
ROUNDING_MARGIN = float(_KERNEL_ROUNDING_MARGIN.value)
VALUE_NORM_SCALE = 1.0 + 2.0**-16
# Base-2 slack on the suffix sums of mass bounds (upper: added; lower: subtracted): covers the
# fp32 rounding of the log-sum-exps and scans (relative errors far below 2^-14).
LOG2_SLACK = 2.0**-9
# Above this (base 2, relative to the running max) the mass-weighted error term counts as
# infinite instead of overflowing fp32.
OVERFLOW_LOG2 = 100.0
# bound: the pre-pass reads the key sketch only from the first visit position at which the
# mass estimate (mode mass's) puts every head's unread share at most this many times eps;
# before it the unread mass bound is infinite (only the trivial W / (L + W) <= 1 remains).
# Measured on the shared captures against 4 and 1/4 (benchmarks/results/bound_sketch_2026-11-26).
SKETCH_CUT_SHARE = 1.0


def _work_queries(plan: DecodePlan, q: torch.Tensor) -> torch.Tensor:
    """``[W, G, D]`` float32 queries of every work item's GQA group."""
    rows = plan.work_row.long()
    q_groups = q.float().view(plan.batch_size, plan.num_kv_heads, plan.group_size, plan.head_dim)
    return q_groups[rows // plan.num_kv_heads, rows % plan.num_kv_heads]


def _gather_block(plan, k_cache, v_cache, work, pos, end):
    """K/V of the block starting at positions ``pos`` of the given work items.

    Returns keys and values ``[n, block_pages * P, D]`` float32, a token mask
    ``[n, block_pages * P]`` and the pages read per item ``[n]``.
    """
    page_size = plan.page_size
    page_pos = pos[:, None] + torch.arange(plan.block_pages, device=pos.device)  # [n, bp]
    page_ok = page_pos < end[:, None]
    safe_pos = torch.where(page_ok, page_pos, 0)
    phys = plan.visit_phys.long()[safe_pos]
    tokens = torch.where(page_ok, plan.visit_tokens.long()[safe_pos], 0)
    heads = (plan.work_row.long()[work] % plan.num_kv_heads)[:, None].expand_as(phys)
    keys = k_cache[phys, :, heads]  # [n, bp, P, D] (k_cache is [pages, P, H, D])
    values = v_cache[phys, :, heads]
    token_ok = torch.arange(page_size, device=pos.device)[None, None, :] < tokens[:, :, None]
    n = work.numel()
    token_ok = token_ok.reshape(n, -1)
    # Slots past a page's tokens hold garbage (NaN included); zero them as the kernel's masked loads do.
    return (
        keys.reshape(n, -1, plan.head_dim).float().masked_fill(~token_ok[..., None], 0.0),
        values.reshape(n, -1, plan.head_dim).float().masked_fill(~token_ok[..., None], 0.0),
        token_ok,
        page_ok.sum(1),
    )


class BoundTerms(NamedTuple):
    """Suffix terms of every visit-order position: what the pre-pass (``page_bounds``) writes.

    ``log2_rest_mass [nnz, G]``: base-2 log of the unread mass bound (``bound``) or estimate
    (``mass``) of the positions ``>= p`` of p's work item, relative to no running max;
    ``value_rest [nnz]``: the largest value norm over them. ``bound`` only (else None):
    ``log2_rest_mass_low [nnz, G]``, a lower bound of the same mass, and
    ``log2_rest_value_mass [nnz, G]``, the bound of ``sum_j W_j Vmax_j``, and
    ``sketch_pages [W]``, the pages of each work item whose key sketch was read (before the
    cut the terms are infinite: no stop; see ``art_runtime.termination``), and
    ``visit_perm [nnz]``, the run's visit order (``tail_visit_order``): position ``p`` visits
    the plan's position ``visit_perm[p]``, and every term above is of that order.
    """

    log2_rest_mass: torch.Tensor
    value_rest: torch.Tensor
    log2_rest_mass_low: torch.Tensor | None = None
    log2_rest_value_mass: torch.Tensor | None = None
    sketch_pages: torch.Tensor | None = None
    visit_perm: torch.Tensor | None = None


def sketch_page_log2_mass(q_pos, codes, base, step, tokens, qk_scale):
    """Base-2 log bounds ``(upper, lower)`` ``[n, G]`` of pages' softmax mass from their key sketch.

    ``q_pos [n, G, D]`` float32 queries, ``codes [n, P, D]``, ``base``/``step`` ``[n, D]``
    the grid (``PageMetadata.sketch_grid``), ``tokens [n]``. Token ``t``'s logit ``q.k_t`` lies in
    ``y_t + A + [-N, P]`` with ``y_t = sum_d q_d s_d c_td``, ``A = sum_d q_d s_d b_d``,
    ``P``/``N`` the sums of ``q_d s_d`` over positive/negative ``q_d``; a relative margin
    covers the fp32 rounding of these sums and of the decode kernel's own dot product.
    """
    q_step = q_pos * step[:, None]
    y = torch.einsum("ngd,npd->ngp", q_step, codes.float())
    slot_ok = torch.arange(codes.shape[1], device=codes.device)[None, :] < tokens[:, None]
    y = torch.where(slot_ok[:, None], y * qk_scale, float("-inf"))
    offset = (q_step * base[:, None]).sum(-1)
    up = (q_step.clamp(min=0)).sum(-1)
    down = (q_step.clamp(max=0)).sum(-1)
    reach = torch.maximum(base.abs(), (base + SKETCH_LEVELS).abs()) * step  # largest |cell end| a dim
    margin = (q_pos.abs() * reach[:, None]).sum(-1) * ROUNDING_MARGIN
    lse = torch.logsumexp(y / LOG2E, dim=-1) * LOG2E
    return (offset + up + margin) * qk_scale + lse, (offset + down - margin) * qk_scale + lse


def _suffix_log2_sum(plan, x):
    """``[nnz, G]`` base-2 log of the sum of ``2^x`` over each position's suffix in its work item."""
    starts, ends = plan.work_start.long(), plan.work_end.long()
    width = int((ends - starts).max()) if plan.num_work else 0
    pos = ends[:, None] - 1 - torch.arange(width, device=x.device)[None, :]  # reversed [W, width]
    ok = pos >= starts[:, None]
    safe = torch.where(ok, pos, 0)
    x_rev = torch.where(ok[..., None], x[safe], float("-inf"))
    scan = torch.logcumsumexp(x_rev / LOG2E, dim=1) * LOG2E  # natural-log scan, back to base 2
    out = torch.empty_like(x)
    out[pos[ok]] = scan[ok]
    return out


def _suffix_max(plan, v):
    starts, ends = plan.work_start.long(), plan.work_end.long()
    width = int((ends - starts).max()) if plan.num_work else 0
    pos = ends[:, None] - 1 - torch.arange(width, device=v.device)[None, :]
    ok = pos >= starts[:, None]
    rest = torch.cummax(torch.where(ok, v[torch.where(ok, pos, 0)], 0.0), dim=1).values
    out = torch.empty_like(v)
    out[pos[ok]] = rest[ok]
    return out


def tail_start(plan: DecodePlan, sketch_pages: torch.Tensor) -> torch.Tensor:
    """``[W]`` each work item's first position that ``tail_visit_order`` may move: its cut
    (``end - sketch_pages``), but never before the row's first ``min_pages`` positions (the
    sink and current pages stay first)."""
    ends = plan.work_end.long()
    first_free = plan.row_start.long()[plan.work_row.long()] + plan.termination.min_pages
    return torch.maximum(ends - sketch_pages.long(), first_free).minimum(ends)


def tail_visit_order(plan: DecodePlan, key: torch.Tensor, tail_first: torch.Tensor) -> torch.Tensor:
    """The run's visit order in mode ``bound``: ``[nnz]`` int64, position ``p`` visits the plan's
    position ``perm[p]``.

    Each work item's positions from ``tail_first [W]`` on (its pages after the sketch cut,
    ``tail_start``) are visited by ``key [nnz]`` float32, largest first (ties: the earlier
    position first); every other position keeps its place. The key (``tail_key``) comes from
    the certified upper bounds of the pages' masses, which the pre-pass has for exactly those
    pages: the unread bound then falls fastest, at no extra bytes. One stable segmented sort
    of 32-bit keys, no host synchronization: the torch backend's order, and the oracle of the
    Triton backend's ``kernels/page_bounds.tail_order_kernel``.
    """
    starts, ends = plan.work_start.long(), plan.work_end.long()
    width = plan.max_work_blocks * plan.block_pages  # at least every work item's length
    offset = torch.arange(width, device=key.device)
    pos = starts[:, None] + offset
    valid = pos < ends[:, None]
    safe = torch.where(valid, pos, 0)
    # Stable and descending: before the tail (+inf) first and in place (a tail key of +inf
    # comes after them: it is later in the row); past the item's end (-inf, after every valid
    # position) last, unused.
    tail_keys = key.float()[safe]
    tail_keys = torch.where(tail_keys.isnan(), float("inf"), tail_keys)  # no bound known: early
    keys = torch.where(pos >= tail_first[:, None], tail_keys, float("inf"))
    keys = torch.where(valid, keys, float("-inf"))
    source = starts[:, None] + torch.sort(keys, dim=1, descending=True, stable=True).indices
    perm = torch.arange(plan.nnz + 1, device=key.device)  # the last entry takes the unused writes
    perm.scatter_(0, torch.where(valid, pos, plan.nnz).flatten(), source.flatten())
    return perm[: plan.nnz]


def tail_key(log2_upper: torch.Tensor, value_norm: torch.Tensor) -> torch.Tensor:
    """``[n]`` the sort key of ``tail_visit_order``: base-2 log of pages' bound of ``sum_g W_jg V_j``
    (the group's mass times the page's largest value norm, what each page adds to the bound's
    error term (b)), from the per-head upper mass bounds ``[n, G]`` (base 2) and ``V_j [n]``.
    Against the mass alone and shares of each head's estimated total, on the shared captures:
    all within half a point, this one the better on both Qwen layers
    (benchmarks/results/tail_order_2026-11-27)."""
    return torch.logsumexp(log2_upper / LOG2E, dim=-1) * LOG2E + torch.log2(value_norm)


def bound_terms_torch(plan: DecodePlan, q: torch.Tensor, page_meta: PageMetadata, chunk: int = 4096) -> BoundTerms:
    """The suffix terms of every visit-order position (what the ``kernels/page_bounds.py`` pre-pass writes).

    In ``bound`` mode each page's terms are its certified mass bounds from the key sketch
    (``sketch_page_log2_mass``); in ``mass`` mode its estimated log-mass from the key box
    (see ``art_runtime.termination``). ``chunk`` positions are bounded at a time.
    """
    qk_scale = plan.sm_scale * LOG2E
    phys = plan.visit_phys.long()
    head = plan.visit_row % plan.num_kv_heads
    q_groups = q.float().view(plan.batch_size, plan.num_kv_heads, plan.group_size, plan.head_dim)
    tokens = plan.visit_tokens.long()
    vnorm = page_meta.value_norm_max[phys, head] * VALUE_NORM_SCALE
    # The mass estimate from the key boxes: mode mass's criterion, and bound's sketch cut.
    kmin, kmax = page_meta.key_bounds(phys, head)  # [nnz, D]
    q_pos = q_groups[plan.visit_row // plan.num_kv_heads, head]  # [nnz, G, D]
    centre, spread = (kmin + kmax) / 2, (kmax - kmin) / 4
    logit = (q_pos * centre[:, None]).sum(-1) * qk_scale + \
        (q_pos.square() * spread.square()[:, None]).sum(-1) * (qk_scale * plan.sm_scale / 2)
    log2_tokens = torch.log2(tokens.float())[:, None]
    estimate = _suffix_log2_sum(plan, logit + log2_tokens)
    if plan.termination.mode == "mass":
        return BoundTerms(estimate, _suffix_max(plan, vnorm))

    # Cut: before the first position where every head's estimated unread share is at most
    # SKETCH_CUT_SHARE * eps the bound is infinite; only the pages from there on need their sketch.
    # Work items cover their [start, end) ranges of the visit order, not necessarily all of it
    # (a fixed-capacity plan, e.g. SGLang's CUDA-graph buffers, leaves gaps between rows).
    starts, ends = plan.work_start.long(), plan.work_end.long()
    positions = torch.arange(plan.nnz, device=q.device)
    work_of = torch.full((plan.nnz,), -1, dtype=torch.long, device=q.device)  # -1: a position no item covers
    width = int((ends - starts).max()) if plan.num_work else 0
    covered = starts[:, None] + torch.arange(width, device=q.device)[None, :]
    inside = covered < ends[:, None]
    work_of[covered[inside]] = torch.arange(plan.num_work, device=q.device)[:, None].expand_as(covered)[inside]
    item = work_of.clamp(min=0)
    threshold = estimate[starts] + math.log2(SKETCH_CUT_SHARE * plan.termination.eps) \
        if plan.termination.eps > 0 else torch.full_like(estimate[starts], float("-inf"))
    early = (work_of >= 0) & (estimate > threshold[item]).any(-1)
    cut = starts + torch.zeros_like(starts).index_add_(0, item, early.long())
    after_cut = (work_of >= 0) & (positions >= cut[item])
    sketched = after_cut.nonzero().squeeze(1)
    upper = torch.full((plan.nnz, plan.group_size), float("-inf"), device=q.device)
    lower = torch.full_like(upper, float("-inf"))
    for first in range(0, sketched.numel(), chunk):
        part = sketched[first: first + chunk]
        p, h = phys[part], head[part]
        upper[part], lower[part] = sketch_page_log2_mass(
            q_pos[part], page_meta.key_codes[p, h], *page_meta.sketch_grid(p, h), tokens[part], qk_scale)
    # The pages after the cut by their bound of the group's sum_g W_jg V_j, the page's share of
    # error term (b) (positions before the cut keep their place, so the masks below hold for
    # the permuted order too).
    sketch_pages = (ends - cut).to(torch.int32)
    perm = tail_visit_order(plan, tail_key(upper, vnorm), tail_start(plan, sketch_pages))
    upper, lower, vnorm = upper[perm], lower[perm], vnorm[perm]
    before_cut = ~after_cut[:, None]
    return BoundTerms(
        (_suffix_log2_sum(plan, upper) + LOG2_SLACK).masked_fill(before_cut, float("inf")), _suffix_max(plan, vnorm),
        (_suffix_log2_sum(plan, lower) - LOG2_SLACK).masked_fill(before_cut, float("-inf")),
        (_suffix_log2_sum(plan, upper + torch.log2(vnorm)[:, None]) + LOG2_SLACK).masked_fill(before_cut, float("inf")),
        sketch_pages, perm,
    )


def row_value_scale(plan: DecodePlan, value_rest: torch.Tensor) -> torch.Tensor:
    """``[R]`` the largest value norm over each row's selected pages."""
    scale = torch.zeros(plan.num_rows, dtype=torch.float32, device=value_rest.device)
    first = value_rest[plan.work_start.long()] if plan.num_work else value_rest[:0]
    return scale.scatter_reduce_(0, plan.work_row.long(), first, "amax")


def art_decode_torch(plan: DecodePlan, q, k_cache, v_cache, bound_terms=None, page_lse=None):
    """Run ART decode on the torch backend.

    Parameters
    ----------
    plan : DecodePlan
    q : torch.Tensor
        ``[B, H_qo, D]``.
    k_cache, v_cache : torch.Tensor
        ``[max_pages, P, H_kv, D]`` (NHD views; HND caches are passed transposed).
    bound_terms : BoundTerms or None
        ``bound_terms_torch``'s output, in ``bound`` and ``mass`` modes.
    page_lse : torch.Tensor or None
        ``[nnz, >= G]`` filled with -inf; if given, each visited page's
        ``log2 sum_tokens 2^s`` (base-2 logits) is written into it.

    Returns
    -------
    tuple
        ``(out [B, H_qo, D] float32, lse [B, H_qo] float32 base 2, visited_pages [W] int32,
        visited_tokens [W] int32, stable_at [W, G] int32)``.
    """
    term = plan.termination
    num_work, group, dim = plan.num_work, plan.group_size, plan.head_dim
    device = q.device
    qk_scale = plan.sm_scale * LOG2E
    queries = _work_queries(plan, q)  # [W, G, D]
    start, end = plan.work_start.long(), plan.work_end.long()
    first_block = (start - plan.row_start.long()[plan.work_row.long()]) // plan.block_pages

    m = torch.full((num_work, group), float("-inf"), device=device)
    l = torch.zeros(num_work, group, device=device)
    acc = torch.zeros(num_work, group, dim, device=device)
    prev_o = torch.zeros_like(acc)
    prev_norm = torch.zeros_like(l)
    streak = torch.zeros(num_work, group, dtype=torch.int32, device=device)
    stable_at = torch.full((num_work, group), -1, dtype=torch.int32, device=device)
    pos = start.clone()
    visited_tokens = torch.zeros(num_work, dtype=torch.long, device=device)
    active = pos < end
    if term.mode == "bound":
        value_scale = row_value_scale(plan, bound_terms.value_rest)
    pull_sq = torch.full((num_work, group), float("inf"), device=device)  # mode mass: the last measured
    o_sq = torch.zeros(num_work, group, device=device)  # |o_t - mean|^2 and |o_t|^2 (none yet: no stop)

    for block in range(plan.max_work_blocks):
        work = active.nonzero().squeeze(1)
        if work.numel() == 0:
            break
        keys, values, token_ok, _ = _gather_block(plan, k_cache, v_cache, work, pos[work], end[work])
        s = torch.einsum("ngd,ntd->ngt", queries[work], keys) * qk_scale
        s = s.masked_fill(~token_ok[:, None, :], float("-inf"))
        if page_lse is not None:
            _record_page_lse(plan, page_lse, s, pos[work], end[work])
        m_new = torch.maximum(m[work], s.amax(-1))
        alpha = torch.exp2(m[work] - m_new)
        p = torch.exp2(s - m_new[..., None])
        l[work] = l[work] * alpha + p.sum(-1)
        acc[work] = acc[work] * alpha[..., None] + torch.einsum("ngt,ntd->ngd", p, values)
        m[work] = m_new
        visited_tokens[work] += token_ok.sum(1)
        pos[work] += plan.block_pages
        if term.mode == "off":
            active = pos < end
            continue
        rest = (pos[work] < end[work])[:, None]  # the criterion only means something while pages remain
        o = acc[work] / l[work, :, None]
        o_norm = o.norm(dim=-1)
        if term.mode == "stability":
            mag_change = (o_norm - prev_norm[work]).abs() / o_norm.clamp(min=1e-30)
            cos = (o * prev_o[work]).sum(-1) / (o_norm * prev_norm[work]).clamp(min=1e-30)
            calm = (mag_change < term.tau_mag) & (1.0 - cos < term.tau_dir) & (block > 0)
            streak[work] = torch.where(calm, streak[work] + 1, 0)
            head_ok = streak[work] >= term.patience
            prev_o[work], prev_norm[work] = o, o_norm
        else:
            at = torch.where(rest[:, 0], pos[work], 0)

            def unread(x):  # the suffix term at the next position, relative to the running max
                return torch.where(rest, x[at], float("-inf")) - m[work]

            log2_rest = unread(bound_terms.log2_rest_mass)
            # W / (L + W), written so that W = 0 or huge W give 0 or 1, never NaN.
            rest_fraction = 1.0 / (1.0 + l[work] * torch.exp2(-log2_rest))
            if term.mode == "mass":
                # The unread pages would pull o_t toward their mean value, estimated by the plain
                # mean of the block just read (the pages read last are the most like them);
                # measured every MASS_PULL_CHECKS checks once some head's share is small enough.
                share_ok = rest_fraction <= MASS_MAX_SHARE
                measure = share_ok.any(-1) & (block % MASS_PULL_CHECKS == 0)
                block_mean = values.sum(1) / token_ok.sum(1).clamp(min=1)[:, None]  # [n, D]
                pull = (o - block_mean[:, None, :]).square().sum(-1)
                m_work = work[measure]
                pull_sq[m_work], o_sq[m_work] = pull[measure], o[measure].square().sum(-1)
                head_ok = share_ok & (rest_fraction.square() * pull_sq[work] <= term.eps ** 2 * o_sq[work])
            else:
                v_rest = torch.where(rest, bound_terms.value_rest[at][:, None], 0.0)
                vscale = value_scale[plan.work_row.long()[work]][:, None]
                # |o| of the merged output: this chunk's own output only when the row is whole.
                o_ref = vscale if plan.split else o_norm
                weighted = unread(bound_terms.log2_rest_value_mass)
                low = torch.minimum(unread(bound_terms.log2_rest_mass_low), log2_rest)
                err_weighted = (torch.exp2(weighted) + torch.exp2(log2_rest) * o_ref) / (l[work] + torch.exp2(low))
                err_weighted = torch.where(torch.maximum(weighted, log2_rest) > OVERFLOW_LOG2, float("inf"),
                                           err_weighted)
                err = torch.minimum(rest_fraction * (v_rest + o_ref), err_weighted)
                head_ok = err <= term.eps * (vscale if term.relative_to == "values" else o_norm)
        head_ok = head_ok & rest
        stable_at[work] = torch.where(
            head_ok & (stable_at[work] < 0), (first_block[work, None] + block).to(torch.int32), stable_at[work]
        )
        stop = head_ok.all(-1) & (pos[work] - plan.row_start.long()[plan.work_row.long()[work]] >= term.min_pages)
        active[work] = (pos[work] < end[work]) & ~stop

    visited_pages = (torch.minimum(pos, end) - start).to(torch.int32)
    # An empty work item (a fixed-buffer plan's chunk past its row's end) merges with weight 0.
    o = torch.where(l[..., None] > 0, acc / l[..., None], 0.0)
    lse = m + torch.log2(l)
    out, out_lse = _merge(plan, o, lse)
    return out, out_lse, visited_pages, visited_tokens.to(torch.int32), stable_at


def _record_page_lse(plan: DecodePlan, page_lse, s, pos, end):
    """Write the block's per-page ``log2 sum 2^s`` at its visit-order positions."""
    n, group = s.shape[:2]
    per_page = s.view(n, group, plan.block_pages, plan.page_size)
    lse = torch.logsumexp(per_page / LOG2E, dim=-1) * LOG2E  # [n, G, bp], base 2
    positions = pos[:, None] + torch.arange(plan.block_pages, device=pos.device)
    ok = positions < end[:, None]
    page_lse[positions[ok], :group] = lse.permute(0, 2, 1)[ok]


def _merge(plan: DecodePlan, o: torch.Tensor, lse: torch.Tensor):
    """Combine work items of each row by their base-2 LSEs -> ``[B, H_qo, D]``, ``[B, H_qo]``."""
    rows = plan.work_row.long()
    row_max = torch.full((plan.num_rows, plan.group_size), float("-inf"), device=o.device)
    row_max.scatter_reduce_(0, rows[:, None].expand_as(lse), lse, "amax")
    weight = torch.exp2(lse - row_max[rows])  # [W, G]
    denom = torch.zeros_like(row_max).index_add_(0, rows, weight)
    acc = torch.zeros(plan.num_rows, plan.group_size, plan.head_dim, device=o.device)
    acc.index_add_(0, rows, weight[..., None] * o)
    out = (acc / denom[..., None]).view(plan.batch_size, plan.num_qo_heads, plan.head_dim)
    out_lse = (row_max + torch.log2(denom)).view(plan.batch_size, plan.num_qo_heads)
    return out, out_lse
