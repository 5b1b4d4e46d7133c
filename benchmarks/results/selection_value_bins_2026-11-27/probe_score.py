"""Probe: Quest scoring with one program per (request, page tile) over all KV heads (a page's
boxes of all heads are contiguous: 2 KB at D = 128) against the shipped per-(row, tile) kernel;
and the new selection against the old radix select, in CUDA graphs of 20 launches."""
import json, os, sys
import torch, triton, triton.language as tl
sys.path.insert(0, "benchmarks"); sys.path.insert(0, os.path.dirname(__file__))
from art_runtime.kernels.page_scoring import box_upper_bound
from probe_sel import graph_time, sel_variant


@triton.jit
def quest_all_heads_kernel(q_ptr, key_min_ptr, key_max_ptr, key_scale_ptr, kv_indptr_ptr, kv_indices_ptr, scores_ptr,
                           width, stride_qb, stride_qh, stride_mp, stride_mh, stride_sp,
                           NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr, STATIC: tl.constexpr):
    request = tl.program_id(0)
    first = tl.load(kv_indptr_ptr + request)
    num_pages = tl.load(kv_indptr_ptr + request + 1) - first
    pages = tl.program_id(1) * TILE + tl.arange(0, TILE)
    ok = pages < num_pages
    g_ok = tl.arange(0, GROUP_PAD) < GROUP_SIZE
    phys = tl.load(kv_indices_ptr + first + pages, mask=ok, other=0).to(tl.int64)
    if STATIC:
        for head in tl.static_range(NUM_KV_HEADS):
            scale = tl.load(key_scale_ptr + phys * stride_sp + head, mask=ok, other=0.0)
            ub = box_upper_bound(q_ptr, key_min_ptr, key_max_ptr, phys, ok, request, head, stride_qb, stride_qh,
                                 stride_mp, stride_mh, GROUP_SIZE, GROUP_PAD, HEAD_DIM, BLOCK_D, TILE, True) * scale[None, :]
            score = tl.max(tl.where(g_ok[:, None], ub, float("-inf")), 0)
            tl.store(scores_ptr + (request * NUM_KV_HEADS + head) * width + pages, tl.where(ok, score, float("-inf")),
                     mask=pages < width)
    else:
        for head in range(NUM_KV_HEADS):
            scale = tl.load(key_scale_ptr + phys * stride_sp + head, mask=ok, other=0.0)
            ub = box_upper_bound(q_ptr, key_min_ptr, key_max_ptr, phys, ok, request, head, stride_qb, stride_qh,
                                 stride_mp, stride_mh, GROUP_SIZE, GROUP_PAD, HEAD_DIM, BLOCK_D, TILE, True) * scale[None, :]
            score = tl.max(tl.where(g_ok[:, None], ub, float("-inf")), 0)
            tl.store(scores_ptr + (request * NUM_KV_HEADS + head) * width + pages, tl.where(ok, score, float("-inf")),
                     mask=pages < width)


def main():
    from bench_policies import build, make_policy
    from art_runtime.policies import PolicyContext
    from art_runtime.page_scores import quest_page_scores
    from art_runtime.selection import order_pages, VisitBuffers
    from art_runtime.plan import group_tile
    out = []
    for batch in (16, 64):
        q, cache, table, meta = build(batch, 32768)
        policy = make_policy("quest", q, cache, table, batch, 32768)
        ids = [f"r{b}" for b in range(batch)]
        ctx = PolicyContext(*table, 32, 8, 16, ids)
        layout = policy.layout(ctx)
        scores = quest_page_scores(ctx, q, meta, layout.width)
        out.append(dict(batch=batch, name="scoring shipped", us=graph_time(lambda: quest_page_scores(ctx, q, meta, layout.width))))
        mine = torch.empty_like(scores)
        for tile, static, stages, warps, block_d in [(16, 0, 2, 4, 64), (16, 0, 3, 4, 64), (32, 0, 2, 4, 64), (32, 0, 3, 4, 64),
                                                     (64, 0, 2, 4, 64), (32, 1, 2, 4, 64), (16, 1, 2, 4, 64), (32, 0, 3, 4, 128),
                                                     (16, 0, 4, 4, 128), (64, 0, 3, 8, 64)]:
            launch = lambda: quest_all_heads_kernel[(batch, triton.cdiv(layout.width, tile))](
                q, meta.key_min, meta.key_max, meta.key_scale, ctx.kv_indptr, ctx.kv_indices, mine, layout.width,
                q.stride(0), q.stride(1), meta.key_min.stride(0), meta.key_min.stride(1), meta.key_scale.stride(0),
                NUM_KV_HEADS=8, GROUP_SIZE=4, GROUP_PAD=group_tile(4), HEAD_DIM=128, BLOCK_D=block_d, TILE=tile,
                STATIC=bool(static), num_warps=warps, num_stages=stages)
            try:
                mine.fill_(float("nan"))
                launch()
                same = bool(torch.equal(mine, scores))
                us = graph_time(launch)
            except Exception as e:  # a configuration the compiler rejects
                us, same = None, repr(e)[:200]
            out.append(dict(batch=batch, name="scoring all heads", tile=tile, static=static, stages=stages, warps=warps,
                            block_d=block_d, us=us, same=same))
        nnz = layout.row.numel()
        vb = VisitBuffers(*(torch.empty(nnz, dtype=torch.int32, device="cuda") for _ in range(3)))
        keys = torch.empty(nnz, dtype=torch.int64, device="cuda")
        old = lambda: sel_variant[(scores.shape[0],)](scores, ctx.kv_indptr, layout.indptr, keys, vb.pages, ctx.kv_indices,
            ctx.kv_last_page_len, vb.phys, vb.tokens, scores.stride(0), 16, NUM_KV_HEADS=8, WIDTH_POW2=2048,
            KEPT_POW2=128, PHYSICAL=True, ROUNDS=4, COMPACT=True, SORT=True, num_warps=8)
        old()
        ref = [t.clone() for t in (vb.pages, vb.phys, vb.tokens)]
        vb2 = VisitBuffers(*(torch.full((nnz,), -1, dtype=torch.int32, device="cuda") for _ in range(3)))
        order_pages(scores, ctx, layout, out=vb2)
        same = all(torch.equal(a, b) for a, b in zip(ref, (vb2.pages, vb2.phys, vb2.tokens)))
        out.append(dict(batch=batch, name="selection old (radix)", us=graph_time(old)))
        out.append(dict(batch=batch, name="selection new (value bins)", us=graph_time(lambda: order_pages(scores, ctx, layout, out=vb2)), same=same))
        del q, cache, meta
        torch.cuda.empty_cache()
    for r in out:
        print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}))
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "probe_score.jsonl"), "w") as f:
        f.write(json.dumps(dict(device=torch.cuda.get_device_name())) + "\n")
        for r in out:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
