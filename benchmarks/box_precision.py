"""Quest selection from fp8 key boxes against exact key boxes, on real attention (CPU).

``PageMetadata`` stores key boxes in fp8 rounded outward (4 significant bits, a power-of-two
scale per page and head) so that scoring reads half the bytes of 16-bit boxes. This measures
what that costs Quest: for every captured layer and a spread of captured queries, each
(request, KV head) keeps its top ``budget`` pages (sink and current page included) by the
Quest bound computed from exact float32 boxes and from the stored fp8 boxes; reported are the
overlap of the two selections and the softmax mass of the real attention (summed over the
GQA group) that each selection holds.

A candidate is measured too (not stored by ``PageMetadata``): 4-bit boxes, e2m1 values
(0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) with a power-of-two scale per 32 dimensions
shared by min and max, rounded outward, i.e. ``2 * D / 2 + D / 32`` bytes per page and head
(132 at D = 128, against 260 for fp8): half the bytes that Quest's scoring reads.

Usage: python benchmarks/box_precision.py [CAPTURE ...] [--budgets 32 64 128] [--queries 8]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from art_runtime import PageMetadata
from art_runtime.analysis import build_batch, load_capture_layers
from art_runtime.policies import PolicyContext, QuestPolicy
from art_runtime.selection import order_pages

CAPTURES = Path(__file__).resolve().parents[2] / "shared" / "data" / "captures"


E2M1 = torch.tensor([-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP4_BLOCK = 32  # dimensions sharing one power-of-two scale


def fp4_box(lo, hi):
    """``lo``, ``hi`` (``[..., D]``) rounded outward onto e2m1 with a power-of-two scale per 32 dims."""
    shape = lo.shape
    lo, hi = lo.reshape(*shape[:-1], -1, FP4_BLOCK), hi.reshape(*shape[:-1], -1, FP4_BLOCK)
    max_abs = torch.maximum(lo.abs(), hi.abs()).amax(-1, keepdim=True)
    scale = torch.exp2(torch.ceil(torch.log2(max_abs / 6.0))).where(max_abs > 0, torch.ones_like(max_abs))
    grid = E2M1.to(lo.dtype)
    up = torch.searchsorted(grid, (hi / scale).contiguous(), right=False).clamp(max=grid.numel() - 1)
    down = (torch.searchsorted(grid, (lo / scale).contiguous(), right=True) - 1).clamp(min=0)
    return (grid[down] * scale).reshape(shape), (grid[up] * scale).reshape(shape)


def exact_box_scores(batch, num_kv, group, meta_width, rounding=None):
    """``[R, width]`` Quest scores (group max) from exact float32 boxes of the cache's keys
    (or those boxes after ``rounding(lo, hi) -> (lo, hi)``)."""
    k_cache = batch.cache[:, 0]  # [pages, P, H_kv, D]
    rows = []
    for b, n in enumerate(batch.lengths):
        phys = batch.kv_indices[int(batch.kv_indptr[b]): int(batch.kv_indptr[b + 1])].long()
        pages = phys.numel()
        valid = torch.ones(pages, batch.page_size, dtype=torch.bool)
        valid[-1, int(batch.kv_last_page_len[b]):] = False
        keys = k_cache[phys]  # [c, P, H_kv, D]
        lo = keys.masked_fill(~valid[..., None, None], float("inf")).amin(1)  # [c, H_kv, D]
        hi = keys.masked_fill(~valid[..., None, None], float("-inf")).amax(1)
        if rounding is not None:
            lo, hi = rounding(lo, hi)
        q = batch.q[b].view(num_kv, group, -1)  # [H_kv, G, D]
        ub = (q.clamp(min=0)[:, :, None] * hi.transpose(0, 1)[:, None] +
              q.clamp(max=0)[:, :, None] * lo.transpose(0, 1)[:, None]).sum(-1).amax(1)  # [H_kv, c]
        rows.append(torch.nn.functional.pad(ub, (0, meta_width - pages), value=float("-inf")))
    return torch.cat(rows)


def page_mass(data, batch, num_kv, group):
    """``[R, width]`` real softmax mass per page, summed over the group's query heads."""
    width = int((batch.kv_indptr[1:] - batch.kv_indptr[:-1]).max())
    out = torch.zeros(len(batch.lengths) * num_kv, width, dtype=torch.float64)
    for b, n in enumerate(batch.lengths):
        k = data.keys[:, :n].double().repeat_interleave(group, 0)
        p = torch.softmax(torch.einsum("hd,htd->ht", batch.q[b].double(), k) * data.scaling, -1)  # [H_q, n]
        p = torch.nn.functional.pad(p, (0, width * batch.page_size - n)).view(num_kv, group, width, batch.page_size)
        out[b * num_kv:(b + 1) * num_kv] = p.sum((1, 3))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("captures", nargs="*", type=Path, default=sorted(CAPTURES.glob("*.safetensors")))
    parser.add_argument("--budgets", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--queries", type=int, default=8, help="captured queries per layer (evenly spaced)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    rows = []
    for path in args.captures:
        for data in load_capture_layers(path):
            num_kv, num_qo = data.keys.shape[0], data.queries.shape[0]
            group = num_qo // num_kv
            batch = build_batch(data.keys, data.values, data.queries, data.n_tokens, args.queries)
            meta = PageMetadata.from_cache(batch.cache, *batch.page_table)
            ctx = PolicyContext(*batch.page_table, num_qo, num_kv, batch.page_size)
            mass = page_mass(data, batch, num_kv, group)
            for budget in args.budgets:
                policy = QuestPolicy(budget=budget)
                layout = policy.layout(ctx)
                fp8 = policy.select(ctx, layout, 0, batch.q, meta)
                exact = order_pages(exact_box_scores(batch, num_kv, group, layout.width), ctx, layout)
                fp4 = order_pages(exact_box_scores(batch, num_kv, group, layout.width, fp4_box), ctx, layout)
                overlap, overlap_fp4, mass_fp8, mass_exact, mass_fp4 = [], [], [], [], []
                for r in range(ctx.num_rows):
                    a = fp8[layout.indptr[r]:layout.indptr[r + 1]].long()
                    e = exact[layout.indptr[r]:layout.indptr[r + 1]].long()
                    f = fp4[layout.indptr[r]:layout.indptr[r + 1]].long()
                    overlap.append(len(set(a.tolist()) & set(e.tolist())) / a.numel())
                    overlap_fp4.append(len(set(f.tolist()) & set(e.tolist())) / f.numel())
                    mass_fp8.append(float(mass[r, a].sum() / mass[r].sum()))
                    mass_exact.append(float(mass[r, e].sum() / mass[r].sum()))
                    mass_fp4.append(float(mass[r, f].sum() / mass[r].sum()))
                rows.append(dict(capture=path.name, layer=data.layer, budget=budget, rows=ctx.num_rows,
                                 overlap_mean=sum(overlap) / len(overlap), overlap_min=min(overlap),
                                 overlap_fp4_mean=sum(overlap_fp4) / len(overlap_fp4), overlap_fp4_min=min(overlap_fp4),
                                 mass_fp8_mean=sum(mass_fp8) / len(mass_fp8), mass_exact_mean=sum(mass_exact) / len(mass_exact),
                                 mass_fp4_mean=sum(mass_fp4) / len(mass_fp4),
                                 mass_fp8_min=min(mass_fp8), mass_exact_min=min(mass_exact), mass_fp4_min=min(mass_fp4)))
                print(rows[-1], flush=True)
    header = ("| capture | layer | budget (pages) | selection overlap with exact, fp8 (mean / min) "
              "| overlap, 4-bit candidate (mean / min) | group mass kept, fp8 boxes (mean / min) "
              "| group mass kept, 4-bit candidate (mean / min) | group mass kept, exact boxes (mean / min) |"
              "\n|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"| {r['capture']} | {r['layer']} | {r['budget']} | {r['overlap_mean']:.3f} / {r['overlap_min']:.3f} | "
             f"{r['overlap_fp4_mean']:.3f} / {r['overlap_fp4_min']:.3f} | "
             f"{r['mass_fp8_mean']:.4f} / {r['mass_fp8_min']:.4f} | {r['mass_fp4_mean']:.4f} / {r['mass_fp4_min']:.4f} | "
             f"{r['mass_exact_mean']:.4f} / {r['mass_exact_min']:.4f} |"
             for r in rows]
    started = datetime.now(timezone.utc)
    markdown = "\n".join([
        "# Quest selection: fp8 key boxes (stored) and 4-bit boxes (candidate) vs exact key boxes, real attention", "",
        f"- date (UTC): {started.isoformat()}", f"- command: `{shlex.join(['python3', *sys.argv])}`",
        f"- torch {torch.__version__}, CPU; page size 16; {args.queries} captured queries per layer, GQA group max",
        "- 4-bit candidate: e2m1 values with a power-of-two scale per 32 dimensions, min and max rounded outward "
        "(132 bytes per page and head at D = 128, against fp8's 260)", "",
        header, *lines, ""])
    print(markdown)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"box_precision_{started:%Y-%m-%d}"
    stem.with_suffix(".md").write_text(markdown)
    stem.with_suffix(".json").write_text(json.dumps(dict(date=started.isoformat(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
