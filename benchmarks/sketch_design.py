"""Design study for the certified ``bound`` mode: which key sketch and which value term stop earliest.

Exact float64 page-by-page simulation on a capture (page size 16, checks every ``block`` pages
as the kernel does, the GQA group sharing one traversal, ``min_pages`` 2), for every
combination of:

* key sketch: per (page, KV head, dim) an affine grid (``free``: min + range/2^bits cells;
  ``pow2``: power-of-two cell, base a multiple of it) with each token's key as a cell of
  ``bits`` bits; per-token logit bounds ``[lb, ub]`` from the cells, per-page mass bounds
  ``[lo_j, hi_j]`` (sums of exp over the page's tokens);
* value term: ``norm`` (DESIGN §1: ``W/(L+W) (Vrest + |o_t|)``), ``weighted`` (each unread
  page's mass bound times its own largest value norm, over ``L + W_lo``), ``centred`` (the
  same around a per-row reference ``c*``, from per-page value centroids and radii), and the
  minimum of all;
* visit order: the ``mass`` DensePolicy order (box estimate) and the order of the sketch's
  mass upper bounds.

It reports pages and bytes read (K+V fp16 of the pages read + per selected page: key box for
scoring, sketch, value summaries) and the bound violations (true error above the bound).
Not the shipped code: the design numbers behind it (``benchmarks/results/bound_sketch_*``).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from art_runtime.analysis import _order_selection, _row_pages, build_batch, load_capture_layers
from art_runtime.page_metadata import PageMetadata
from art_runtime.policies.base import PolicyContext

P = 16


def cells(k, bits, step_kind):
    """Per-token certified intervals ``[lo, hi]`` of ``k [pages, P, D]`` (NaN rows = empty slots)."""
    valid = ~torch.isnan(k[..., :1])
    kmin = torch.where(valid, k, math.inf).amin(1, keepdim=True)
    kmax = torch.where(valid, k, -math.inf).amax(1, keepdim=True)
    levels = 2 ** bits
    if step_kind == "free":
        s = ((kmax - kmin) / levels).clamp(min=1e-12)
        b = kmin
    else:
        amax = torch.maximum(kmin.abs(), kmax.abs()).amax(-1, keepdim=True)
        floor = torch.exp2(torch.floor(torch.log2(amax.clamp(min=1e-30))) - 13)
        s = torch.maximum(torch.exp2(torch.ceil(torch.log2(((kmax - kmin) / (levels - 1)).clamp(min=1e-30)))), floor)
        b = torch.floor(kmin / s) * s
        s = torch.where(kmax < b + levels * s, s, 2 * s)  # the smallest power of two that covers
        b = torch.floor(kmin / s) * s
    c = torch.floor((k - b) / s).clamp(0, levels - 1)
    lo = b + c * s
    return lo, lo + s


def simulate(order_pages, z, sv, lo_m, hi_m, vmax, cent, rad, o_exact, vscale, eps, rel, block, min_pages=2):
    """Pages read per value term for one (request, KV head) row. Inputs per query head ``g``:
    ``z [G, c]`` exact page mass, ``sv [G, c, D]``, ``lo_m/hi_m [G, c]`` mass bounds (same
    units), ``vmax [c]``, ``cent [c, D]``, ``rad [c]``; ``order_pages [c]``."""
    idx = order_pages
    z, sv, lo_m, hi_m = z[:, idx], sv[:, idx], lo_m[:, idx], hi_m[:, idx]
    vmax, cent, rad = vmax[idx], cent[idx], rad[idx]
    c = z.shape[1]
    L = z.cumsum(1)  # visited after t+1 pages
    o_t = sv.cumsum(1) / L[..., None]
    o_norm = o_t.norm(dim=-1)

    def suffix(x, dim=1):  # sum over positions > t (the unread tail after t+1 pages)
        total = x.sum(dim, keepdim=True)
        return total - x.cumsum(dim)

    W, Wlo = suffix(hi_m), suffix(lo_m)
    vrest = torch.flip(torch.cummax(torch.flip(vmax, [0]), 0).values, [0])
    vrest = torch.cat([vrest[1:], vrest.new_zeros(1)])
    f = W / (L + W)
    b_norm = f * (vrest[None] + o_norm)
    b_weighted = (suffix(hi_m * vmax[None]) + W * o_norm) / (L + Wlo)
    cstar = (hi_m[..., None] * cent[None]).sum(1) / hi_m.sum(1)[:, None]  # [G, D]
    dist = (cent[None] - cstar[:, None]).norm(dim=-1) + rad[None]  # [G, c]: max |v - c*| per page
    dfar = torch.flip(torch.cummax(torch.flip(dist, [1]), 1).values, [1])
    dfar = torch.cat([dfar[:, 1:], dfar.new_zeros(dfar.shape[0], 1)], 1)
    off = (o_t - cstar[:, None]).norm(dim=-1)
    b_centred = torch.minimum(f * (dfar + off), (suffix(hi_m * dist) + W * off) / (L + Wlo))
    bounds = {"norm": b_norm, "weighted": b_weighted, "centred": b_centred,
              "min": torch.minimum(torch.minimum(b_norm, b_weighted), b_centred)}
    true_err = (o_t - o_exact[:, None]).norm(dim=-1)
    limit = eps * (vscale[:, None] if rel == "values" else o_norm)
    checks = torch.arange(c)
    checkable = ((checks + 1) % block == 0) & (checks + 1 >= min_pages) & (checks + 1 < c)
    out = {}
    for name, bound in bounds.items():
        ok = (bound <= limit).all(0) & checkable
        t = int(ok.to(torch.int8).argmax()) + 1 if ok.any() else c
        viol = int((true_err[:, t - 1] > bound[:, t - 1] * (1 + 1e-9)).sum()) if t < c else 0
        out[name] = (t, viol)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("captures", nargs="+")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--bits", default="2,3,4,8")
    parser.add_argument("--steps", default="pow2,free")
    parser.add_argument("--block", type=int, default=4)
    args = parser.parse_args()
    bits_list = [int(b) for b in args.bits.split(",")]
    steps = args.steps.split(",")
    settings = [(e, r) for r in ("values", "output") for e in (0.05, 0.1)]
    t0 = time.time()
    for path in args.captures:
        totals = {}
        for data in load_capture_layers(path):
            num_kv, n_tokens, dim = data.keys.shape
            num_qo = data.queries.shape[0]
            group = num_qo // num_kv
            batch = build_batch(data.keys, data.values, data.queries, n_tokens, args.queries, P)
            meta = PageMetadata.from_cache(batch.cache, *batch.page_table)
            ctx = PolicyContext(*batch.page_table, num_qo, num_kv, P, sm_scale=data.scaling)
            mass_sel = _order_selection("mass", ctx, batch.q, meta)
            for b, n in enumerate(batch.lengths):
                c = math.ceil(n / P)
                pad = c * P - n
                for h in range(num_kv):
                    k = torch.nn.functional.pad(data.keys[h, :n].double(), (0, 0, 0, pad), value=math.nan).view(c, P, dim)
                    v = torch.nn.functional.pad(data.values[h, :n].double(), (0, 0, 0, pad)).view(c, P, dim)
                    valid = torch.arange(c * P).view(c, P) < n
                    q = batch.q[b, h * group:(h + 1) * group].double()  # [G, D]
                    s = torch.einsum("gd,cpd->gcp", q, torch.nan_to_num(k)) * data.scaling
                    s = s.masked_fill(~valid[None], -math.inf)
                    m = s.amax((1, 2), keepdim=True)
                    e = torch.exp(s - m)
                    z = e.sum(-1)
                    sv = torch.einsum("gcp,cpd->gcd", e, v)
                    o_exact = sv.sum(1) / z.sum(1)[:, None]
                    vnorm = v.norm(dim=-1).masked_fill(~valid, 0)
                    vmax = vnorm.amax(-1)
                    vscale = vmax.max().expand(group)
                    cent = v.sum(1) / valid.sum(1)[:, None]
                    rad = (v - cent[:, None]).norm(dim=-1).masked_fill(~valid, 0).amax(-1)
                    mass_order = _row_pages(mass_sel, b * num_kv + h)
                    for bits in bits_list:
                        for step in steps:
                            lo, hi = cells(k, bits, step)
                            lo, hi = torch.nan_to_num(lo), torch.nan_to_num(hi)
                            ub = (torch.maximum(q[:, None, None] * lo[None], q[:, None, None] * hi[None]).sum(-1)
                                  * data.scaling).masked_fill(~valid[None], -math.inf)
                            lb = (torch.minimum(q[:, None, None] * lo[None], q[:, None, None] * hi[None]).sum(-1)
                                  * data.scaling).masked_fill(~valid[None], -math.inf)
                            hi_m, lo_m = torch.exp(ub - m).sum(-1), torch.exp(lb - m).sum(-1)
                            over = (ub - s)[valid[None].expand_as(s)]
                            key = (bits, step)
                            totals.setdefault(("over", key), []).append(over)
                            sketch_order = torch.sort((hi_m / hi_m.sum(1, keepdim=True)).sum(0), descending=True,
                                                      stable=True).indices
                            first = torch.tensor([0, c - 1]) if c > 1 else torch.tensor([0])
                            rest = sketch_order[(sketch_order != 0) & (sketch_order != c - 1)]
                            sketch_order = torch.cat([first, rest])
                            for oname, order in (("mass", mass_order), ("sketch", sketch_order)):
                                for eps, rel in settings:
                                    res = simulate(order, z, sv, lo_m, hi_m, vmax, cent, rad, o_exact, vscale, eps,
                                                   rel, args.block)
                                    for term, (t, viol) in res.items():
                                        acc = totals.setdefault((data.layer, bits, step, oname, eps, rel, term), [0, 0, 0])
                                        acc[0] += t
                                        acc[1] += c
                                        acc[2] += viol
            print(f"{path} layer {data.layer} done at {time.time() - t0:.0f}s", flush=True)
        print(f"\n== {path}")
        for key in sorted(k for k in totals if k[0] == "over"):
            over = torch.cat(totals[key])
            print(f"overshoot {key[1]}: median {float(over.median()):.2f} p90 {float(over.quantile(0.9)):.2f} nats "
                  f"(ub - true logit per token)")
        print("layer bits step   order  eps  rel    term      pages  viol")
        for key, (t, c, viol) in sorted((k, v) for k, v in totals.items() if k[0] != "over"):
            print(f"{key[0]:>5} {key[1]:>4} {key[2]:<6} {key[3]:<6} {key[4]:<4} {key[5]:<6} {key[6]:<9} "
                  f"{100 * t / c:5.1f}% {viol}")


if __name__ == "__main__":
    main()
