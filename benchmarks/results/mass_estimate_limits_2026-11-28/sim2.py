"""Replay stopping rules on diag.py's records: bytes (with the two key-box reads) and p99 per-head error.

Usage: python sim2.py REC.pt ...  Per rule and eps: how many layers meet issue 8's mass target
(p99 <= 5% relative to |o| while reading <= 60% of the bytes), then bytes% / p99% per layer (* met).
Rules: shipped (mode mass as the kernel runs it); r_*: the estimated unread mass scaled by the
true / estimated mass of the last block (r_last) or of every page read (r_cum), optionally never
below 1; true: the true unread share with the shipped pull; oracle: the true error.
"""
import sys, torch, math
BOX = 2 * 132 / 4096  # Qwen's/SmolLM2's key box (head_dim 64): scored by the mass order, read again by the pre-pass

def share_of(c, variant):
    W = c["West"]
    if variant == "shipped":
        pass
    elif variant == "r_last":
        W = W * (c["blk_t"] / c["blk_e"])
    elif variant == "r_last_max1":
        W = W * (c["blk_t"] / c["blk_e"]).clamp(min=1)
    elif variant == "r_cum":
        W = W * (c["L"] / c["read_e"])
    elif variant == "r_cum_max1":
        W = W * (c["L"] / c["read_e"]).clamp(min=1)
    elif variant in ("true", "oracle"):
        return c["share_t"]
    return W / (c["L"] + W)

def simulate(rows, eps, variant, k=4):
    pages_read = total = 0; errs = []
    for r in rows:
        stop = None; pull_sq = None
        for i, c in enumerate(r["checks"]):
            share = share_of(c, variant)
            share_ok = share <= 0.25
            if share_ok.any() and i % k == 0:
                pull_sq, o_sq = c["pull_e"] ** 2, c["onorm"] ** 2
            if variant == "oracle":  # the true error of stopping here: true share times true pull
                ok = c["share_t"] * c["pull_t"] <= eps * c["onorm"]
            else:
                ok = share_ok & (share ** 2 * pull_sq <= eps**2 * o_sq) if pull_sq is not None else share_ok & False
            if ok.all() and c["end"] >= 2:
                stop = c; break
        end = stop["end"] if stop else r["pages"]
        pages_read += end; total += r["pages"]
        errs.append(stop["err"] if stop else torch.zeros_like(r["checks"][0]["err"]))
    e = torch.cat(errs)
    return pages_read / total + BOX, float(e.quantile(0.99))

files = sys.argv[1:]
rows = {f: torch.load(f) for f in files}
for variant in ["shipped", "r_last", "r_last_max1", "r_cum", "r_cum_max1", "true", "oracle"]:
    for eps in [0.02, 0.03, 0.04, 0.05]:
        cells = []
        hit = 0
        for f in files:
            by, p99 = simulate(rows[f], eps, variant)
            ok = by <= 0.60 and p99 <= 0.05
            hit += ok
            cells.append(f"{by*100:5.1f}/{p99*100:4.1f}{'*' if ok else ' '}")
        print(f"{variant:12s} {eps:.2f} {hit} | " + " ".join(cells))
