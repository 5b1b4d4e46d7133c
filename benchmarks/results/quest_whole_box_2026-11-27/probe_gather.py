"""Probe: how fast can the Quest boxes be gathered at all (H100/H200, CUDA graphs of 20, 32K)?
G64: [TILE, 64] slices of kmin and kmax per (row, tile) (the scoring kernel's pattern);
G256: a page-head's whole 256 B box in one [TILE, 256] load; GALL: all heads of a page (2 KB
contiguous) per (request, tile); COPY: torch copy of the box tensor (read + write)."""
import json, os, sys
import torch, triton, triton.language as tl
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".whl")
from probe_sel import graph_time


@triton.jit
def gather_kernel(box_ptr, kv_indptr_ptr, kv_indices_ptr, out_ptr, width, stride_mp, stride_mh,
                  NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, TILE: tl.constexpr,
                  ALL_HEADS: tl.constexpr):
    if ALL_HEADS:
        request = tl.program_id(0)
        row0 = request * NUM_KV_HEADS
    else:
        row0 = tl.program_id(0)
        request = row0 // NUM_KV_HEADS
    first = tl.load(kv_indptr_ptr + request)
    num_pages = tl.load(kv_indptr_ptr + request + 1) - first
    pages = tl.program_id(1) * TILE + tl.arange(0, TILE)
    ok = pages < num_pages
    phys = tl.load(kv_indices_ptr + first + pages, mask=ok, other=0).to(tl.int64)
    acc = tl.zeros([TILE], tl.float32)
    if ALL_HEADS:
        for c in range(0, NUM_KV_HEADS * 2 * HEAD_DIM, CHUNK):
            x = tl.load(box_ptr + phys[:, None] * stride_mp + c + tl.arange(0, CHUNK)[None, :], mask=ok[:, None], other=0.0)
            acc += tl.sum(x.to(tl.float32), 1)
    else:
        head = row0 % NUM_KV_HEADS
        for c in range(0, 2 * HEAD_DIM, CHUNK):
            x = tl.load(box_ptr + phys[:, None] * stride_mp + head * stride_mh + c + tl.arange(0, CHUNK)[None, :],
                        mask=ok[:, None], other=0.0)
            acc += tl.sum(x.to(tl.float32), 1)
    tl.store(out_ptr + row0 * width + pages, acc, mask=ok)


def main():
    from bench_policies import build
    out = [dict(device=torch.cuda.get_device_name())]
    for batch in (16, 64):
        q, cache, table, meta = build(batch, 32768)
        del cache
        torch.cuda.empty_cache()
        kv_indptr, kv_indices, _ = table
        boxes = meta.key_min.view(torch.uint8)  # [P, H, D] view of [P, H, 2, D]
        base = torch.as_strided(meta.key_min, (meta.key_min.shape[0], 8, 256), (meta.key_min.stride(0), meta.key_min.stride(1), 1))
        width = 2048
        res = torch.empty(batch * 8, width, device="cuda")
        nbytes = batch * 2048 * 8 * 256
        floor_copy = None
        dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        src = base.reshape(-1).view(torch.uint8)[:nbytes] if base.is_contiguous() else None
        flat = torch.as_strided(meta.key_min.view(torch.uint8), (nbytes,), (1,))
        out.append(dict(batch=batch, name="copy (read+write)", us=graph_time(lambda: dst.copy_(flat)), mb=nbytes / 1e6))
        for all_heads, chunk, tile, warps, stages in [(0, 64, 128, 4, 3), (0, 128, 128, 4, 3), (0, 256, 128, 4, 1),
                                                      (0, 256, 64, 4, 1), (0, 256, 32, 4, 1), (1, 256, 32, 4, 3), (1, 512, 16, 4, 3),
                                                      (1, 2048, 8, 4, 1), (1, 1024, 16, 8, 2), (1, 256, 64, 8, 3)]:
            grid = (batch if all_heads else batch * 8, triton.cdiv(width, tile))
            launch = lambda: gather_kernel[grid](base, kv_indptr, kv_indices, res, width, base.stride(0), base.stride(1),
                                                 NUM_KV_HEADS=8, HEAD_DIM=128, CHUNK=chunk, TILE=tile, ALL_HEADS=all_heads,
                                                 num_warps=warps, num_stages=stages)
            rec = dict(batch=batch, all_heads=all_heads, chunk=chunk, tile=tile, warps=warps, stages=stages)
            try:
                launch(); torch.cuda.synchronize()
                rec["us"] = graph_time(launch)
            except Exception as e:
                rec["error"] = repr(e)[:300]
            out.append(rec)
        del q, meta
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "probe_gather.jsonl"), "w") as f:
        for r in out:
            line = json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()})
            print(line)
            f.write(line + "\n")


if __name__ == "__main__":
    main()
