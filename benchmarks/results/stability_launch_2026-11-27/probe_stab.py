"""Probe (throwaway): stability launch/split variants against off and FlashInfer."""
import sys, json, functools, itertools, os
sys.path.insert(0, "benchmarks")
import torch, flashinfer
from common import L2Flusher, as_cuda_graph, median_time_us
from bench_decode import make_inputs, DecodeShape, PAGE_SIZE, DTYPE
from art_runtime import BatchARTDecodeWrapper, TerminationConfig
from art_runtime import decode as D, plan as P

flush = L2Flusher()
print(torch.cuda.get_device_name(), flush=True)
fi = flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"), "NHD", use_tensor_cores=True)
orig_choose = P.choose_chunk_pages


def with_min_blocks(mb):
    def choose(longest_row, num_rows, block_pages, parallel_programs, terminates):
        if not terminates or mb is None:
            return orig_choose(longest_row, num_rows, block_pages, parallel_programs, terminates)
        splits = min(round(parallel_programs / num_rows), P.MAX_CHUNKS_PER_ROW) if num_rows else 1
        if splits <= 1:
            return max(longest_row, 1)
        import math
        return max(mb * block_pages, math.ceil(longest_row / splits))
    return choose


def time_art(inp, table, layer, mode, warps=None, stages=None, pps=2, spps=8, mb=None):
    D.NUM_WARPS, D.NUM_STAGES, D.PROGRAMS_PER_SM, D.STABILITY_PROGRAMS_PER_SM = warps, stages, pps, spps
    P.choose_chunk_pages = with_min_blocks(mb)
    art = BatchARTDecodeWrapper(kv_layout="NHD", backend="triton")
    art.plan(*table, *layer, termination=TerminationConfig(mode=mode))
    f = functools.partial(art.run, inp.q, inp.paged_kv_cache)
    f()
    st = art.last_stats
    g, _ = as_cuda_graph(f)
    us = median_time_us(g, 30, 10, flush)
    P.choose_chunk_pages = orig_choose
    return round(us, 1), art._plan.num_work, round(float(st.pages_read_fraction) if hasattr(st, "pages_read_fraction") else -1, 3)


shapes = os.environ.get("SHAPES", "14/2/64").split()
batches = [int(b) for b in os.environ.get("BATCHES", "1 4 16 64 128").split()]
kvs = [int(k) for k in os.environ.get("KVS", "4096 32768").split()]
variants = json.loads(os.environ["VARIANTS"])
for shape in shapes:
    s = DecodeShape.parse(shape)
    for batch, kv in itertools.product(batches, kvs):
        inp = make_inputs(s, batch, kv)
        table = (inp.kv_indptr, inp.kv_indices, inp.kv_last_page_len)
        layer = (s.num_qo_heads, s.num_kv_heads, s.head_dim, PAGE_SIZE)
        fi.plan(*table, *layer, q_data_type=DTYPE, kv_data_type=DTYPE)
        gf, _ = as_cuda_graph(functools.partial(fi.run, inp.q, inp.paged_kv_cache))
        res = dict(shape=shape, batch=batch, kv=kv, fi=round(median_time_us(gf, 30, 10, flush), 1),
                   off=time_art(inp, table, layer, "off")[:2])
        for name, v in variants.items():
            if v.get("max_batch", 1 << 20) < batch:
                continue
            kw = {k: v[k] for k in v if k != "max_batch"}
            res[name] = time_art(inp, table, layer, "stability", **kw)[:2]
        print(json.dumps(res), flush=True)
