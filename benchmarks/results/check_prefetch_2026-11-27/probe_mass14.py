"""Probe (throwaway): where mode mass's time goes over off (random data: nothing stops)."""
import sys, json, functools, collections, os
sys.path.insert(0, "benchmarks")
import torch
from torch.profiler import profile, ProfilerActivity
from common import L2Flusher, as_cuda_graph, median_time_us
from bench_decode import make_inputs, DecodeShape, PAGE_SIZE
from art_runtime import BatchARTDecodeWrapper, TerminationConfig, PageMetadata
from art_runtime import decode as D

flush = L2Flusher()
print(torch.cuda.get_device_name(), flush=True)


def kernels(g):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            flush(); g()
        torch.cuda.synchronize()
    agg = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type.name == "CUDA" and not e.name.startswith(("reduce", "Memcpy", "void at::native::vectorized")):
            agg[e.name[:28]] += e.device_time / 5
    return {k: round(v, 1) for k, v in agg.items()}


for shape, batch, kv in [("14/2/64", 16, 32768), ("14/2/64", 64, 32768), ("32/8/128", 64, 32768)]:
    s = DecodeShape.parse(shape)
    inp = make_inputs(s, batch, kv)
    table = (inp.kv_indptr, inp.kv_indices, inp.kv_last_page_len)
    layer = (s.num_qo_heads, s.num_kv_heads, s.head_dim, PAGE_SIZE)
    meta = PageMetadata.from_cache(inp.paged_kv_cache, *table, kv_layout="NHD")
    res = dict(shape=shape, batch=batch, kv=kv)
    for name, mode, warps, stages in [("off", "off", None, None), ("mass", "mass", None, None),
                                      ("mass w8", "mass", 8, None), ("mass s2", "mass", None, 2),
                                      ("mass s4", "mass", None, 4), ("mass w2", "mass", 2, None)]:
        D.NUM_WARPS, D.NUM_STAGES = warps, stages
        art = BatchARTDecodeWrapper(kv_layout="NHD", backend="triton")
        art.plan(*table, *layer, termination=TerminationConfig(mode=mode))
        f = functools.partial(art.run, inp.q, inp.paged_kv_cache, page_meta=meta if mode != "off" else None)
        f()
        g, _ = as_cuda_graph(f)
        res[name] = round(median_time_us(g, 30, 10, flush), 1)
        if warps is None and stages is None:
            res[name + " kernels"] = kernels(g)
            res[name + " work"] = art._plan.num_work
    D.NUM_WARPS, D.NUM_STAGES = None, None
    print(json.dumps(res), flush=True)
