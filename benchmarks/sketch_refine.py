"""Design study: a two-level key sketch for the certified ``bound`` mode (high nibbles first).

The 8-bit sketch is what certification costs on diffuse heads (Qwen2.5 at values eps 0.05:
14 of its 77% of bytes, ``benchmarks/results/bound_sketch_2026-11-26/``). Its codes live on a
power-of-two grid, so a code's high nibble is itself a 4-bit sketch of the same key with a
16x wider cell: ``[(b + 16 h) s, (b + 16 h + 16) s]`` holds ``[(b + c) s, (b + c + 1) s]``.
Stored as two nibble planes, the pre-pass could read every sketched page's high nibbles
(half the codes' bytes), bound its mass from them, and read the low nibbles only of the pages
whose 4-bit mass bound is still large: above ``share * eps`` of the work item's estimated
mass (the cut's reference) for some query head. Every bound stays certified; what changes is
how tight it is, hence how many pages the kernel reads before it may stop.

This script measures that trade on real captures, exactly, through the torch backend (what
``art-runtime analyze`` runs): ``art_runtime.decode.bound_terms_torch`` is replaced by
``two_level_bound_terms`` (the reference's pre-pass with the two-level page bounds), and the
bytes are recounted as high planes of every sketched page plus low planes of the refined ones
(the grid's bytes once). ``share`` 0 refines every page (the shipped 8-bit sketch, as a check),
``inf`` none (a 4-bit sketch).

Written before the tail order shipped: its pre-pass keeps the plan's order unless
``--reorder-tail`` is given, so its share-0 rows are the bound as it was then (the numbers in
``benchmarks/results/sketch_refine_2026-11-27/``).

Two more levers of the same pre-pass: ``--reorder-tail`` visits each work item's pages after the
cut by their sketch bound of the group's mass, largest first (the pre-pass bounds exactly those
pages, so the order costs no bytes; shipped since, keyed by that bound times the page's value
norm: ``reference.tail_visit_order``, ``benchmarks/results/tail_order_2026-11-27/``), and
``--cut-shares`` moves the cut (sketching from where every head's estimated unread share is at
most that many eps). Not the shipped code.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch

from art_runtime import analysis, decode
from art_runtime.reference import (LOG2_SLACK, SKETCH_CUT_SHARE, VALUE_NORM_SCALE, BoundTerms, LOG2E,
                                   _suffix_log2_sum, _suffix_max, sketch_page_log2_mass)

NIBBLE = 16
COUNTS = {"sketched": 0, "refined": 0}


def two_level_bound_terms(plan, q, page_meta, share: float, reorder_tail: bool = False,
                          cut_share: float = SKETCH_CUT_SHARE, chunk: int = 4096) -> BoundTerms:
    """``reference.bound_terms_torch`` for mode ``bound`` with high-nibble bounds, refined by
    the full code where the high-nibble upper mass exceeds ``share * eps`` of the item's estimate.

    ``reorder_tail``: the pages after each work item's cut (the ones the pre-pass sketches
    anyway) are then visited by their sketch upper bound of the group's mass, largest first
    (the plan's visit arrays are permuted in place), instead of the box estimate's order."""
    qk_scale = plan.sm_scale * LOG2E
    phys, head = plan.visit_phys.long(), plan.visit_row % plan.num_kv_heads
    q_groups = q.float().view(plan.batch_size, plan.num_kv_heads, plan.group_size, plan.head_dim)
    tokens = plan.visit_tokens.long()
    vnorm = page_meta.value_norm_max[phys, head] * VALUE_NORM_SCALE
    kmin, kmax = page_meta.key_bounds(phys, head)
    q_pos = q_groups[plan.visit_row // plan.num_kv_heads, head]
    centre, spread = (kmin + kmax) / 2, (kmax - kmin) / 4
    logit = (q_pos * centre[:, None]).sum(-1) * qk_scale + \
        (q_pos.square() * spread.square()[:, None]).sum(-1) * (qk_scale * plan.sm_scale / 2)
    estimate = _suffix_log2_sum(plan, logit + torch.log2(tokens.float())[:, None])
    starts, ends = plan.work_start.long(), plan.work_end.long()
    work_of = torch.full((plan.nnz,), -1, dtype=torch.long)
    for w in range(plan.num_work):  # a study on small batches: the plain loop
        work_of[starts[w]:ends[w]] = w
    item = work_of.clamp(min=0)
    threshold = estimate[starts] + math.log2(cut_share * plan.termination.eps)
    early = (work_of >= 0) & (estimate > threshold[item]).any(-1)
    cut = starts + torch.zeros_like(starts).index_add_(0, item, early.long())
    after_cut = (work_of >= 0) & (torch.arange(plan.nnz) >= cut[item])
    sketched = after_cut.nonzero().squeeze(1)
    upper = torch.full((plan.nnz, plan.group_size), float("-inf"))
    lower = torch.full_like(upper, float("-inf"))
    refine_at = threshold - math.log2(cut_share) + (math.log2(share) if share > 0 else float("-inf"))
    for first in range(0, sketched.numel(), chunk):
        part = sketched[first: first + chunk]
        p, h = phys[part], head[part]
        codes, (base, step) = page_meta.key_codes[p, h], page_meta.sketch_grid(p, h)
        coarse = sketch_page_log2_mass(q_pos[part], codes // NIBBLE, base / NIBBLE, step * NIBBLE,
                                       tokens[part], qk_scale)
        fine = sketch_page_log2_mass(q_pos[part], codes, base, step, tokens[part], qk_scale)
        refine = (coarse[0] > refine_at[item[part]]).any(-1)[:, None]
        upper[part] = torch.where(refine, fine[0], coarse[0])
        lower[part] = torch.where(refine, fine[1], coarse[1])
        COUNTS["refined"] += int(refine.sum())
    COUNTS["sketched"] += int(sketched.numel())
    if reorder_tail:
        group_upper = torch.logsumexp(upper / LOG2E, dim=-1)
        for w in range(plan.num_work):
            c, e = int(cut[w]), int(ends[w])
            if e - c > 1:
                perm = c + torch.argsort(group_upper[c:e], descending=True, stable=True)
                for name in ("visit_phys", "visit_tokens"):
                    getattr(plan, name)[c:e] = getattr(plan, name)[perm].clone()
                upper[c:e], lower[c:e], vnorm[c:e] = upper[perm].clone(), lower[perm].clone(), vnorm[perm].clone()
    before_cut = ~after_cut[:, None]
    return BoundTerms(
        (_suffix_log2_sum(plan, upper) + LOG2_SLACK).masked_fill(before_cut, float("inf")), _suffix_max(plan, vnorm),
        (_suffix_log2_sum(plan, lower) - LOG2_SLACK).masked_fill(before_cut, float("-inf")),
        (_suffix_log2_sum(plan, upper + torch.log2(vnorm)[:, None]) + LOG2_SLACK).masked_fill(before_cut, float("inf")),
        (ends - cut).to(torch.int32), torch.arange(plan.nnz),  # the order of the (permuted) plan
    )


def run(path, layer: int, order: str, setting: str, share: float, queries: int, reorder_tail: bool = False,
        cut_share: float = SKETCH_CUT_SHARE) -> dict:
    COUNTS.update(sketched=0, refined=0)
    decode.bound_terms_torch = lambda plan, q, meta: two_level_bound_terms(plan, q, meta, share, reorder_tail,
                                                                           cut_share)
    report = analysis.analyze_capture(path, layers=[layer], queries=queries, orders=[order], settings=[setting],
                                      progress=False)
    result = report.criteria[0]
    # a nibble plane; the grid: step exponents, box minimum and scale (key_sketch_bytes_per_page less the codes)
    plane, grid = report.page_size * report.head_dim // 2, 2 * report.head_dim + 4
    assert COUNTS["sketched"] == result.sketch_pages, (COUNTS, result.sketch_pages)
    metadata = result.metadata_bytes - result.sketch_pages * (2 * plane + grid) \
        + COUNTS["sketched"] * (plane + grid) + COUNTS["refined"] * plane
    return dict(layer=layer, order=order, setting=setting, share=share, reorder_tail=reorder_tail, cut_share=cut_share,
                pages=result.pages_fraction,
                bytes=(result.kv_bytes + metadata) / result.dense_bytes,
                sketched=COUNTS["sketched"] / result.pages_selected, refined=COUNTS["refined"] / result.pages_selected,
                violations=result.violations, p99_values=result.err_values["p99"], max_values=result.err_values["max"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("capture", type=Path)
    parser.add_argument("--layers", type=int, nargs="+", required=True)
    parser.add_argument("--order", default="mass", help="visit order (default: mass, the bound's best)")
    parser.add_argument("--setting", default="bound:eps=0.05,rel=values")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 1 / 4096, 1 / 1024, 1 / 256, 1 / 64, math.inf])
    parser.add_argument("--queries", type=int, default=8, help="captured queries per layer, as requests")
    parser.add_argument("--reorder-tail", action="store_true",
                        help="also visit each work item's pages after the cut by their sketch bound")
    parser.add_argument("--cut-shares", type=float, nargs="+", default=[SKETCH_CUT_SHARE],
                        help="sketch from where every head's estimated unread share is at most this times eps "
                             f"(shipped: {SKETCH_CUT_SHARE:g})")
    parser.add_argument("--out", type=Path, default=None, help="JSON lines file for the rows")
    args = parser.parse_args(argv)
    print("| layer | cut share | share | pages | bytes | sketched | refined | violations | p99 / max err (values) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for layer in args.layers:
        for cut_share, share in itertools.product(args.cut_shares, args.shares):
            row = run(args.capture, layer, args.order, args.setting, share, args.queries, args.reorder_tail, cut_share)
            rows.append(row)
            print(f"| {layer} | {cut_share:g} | {share:g} | {row['pages']:.1%} | {row['bytes']:.1%} | {row['sketched']:.1%} | "
                  f"{row['refined']:.1%} | {row['violations']} | {row['p99_values']:.4f} / {row['max_values']:.4f} |",
                  flush=True)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
