"""Probe: the selection kernel at 4 / 8 / 16 warps (Quest at 32K keeping 128 of 2048 pages), graphs of 20."""
import json, os, sys
import torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".whl")
from probe_sel import graph_time


def main():
    from bench_policies import build, make_policy
    from art_runtime.policies import PolicyContext
    from art_runtime.page_scores import quest_page_scores
    from art_runtime.selection import SELECTION_EDGE, VisitBuffers, order_pages
    from art_runtime.kernels.page_selection import select_top_pages_kernel
    out = [dict(device=torch.cuda.get_device_name())]
    for batch in (16, 64):
        q, cache, table, meta = build(batch, 32768)
        del cache
        torch.cuda.empty_cache()
        policy = make_policy("quest", q, None, table, batch, 32768)
        ctx = PolicyContext(*table, 32, 8, 16, [f"r{b}" for b in range(batch)])
        layout = policy.layout(ctx)
        scores = quest_page_scores(ctx, q, meta, layout.width)
        nnz = layout.row.numel()
        ref = VisitBuffers(*(torch.full((nnz,), -1, dtype=torch.int32, device="cuda") for _ in range(3)))
        order_pages(scores, ctx, layout, out=ref)
        width_pow2 = 1 << (layout.width - 1).bit_length()
        kept_pow2 = max(16, 1 << (layout.kept - 1).bit_length())
        keys = torch.empty(scores.shape[0] * (kept_pow2 + SELECTION_EDGE), dtype=torch.int64, device="cuda")
        for warps in (4, 8, 16):
            vb = VisitBuffers(*(torch.full((nnz,), -1, dtype=torch.int32, device="cuda") for _ in range(3)))
            launch = lambda: select_top_pages_kernel[(scores.shape[0],)](
                scores, ctx.kv_indptr, layout.indptr, keys, vb.pages, ctx.kv_indices, ctx.kv_last_page_len, vb.phys,
                vb.tokens, scores.stride(0), ctx.page_size, NUM_KV_HEADS=8, WIDTH_POW2=width_pow2, KEPT_POW2=kept_pow2,
                EDGE=SELECTION_EDGE, KEEP_ALL=False, PHYSICAL=True, num_warps=warps)
            launch(); torch.cuda.synchronize()
            same = all(torch.equal(getattr(ref, n), getattr(vb, n)) for n in ("pages", "phys", "tokens"))
            out.append(dict(batch=batch, warps=warps, us=graph_time(launch), same=same))
        del q, meta
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "probe_selwarps.jsonl"), "w") as f:
        for r in out:
            line = json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()})
            print(line); f.write(line + "\n")


if __name__ == "__main__":
    main()
