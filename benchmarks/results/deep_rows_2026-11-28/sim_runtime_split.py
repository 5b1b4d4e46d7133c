"""Mode mass at batch 64 on real attention: the shipped split (rows dealt to round(264 / rows) chunks)
against a run-time split of the rows the pre-pass predicts deep (chunk c of K reads the row's blocks
c, c + K, ...; K from the row's predicted share of the batch's predicted blocks), in float64 replay
of the stopping rule (as ../dealt_chunks_2026-11-28/replay_dealt.py) and a chain model of the decode
kernel's time: 132 SMs, two programs an SM, a program's block taking T_ALONE µs alone on its SM and
T_SHARED µs beside another (block_latency_h200.txt), a pass of 8 blocks read whole once started.

Usage: sim_runtime_split.py QUERIES REC.pt ... (records of ../mass_estimate_limits_2026-11-28/split.py
with QUERIES queries a layer, repeated 64 / QUERIES times to make batch 64); PASS=4 in the environment
models passes of 4 blocks."""
import heapq
import math
import os
import sys

import torch

BP, PULL_EVERY, MAX_SHARE = 8, 4, 0.25
PASS = int(os.environ.get("PASS", 8))  # blocks a pass (the decode kernel's PASS_BLOCKS)
SMS, SLOTS = 132, 2
T_ALONE, T_SHARED, T_START = 2.05, 2.73, 2.0  # µs: a block alone / beside another program; a program's start
KMAX = 8


def run_chunk(r, a, e, eps):
    """Pages folded by the chunk [a, e) of a (permuted) row record and its sums (S [G, D], L [G])."""
    z, sv, est, vsum, cnt = r["z"], r["sv"], r["est"], r["vsum"], r["cnt"]
    pull_sq = o_sq = None
    end = e
    for i, stop_at in enumerate(range(a + BP, e, BP)):
        L = z[:, a:stop_at].sum(1)
        o = sv[:, a:stop_at].sum(1) / L[:, None]
        W = est[:, stop_at:e].sum(1)
        share = W / (L + W)
        share_ok = share <= MAX_SHARE
        if share_ok.any() and i % PULL_EVERY == 0:
            vblk = vsum[stop_at - BP:stop_at].sum(0) / cnt[stop_at - BP:stop_at].sum()
            pull_sq, o_sq = (o - vblk).square().sum(-1), o.square().sum(-1)
        if pull_sq is not None and bool((share_ok & (share.square() * pull_sq <= eps**2 * o_sq)).all()):
            end = stop_at
            break
    return end - a, sv[:, a:end].sum(1), z[:, a:end].sum(1)


def strided(r, K):
    """The row with chunk k's blocks (k, k + K, ...) contiguous, and the chunks' [start, end)."""
    n = r["pages"]
    blocks = [list(range(b, min(b + BP, n))) for b in range(0, n, BP)]
    perm, bounds = [], []
    for k in range(K):
        start = len(perm)
        perm += [p for blk in blocks[k::K] for p in blk]
        bounds.append((start, len(perm)))
    idx = torch.tensor(perm)
    out = dict(r)
    out.update(z=r["z"][:, idx], sv=r["sv"][:, idx], est=r["est"][:, idx], vsum=r["vsum"][idx], cnt=r["cnt"][idx])
    return out, bounds


def predicted_blocks(r, eps):
    """The pre-pass's prediction (block_suffix_kernel): blocks at which some head's estimated unread
    share of the row is still above eps."""
    n = r["pages"]
    blk = torch.stack([r["est"][:, b:b + BP].sum(1) for b in range(0, n, BP)], 1)  # [G, blocks]
    suffix = blk.flip(1).cumsum(1).flip(1)
    return int(((suffix / suffix[:, :1]) > eps).any(0).sum())


def replay(rows, eps, chunks_of):
    """Per program (row, chunk): blocks loaded; and pages folded, p99 / max error of the merged output."""
    programs, read, total, errs = [], 0, 0, []
    for i, r in enumerate(rows):
        K = chunks_of[i]
        rr, bounds = strided(r, K)
        S = L = 0
        for a, e in bounds:
            pages, s, l = run_chunk(rr, a, e, eps)
            S, L = S + s, L + l
            read += pages
            chunk_blocks = math.ceil((e - a) / BP)
            folded = math.ceil(pages / BP)
            programs.append(min(chunk_blocks, math.ceil(max(folded, 1) / PASS) * PASS))
        total += r["pages"]
        errs.append((S / L[:, None] - r["o_ex"]).norm(dim=-1) / r["o_ex"].norm(dim=-1))
    e = torch.cat(errs)
    return programs, read / total, float(e.quantile(0.99)), float(e.max())


def makespan(program_blocks):
    """Chain model of one launch: programs (blocks each) in launch order onto SMS x SLOTS slots, the
    next one taking the first slot to free; a program's block takes T_ALONE µs while it is alone on
    its SM, T_SHARED beside another."""
    work = list(program_blocks)
    sm_of, left, running = {}, {}, [[] for _ in range(SMS)]
    free = [(0.0, s % SMS) for s in range(SMS * SLOTS)]  # (time, sm): slot i on SM i % SMS
    heapq.heapify(free)
    t = 0.0
    pending = list(range(len(work)))
    for p in pending:  # dispatch while slots are free at time t; else advance to the next finish
        while not free or free[0][0] > t:
            t = _advance(t, running, left, free)
        _, sm = heapq.heappop(free)
        running[sm].append(p)
        left[p] = work[p] * 1.0 + T_START / T_SHARED
    while any(running):
        t = _advance(t, running, left, free)
    return t


def _advance(t, running, left, free):
    """Run every SM until the next program finishes; free its slot. Returns the new time."""
    step = math.inf
    for progs in running:
        rate = 1.0 / (T_ALONE if len(progs) == 1 else T_SHARED)
        for p in progs:
            step = min(step, left[p] / rate)
    for sm, progs in enumerate(running):
        rate = 1.0 / (T_ALONE if len(progs) == 1 else T_SHARED)
        done = []
        for p in progs:
            left[p] -= step * rate
            if left[p] <= 1e-9:
                done.append(p)
        for p in done:
            progs.remove(p)
            heapq.heappush(free, (t + step, sm))
    return t + step


def main():
    eps = 0.05
    queries = int(sys.argv[1])
    for path in sys.argv[2:]:
        rows = torch.load(path) * (64 // queries)
        R = len(rows)
        static_k = max(1, round(SMS * SLOTS / R))
        pred = [predicted_blocks(r, eps) for r in rows]
        total_pred = sum(pred)
        share = [p * SMS * SLOTS / total_pred for p in pred]  # chunks that give the row a like share
        median = max(1, sorted(pred)[R // 2])
        rules = {"round": [round(x) for x in share], "ceil": [math.ceil(x) for x in share],
                 "static+": [max(static_k, round(x)) for x in share],
                 # only the outliers: rows predicted deeper than twice the median, split in proportion
                 "outliers": [static_k * max(1, round(p / (2 * median))) if p > 2 * median else static_k
                              for p in pred]}
        print(f"== {path}: {R} rows of {rows[0]['pages']} pages; predicted blocks a row: median "
              f"{sorted(pred)[R // 2]}, max {max(pred)}")
        deepest_first = sorted(range(R), key=lambda i: -pred[i])
        runs = [("shipped", [static_k] * R, range(R))]
        runs += [(name, [min(KMAX, max(1, k)) for k in ks], deepest_first) for name, ks in rules.items()]
        for name, ks, order in runs:
            programs, pages, p99, mx = replay([rows[i] for i in order], eps, [ks[i] for i in order])
            print(f"{name:8s}: programs {len(programs):4d}  pages {pages:.3f}  p99 {p99:.3f}  max {mx:.3f}  "
                  f"blocks loaded {sum(programs):6d}  deepest program {max(programs):3d} blocks  "
                  f"model {makespan(programs):6.1f} µs")


if __name__ == "__main__":
    main()
