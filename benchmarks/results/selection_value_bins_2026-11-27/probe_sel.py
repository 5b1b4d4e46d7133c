"""Probe: where the selection kernel's time goes (variants timed in CUDA graphs of 20 launches)."""
import json, os, sys, time
import torch, triton, triton.language as tl

sys.path.insert(0, "benchmarks")

@triton.jit
def sel_variant(scores_ptr, kv_indptr_ptr, sel_indptr_ptr, keys_ptr, pages_ptr, kv_indices_ptr, kv_last_page_len_ptr,
                phys_ptr, tokens_ptr, stride_sr, page_size,
                NUM_KV_HEADS: tl.constexpr, WIDTH_POW2: tl.constexpr, KEPT_POW2: tl.constexpr,
                PHYSICAL: tl.constexpr, ROUNDS: tl.constexpr, COMPACT: tl.constexpr, SORT: tl.constexpr):
    row = tl.program_id(0)
    request = row // NUM_KV_HEADS
    first_page = tl.load(kv_indptr_ptr + request)
    num_pages = tl.load(kv_indptr_ptr + request + 1) - first_page
    start = tl.load(sel_indptr_ptr + row)
    kept = tl.load(sel_indptr_ptr + row + 1) - start
    pos = tl.arange(0, WIDTH_POW2)
    present = pos < num_pages
    score = tl.load(scores_ptr + row * stride_sr + pos, mask=present, other=float("-inf"))
    score = tl.minimum(score, 3.4028232635611926e38)
    score = tl.where(pos == num_pages - 1, 3.4028234663852886e38, score)
    score = tl.where(pos == 0, float("inf"), score)
    bits = score.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    unique_key = (ordered.to(tl.int64) << 32) | (WIDTH_POW2 - 1 - pos).to(tl.int64)
    k = tl.arange(0, KEPT_POW2)
    key = (ordered ^ -2147483648).to(tl.uint32, bitcast=True)
    threshold = tl.zeros([], dtype=tl.uint32)
    remaining = kept
    bins = tl.arange(0, 256)
    for r in tl.static_range(ROUNDS):
        shift = 24 - 8 * r
        if r == 0:
            match = present
        else:
            match = present & ((key >> (shift + 8)) == (threshold >> (shift + 8)))
        hist = tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=match)
        at_least = tl.cumsum(hist, 0, reverse=True)
        best = tl.max(tl.where(at_least >= remaining, (bins << 20) | (at_least - hist), -1), 0)
        remaining -= best & 0xFFFFF
        threshold = threshold | ((best >> 20).to(tl.uint32) << shift)
    if COMPACT:
        above = present & (key > threshold)
        equal = present & (key == threshold)
        counts = tl.cumsum((above.to(tl.int64) << 32) | equal.to(tl.int64), 0)
        equal_rank = (counts & 0xFFFFFFFF).to(tl.int32)
        take = above | (equal & (equal_rank <= remaining))
        slot = (counts >> 32).to(tl.int32) + tl.minimum(equal_rank, remaining) - 1
        slot = tl.minimum(tl.maximum(slot, 0), kept - 1)
        tl.store(keys_ptr + start + slot, unique_key, mask=take)
        tl.debug_barrier()
        chosen = tl.load(keys_ptr + start + k, mask=k < kept, other=-9223372036854775808)
    else:
        chosen = tl.load(keys_ptr + start + k, mask=k < kept, other=-9223372036854775808) + threshold.to(tl.int64)
    if SORT:
        chosen = tl.sort(chosen, descending=True)
    page = (WIDTH_POW2 - 1 - (chosen & 0xFFFFFFFF)).to(tl.int32) & (WIDTH_POW2 - 1)
    tl.store(pages_ptr + start + k, page, mask=k < kept)
    if PHYSICAL:
        phys = tl.load(kv_indices_ptr + first_page + page, mask=k < kept, other=0)
        tokens = tl.where(page == num_pages - 1, tl.load(kv_last_page_len_ptr + request), page_size)
        tl.store(phys_ptr + start + k, phys, mask=k < kept)
        tl.store(tokens_ptr + start + k, tokens, mask=k < kept)

@triton.jit
def empty_kernel(x_ptr):
    pass

def graph_time(fn, launches=20, iters=30):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(); fn()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(launches):
            fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b) * 1000 / launches)
    ts.sort()
    return ts[len(ts) // 2]

def main():
    from bench_policies import build, make_policy
    from art_runtime.policies import PolicyContext
    from art_runtime.page_scores import quest_page_scores
    from art_runtime.selection import order_pages, VisitBuffers
    out = []
    x = torch.zeros(1, device="cuda")
    out.append(dict(name="empty", us=graph_time(lambda: empty_kernel[(1,)](x))))
    for batch in (16, 64):
        q, cache, table, meta = build(batch, 32768)
        policy = make_policy("quest", q, cache, table, batch, 32768)
        ids = [f"r{b}" for b in range(batch)]
        ctx = PolicyContext(*table, 32, 8, 16, ids)
        layout = policy.layout(ctx)
        scores = quest_page_scores(ctx, q, meta, layout.width)
        nnz = layout.row.numel()
        vb = VisitBuffers(*(torch.empty(nnz, dtype=torch.int32, device="cuda") for _ in range(3)))
        ref = order_pages(scores, ctx, layout, out=vb).clone()
        out.append(dict(batch=batch, name="scoring", us=graph_time(lambda: quest_page_scores(ctx, q, meta, layout.width))))
        out.append(dict(batch=batch, name="order_pages", us=graph_time(lambda: order_pages(scores, ctx, layout, out=vb))))
        keys = torch.empty(nnz, dtype=torch.int64, device="cuda")
        width_pow2 = 1 << (layout.width - 1).bit_length()
        for rounds, compact, sort, phys, warps in [(4,1,1,1,8),(4,1,1,0,8),(4,1,0,1,8),(3,1,1,1,8),(2,1,1,1,8),(1,1,1,1,8),(0,1,1,1,8),(0,0,1,1,8),(0,0,0,1,8),(0,0,0,0,8),(4,1,1,1,4),(4,1,1,1,16)]:
            launch = lambda: sel_variant[(scores.shape[0],)](scores, ctx.kv_indptr, layout.indptr, keys, vb.pages, ctx.kv_indices,
                ctx.kv_last_page_len, vb.phys, vb.tokens, scores.stride(0), 16, NUM_KV_HEADS=8, WIDTH_POW2=width_pow2,
                KEPT_POW2=128, PHYSICAL=bool(phys), ROUNDS=rounds, COMPACT=bool(compact), SORT=bool(sort), num_warps=warps)
            us = graph_time(launch)
            same = None
            if (rounds, compact, sort) == (4, 1, 1):
                same = bool(torch.equal(vb.pages[:nnz], ref[:nnz]))
            out.append(dict(batch=batch, name="variant", rounds=rounds, compact=compact, sort=sort, phys=phys, warps=warps, us=us, same=same))
        del q, cache, meta
        torch.cuda.empty_cache()
    for r in out:
        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}))
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "probe_sel.jsonl"), "w") as f:
        f.write(json.dumps(dict(device=torch.cuda.get_device_name())) + "\n")
        for r in out:
            f.write(json.dumps(r) + "\n")

if __name__ == "__main__":
    main()
