"""Probe (throwaway): mode mass's decode kernel on random data (nothing stops), for ncu."""
import sys
sys.path.insert(0, "benchmarks")
import torch
from bench_decode import make_inputs, DecodeShape, PAGE_SIZE
from art_runtime import BatchARTDecodeWrapper, TerminationConfig, PageMetadata

mode = sys.argv[1] if len(sys.argv) > 1 else "mass"
s = DecodeShape.parse("14/2/64")
inp = make_inputs(s, 64, 32768)
table = (inp.kv_indptr, inp.kv_indices, inp.kv_last_page_len)
meta = PageMetadata.from_cache(inp.paged_kv_cache, *table, kv_layout="NHD")
art = BatchARTDecodeWrapper(kv_layout="NHD", backend="triton")
art.plan(*table, s.num_qo_heads, s.num_kv_heads, s.head_dim, PAGE_SIZE, termination=TerminationConfig(mode=mode))
for _ in range(4):
    art.run(inp.q, inp.paged_kv_cache, page_meta=meta)
torch.cuda.synchronize()
print(mode, art._plan.num_work, art.last_stats.visited_pages.float().mean().item())
