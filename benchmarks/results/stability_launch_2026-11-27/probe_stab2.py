"""Probe (throwaway): stability's split target and warps by rows, both shapes."""
import sys, json, functools, itertools, os
sys.path.insert(0, "benchmarks")
import torch, flashinfer
from common import L2Flusher, as_cuda_graph, median_time_us
from bench_decode import make_inputs, DecodeShape, PAGE_SIZE, DTYPE
from art_runtime import BatchARTDecodeWrapper, TerminationConfig
from art_runtime import decode as D

flush = L2Flusher()
print(torch.cuda.get_device_name(), flush=True)
fi = flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"), "NHD", use_tensor_cores=True)
W = D.BatchARTDecodeWrapper
orig_pp, orig_nw = W._parallel_programs, W._num_warps
sms = torch.cuda.get_device_properties(0).multi_processor_count


def variant(pps_few, pps_many, w_few, w_many, rows_many):
    def pp(device, termination, head_dim, num_rows):
        if termination.mode != "stability":
            return orig_pp(device, termination, head_dim, num_rows)
        return (pps_many if num_rows >= rows_many else pps_few) * sms
    def nw(plan):
        if plan.termination.mode != "stability":
            return orig_nw(plan)
        if plan.head_dim > 128:
            return 4
        return w_many if plan.num_rows >= rows_many else w_few
    return pp, nw


def time_art(inp, table, layer, mode, v=None):
    if v is not None:
        pp, nw = variant(*v)
        W._parallel_programs, W._num_warps = staticmethod(pp), staticmethod(nw)
    art = BatchARTDecodeWrapper(kv_layout="NHD", backend="triton")
    art.plan(*table, *layer, termination=TerminationConfig(mode=mode))
    f = functools.partial(art.run, inp.q, inp.paged_kv_cache)
    f()
    g, _ = as_cuda_graph(f)
    us = median_time_us(g, 30, 10, flush)
    W._parallel_programs, W._num_warps = staticmethod(orig_pp), staticmethod(orig_nw)
    return round(us, 1)


variants = json.loads(os.environ["VARIANTS"])
for shape in os.environ.get("SHAPES", "14/2/64 32/8/128").split():
    s = DecodeShape.parse(shape)
    for batch, kv in itertools.product([int(b) for b in os.environ.get("BATCHES", "1 4 16 64 128").split()],
                                       [int(k) for k in os.environ.get("KVS", "4096 16384 32768").split()]):
        inp = make_inputs(s, batch, kv)
        table = (inp.kv_indptr, inp.kv_indices, inp.kv_last_page_len)
        layer = (s.num_qo_heads, s.num_kv_heads, s.head_dim, PAGE_SIZE)
        fi.plan(*table, *layer, q_data_type=DTYPE, kv_data_type=DTYPE)
        gf, _ = as_cuda_graph(functools.partial(fi.run, inp.q, inp.paged_kv_cache))
        res = dict(shape=shape, batch=batch, kv=kv, fi=round(median_time_us(gf, 30, 10, flush), 1),
                   off=time_art(inp, table, layer, "off"), stab=time_art(inp, table, layer, "stability"))
        for name, v in variants.items():
            res[name] = time_art(inp, table, layer, "stability", v)
        res.update({k + "_r": round(v / res["off"], 3) for k, v in list(res.items()) if k not in ("shape", "batch", "kv", "fi", "off")})
        print(json.dumps(res), flush=True)
