"""Dense-order selection (KEEP_ALL): the shipped kernel against a probe sorting 32-bit keys
(the float order key's top WIDTH-free bits | position) at several warp counts. CUDA graphs, L2 flushed."""
import sys, torch, triton, triton.language as tl
sys.path.insert(0, "benchmarks")
from common import median_time_us, as_cuda_graph, L2Flusher
flusher = L2Flusher()
def timed(fn):
    fn()
    graph, _ = as_cuda_graph(fn)
    return median_time_us(graph, 50, flusher)
from art_runtime.kernels.page_selection import select_top_pages_kernel, float_order

@triton.jit
def sort32_kernel(scores_ptr, kv_indptr_ptr, pages_ptr, stride_sr,
                  NUM_KV_HEADS: tl.constexpr, WIDTH_POW2: tl.constexpr, POS_BITS: tl.constexpr, KEY64: tl.constexpr):
    row = tl.program_id(0)
    request = row // NUM_KV_HEADS
    num_pages = tl.load(kv_indptr_ptr + request + 1) - tl.load(kv_indptr_ptr + request)
    pos = tl.arange(0, WIDTH_POW2)
    present = pos < num_pages
    score = tl.load(scores_ptr + row * stride_sr + pos, mask=present, other=float("-inf"))
    score = tl.minimum(score, 3.4028232635611926e38)
    score = tl.where(pos == num_pages - 1, 3.4028234663852886e38, score)
    ordered = float_order(tl.where(pos == 0, float("inf"), score))
    if KEY64:
        key = tl.where(present, (ordered.to(tl.int64) << 32) | (WIDTH_POW2 - 1 - pos).to(tl.int64), -9223372036854775808)
        chosen = tl.sort(key, descending=True)
        page = (WIDTH_POW2 - 1 - (chosen & 0xFFFFFFFF)).to(tl.int32)
    else:
        key = tl.where(present, ((ordered >> POS_BITS) << POS_BITS) | (WIDTH_POW2 - 1 - pos), -2147483648)
        chosen = tl.sort(key, descending=True)
        page = (WIDTH_POW2 - 1 - (chosen & (WIDTH_POW2 - 1))).to(tl.int32)
    tl.store(pages_ptr + row * WIDTH_POW2 + pos, page)

torch.manual_seed(0)
for rows, npages, hkv in ((128, 1021, 2), (192, 509, 3), (512, 2048, 8), (128, 2048, 8)):
    B = rows // hkv
    indptr = torch.arange(0, (B + 1) * npages, npages, device="cuda", dtype=torch.int32)
    w = triton.next_power_of_2(npages)
    scores = torch.randn(rows, w, device="cuda")
    out = torch.empty(rows * w, dtype=torch.int32, device="cuda")
    sel_indptr = torch.arange(0, (rows + 1) * npages, npages, device="cuda", dtype=torch.int32)
    keys = torch.empty(rows, 2 * w, dtype=torch.int64, device="cuda")
    pages = torch.empty(rows * npages, dtype=torch.int32, device="cuda")
    last = torch.full((B,), 16, dtype=torch.int32, device="cuda")
    indices = torch.arange(B * npages, dtype=torch.int32, device="cuda")
    phys = torch.empty_like(pages); toks = torch.empty_like(pages)
    warps0 = min(16, max(4, w // 256))
    shipped = lambda: select_top_pages_kernel[(rows,)](scores, indptr, sel_indptr, keys, pages, indices, last, phys, toks,
        pages, scores.stride(0), 16, NUM_KV_HEADS=hkv, WIDTH_POW2=w, KEPT_POW2=w, EDGE=64, KEEP_ALL=True,
        PHYSICAL=True, SLOTS=False, num_warps=warps0)
    res = [f"rows {rows} pages {npages}: shipped ({warps0} warps) {timed(shipped):6.1f}"]
    for key64 in (True, False):
        for warps in (4, 8, 16):
            fn = lambda: sort32_kernel[(rows,)](scores, indptr, out, scores.stride(0), NUM_KV_HEADS=hkv, WIDTH_POW2=w,
                                               POS_BITS=(w - 1).bit_length(), KEY64=key64, num_warps=warps)
            res.append(f"{'k64' if key64 else 'k32'}/{warps}w {timed(fn):6.1f}")
    print(" | ".join(res), flush=True)
