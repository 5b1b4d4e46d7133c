"""Probe: Quest scoring with each page's whole box (kmin | kmax, 2 * D bytes contiguous) in one
load and one dot over K = 2 * D, against the shipped kernel (64-dim slices of kmin and kmax)."""
import json, os, sys
import torch, triton, triton.language as tl
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".whl")
from art_runtime.kernels.page_scoring import _fp16_row_scale
from probe_sel import graph_time


@triton.jit
def whole_box_kernel(q_ptr, box_ptr, key_scale_ptr, kv_indptr_ptr, kv_indices_ptr, scores_ptr,
                     width, stride_qb, stride_qh, stride_mp, stride_mh, stride_sp,
                     NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
                     HEAD_DIM: tl.constexpr, TILE: tl.constexpr, BOX_A: tl.constexpr, TILES: tl.constexpr = 1,
                     STAGES: tl.constexpr = 1):
    row = tl.program_id(0)
    request = row // NUM_KV_HEADS
    head = row % NUM_KV_HEADS
    first = tl.load(kv_indptr_ptr + request)
    num_pages = tl.load(kv_indptr_ptr + request + 1) - first
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP_SIZE
    c = tl.arange(0, 2 * HEAD_DIM)
    is_max = c >= HEAD_DIM
    q = tl.load(q_ptr + request * stride_qb + (head * GROUP_SIZE + g)[:, None] * stride_qh
                + tl.where(is_max, c - HEAD_DIM, c)[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
    q = tl.where(is_max[None, :], tl.maximum(q, 0.0), tl.minimum(q, 0.0))
    q_scale, q_unscale = _fp16_row_scale(q, 14)
    q = (q * q_scale[:, None]).to(tl.float16)
    for t in tl.range(0, TILES, num_stages=STAGES):
        pages = (tl.program_id(1) * TILES + t) * TILE + tl.arange(0, TILE)
        ok = pages < num_pages
        phys = tl.load(kv_indices_ptr + first + pages, mask=ok, other=0).to(tl.int64)
        scale = tl.load(key_scale_ptr + phys * stride_sp + head, mask=ok, other=0.0)
        box = tl.load(box_ptr + phys[:, None] * stride_mp + head * stride_mh + c[None, :], mask=ok[:, None], other=0.0)
        if BOX_A:
            ub = tl.dot(box.to(tl.float16), tl.trans(q)) * q_unscale[None, :] * scale[:, None]
            score = tl.max(tl.where(g_ok[None, :], ub, float("-inf")), 1)
        else:
            ub = tl.dot(q, tl.trans(box.to(tl.float16))) * q_unscale[:, None] * scale[None, :]
            score = tl.max(tl.where(g_ok[:, None], ub, float("-inf")), 0)
        tl.store(scores_ptr + row * width + pages, tl.where(ok, score, float("-inf")), mask=pages < width)


def main():
    from bench_policies import build
    from art_runtime.policies import PolicyContext
    from art_runtime.page_scores import quest_page_scores
    from art_runtime.plan import group_tile
    out = [dict(device=torch.cuda.get_device_name())]
    for batch in (16, 64):
        q, cache, table, meta = build(batch, 32768)
        del cache
        torch.cuda.empty_cache()
        ctx = PolicyContext(*table, 32, 8, 16, [f"r{b}" for b in range(batch)])
        width = 2048
        ref = quest_page_scores(ctx, q, meta, width)
        out.append(dict(batch=batch, name="shipped", us=graph_time(lambda: quest_page_scores(ctx, q, meta, width))))
        mine = torch.empty_like(ref)
        for box_a, tile, warps, tiles, stages in [(0, 128, 4, 1, 1), (1, 64, 2, 1, 1), (0, 32, 4, 4, 2), (0, 32, 4, 4, 3),
                                                  (0, 64, 4, 2, 2), (0, 64, 4, 4, 2), (0, 64, 4, 4, 3), (0, 32, 4, 8, 3),
                                                  (0, 128, 4, 2, 2), (0, 128, 4, 4, 2), (1, 64, 2, 4, 2), (1, 64, 4, 4, 3),
                                                  (0, 32, 2, 8, 3), (0, 16, 4, 8, 3)]:
            launch = lambda: whole_box_kernel[(ctx.num_rows, triton.cdiv(width, tile * tiles))](
                q, meta.key_min, meta.key_scale, ctx.kv_indptr, ctx.kv_indices, mine, width,
                q.stride(0), q.stride(1), meta.key_min.stride(0), meta.key_min.stride(1), meta.key_scale.stride(0),
                NUM_KV_HEADS=8, GROUP_SIZE=4, GROUP_PAD=group_tile(4), HEAD_DIM=128, TILE=tile, BOX_A=box_a, TILES=tiles, STAGES=stages,
                num_warps=warps, num_stages=1)
            rec = dict(batch=batch, box_a=box_a, tile=tile, warps=warps, tiles=tiles, stages=stages)
            try:
                mine.fill_(float("nan"))
                launch()
                torch.cuda.synchronize()
                err = ((mine - ref).abs() / ref.abs().clamp(min=1e-6))
                rec.update(same=bool(torch.equal(mine, ref)), max_rel=float(err.max()),
                           top_overlap=float((torch.topk(mine, 128, 1).indices.sort(1).values ==
                                              torch.topk(ref, 128, 1).indices.sort(1).values).float().mean()))
                rec["us"] = graph_time(launch)
            except Exception as e:
                rec["error"] = repr(e)[:300]
            out.append(rec)
        del q, meta
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "probe_box.jsonl"), "w") as f:
        for r in out:
            line = json.dumps({k: (round(v, 8) if isinstance(v, float) else v) for k, v in r.items()})
            print(line)
            f.write(line + "\n")


if __name__ == "__main__":
    main()
