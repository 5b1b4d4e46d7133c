"""Mode mass on rows split into chunks, contiguous (``current``) or with the row's blocks dealt to
its chunks in turn (``interleaved``, what ``plan.interleaved_slots`` now does; this replay deals
round-robin over all chunks, which equals it when the chunk sizes allow), on the records of
../mass_estimate_limits_2026-11-28/split.py. Prints pages read, p99 / max error of the merged
output and the deepest chunk per row. Usage: replay_dealt.py REC.pt ..."""
import sys, math, torch
BP, PULL_EVERY, MAX_SHARE = 8, 4, 0.25

def run_chunk(r, a, e, eps_k, total_est, rule, min_pages):
    """Pages read of chunk [a, e) and its read sums (S [G, D], L [G])."""
    z, sv, est, vsum, cnt = r["z"], r["sv"], r["est"], r["vsum"], r["cnt"]
    pull_sq = o_sq = None
    end = e
    for i, stop_at in enumerate(range(a + BP, e, BP)):
        L = z[:, a:stop_at].sum(1); S = sv[:, a:stop_at].sum(1)
        o = S / L[:, None]
        W = est[:, stop_at:e].sum(1)
        if rule in ("row", "row_sqrt"):
            share = W / torch.maximum(total_est, L + W)
        else:
            share = W / (L + W)
        share_ok = share <= MAX_SHARE
        if share_ok.any() and i % PULL_EVERY == 0:
            vblk = vsum[stop_at - BP:stop_at].sum(0) / cnt[stop_at - BP:stop_at].sum()
            pull_sq, o_sq = (o - vblk).square().sum(-1), o.square().sum(-1)
        if pull_sq is None:
            continue
        ok = share_ok & (share.square() * pull_sq <= eps_k**2 * o_sq)
        if bool(ok.all()) and stop_at - a >= min_pages:
            end = stop_at; break
    return end - a, sv[:, a:end].sum(1), z[:, a:end].sum(1)

def interleave(r, K):
    """The row's pages permuted so that contiguous chunk k holds blocks k, k+K, k+2K, ... of the order."""
    n = r["pages"]; blocks = [list(range(b, min(b + BP, n))) for b in range(0, n, BP)]
    perm = [p for k in range(K) for blk in blocks[k::K] for p in blk]
    idx = torch.tensor(perm)
    out = dict(r); out.update(z=r["z"][:, idx], sv=r["sv"][:, idx], est=r["est"][:, idx], vsum=r["vsum"][idx], cnt=r["cnt"][idx])
    bounds, a = [], 0
    for k in range(K):
        size = sum(len(blk) for blk in blocks[k::K]); bounds.append((a, a + size)); a += size
    return out, bounds

def simulate(rows, eps, chunk, rule):
    read = total = 0; errs = []; depth_max = []
    for r in rows:
        n = r["pages"]; K = math.ceil(n / chunk)
        if rule == "interleaved":
            r, bounds = interleave(r, K)
        total_est = r["est"].sum(1)
        S = 0; L = 0; row_depths = []
        for k in range(K):
            a, e = bounds[k] if rule == "interleaved" else (k * chunk, min(n, (k + 1) * chunk))
            eps_k = eps / K if rule == "row" else eps / math.sqrt(K) if rule == "row_sqrt" else eps
            got, s, l = run_chunk(r, a, e, eps_k, total_est, rule, 2 if k == 0 else 0)
            S = S + s; L = L + l; read += got; row_depths.append(got)
        total += n
        o = S / L[:, None]
        errs.append((o - r["o_ex"]).norm(dim=-1) / r["o_ex"].norm(dim=-1))
        depth_max.append(max(row_depths))
    e = torch.cat(errs)
    return read / total, float(e.quantile(0.99)), float(e.max()), sum(depth_max) / len(depth_max), max(depth_max)

for f in sys.argv[1:]:
    rows = torch.load(f)
    print("==", f, "pages per row", rows[0]["pages"])
    for rule, chunk in [("current", 100000), ("current", 512), ("interleaved", 512), ("current", 256), ("interleaved", 256), ("interleaved", 128)]:
        for eps in (0.03, 0.05):
            p, p99, mx, dmean, dmax = simulate(rows, eps, chunk, rule)
            print(f"{rule:8s} chunk {chunk:6d} eps {eps:.2f}: pages {p:.3f} p99 {p99:.3f} max {mx:.3f} | deepest chunk per row mean {dmean:.0f} max {dmax}")
