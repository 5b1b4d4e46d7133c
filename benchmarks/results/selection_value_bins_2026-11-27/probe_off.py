"""Probe: does building page metadata slow mode off? (32/8/128, batch 64 / 32K)"""
import functools, json, os, sys
import torch
sys.path.insert(0, "benchmarks")
from bench_decode import make_inputs, DecodeShape, PAGE_SIZE, DTYPE
from common import L2Flusher, as_cuda_graph, median_time_us
from art_runtime import BatchARTDecodeWrapper, TerminationConfig, PageMetadata

shape = DecodeShape.parse(sys.argv[1] if len(sys.argv) > 1 else "32/8/128")
inputs = make_inputs(shape, 64, 32768)
table = (inputs.kv_indptr, inputs.kv_indices, inputs.kv_last_page_len)
flush = L2Flusher()
def off_us(label, times=1):
    art = BatchARTDecodeWrapper(kv_layout="NHD", backend="triton")
    art.plan(*table, shape.num_qo_heads, shape.num_kv_heads, shape.head_dim, PAGE_SIZE, termination=TerminationConfig(mode="off"))
    run = functools.partial(art.run, inputs.q, inputs.paged_kv_cache)
    eager = run()
    replay, _ = as_cuda_graph(run)
    for t in range(times):
        us = median_time_us(replay, 30, 5, flush)
        print(json.dumps(dict(label=label, timing=t, us=round(us, 1), out_ptr=hex(eager.data_ptr()),
                              allocated_gb=round(torch.cuda.memory_allocated() / 1e9, 2))), flush=True)
    return art
off_us("before")
meta = PageMetadata.from_cache(inputs.paged_kv_cache, *table, kv_layout="NHD")
torch.cuda.synchronize()
torch.cuda.empty_cache()
off_us("metadata built, then empty_cache")
del meta
meta = PageMetadata.from_cache(inputs.paged_kv_cache, *table, kv_layout="NHD")
torch.cuda.synchronize()
for _ in range(2000):
    flush()
torch.cuda.synchronize()
off_us("metadata built, then 2000 L2 flushes")
del meta
meta = PageMetadata.from_cache(inputs.paged_kv_cache, *table, kv_layout="NHD")
torch.cuda.synchronize()
off_us("metadata built, nothing else", times=2)
