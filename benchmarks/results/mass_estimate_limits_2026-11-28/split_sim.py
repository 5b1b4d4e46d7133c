"""Mode mass on rows split into chunks of the visit order, as the GPU plan splits rows when the batch
has fewer (request, KV head) rows than 2 per SM (Qwen2.5 at batch 64 on 132 SMs: 2 chunks of 512
pages). Rules per chunk: current (its own share, L_k + W_k, and eps: what the kernel does); row (its
unread estimate over the row's estimated total mass, eps / K for K chunks); row_sqrt (eps / sqrt K).
Prints pages read, p99 / max error of the merged output, and the deepest chunk per row (what sets
the kernel's time when every SM holds one row's chunks). Usage: split_sim.py REC.pt ..."""
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

def simulate(rows, eps, chunk, rule):
    read = total = 0; errs = []; depth_max = []
    for r in rows:
        n = r["pages"]; K = math.ceil(n / chunk)
        total_est = r["est"].sum(1)
        S = 0; L = 0; row_depths = []
        for k in range(K):
            a, e = k * chunk, min(n, (k + 1) * chunk)
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
    for rule, chunk in [("current", 100000), ("current", 512), ("row", 512), ("row_sqrt", 512), ("current", 256), ("row", 256), ("row_sqrt", 256)]:
        for eps in (0.03, 0.05):
            p, p99, mx, dmean, dmax = simulate(rows, eps, chunk, rule)
            print(f"{rule:8s} chunk {chunk:6d} eps {eps:.2f}: pages {p:.3f} p99 {p99:.3f} max {mx:.3f} | deepest chunk per row mean {dmean:.0f} max {dmax}")
