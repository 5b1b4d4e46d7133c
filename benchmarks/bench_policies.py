"""Page-selection policies with and without ART termination, against FlashInfer dense decode.

For each (batch, kv_len) row: FlashInfer's dense decode, then every policy's decode time
with termination ``off`` and with ART (``stability`` at the defaults, ``bound`` relative to
the values and ``mass``), and the cost of Quest's scoring and selection alone (the metadata
scoring kernel and the selection kernel, each also timed alone, and what they add to a decode
step) next to dense decode. bf16, page size 16, random data
with shuffled pages: on random keys attention is diffuse, so termination rarely fires; this
measures what each policy and the termination bookkeeping cost, not what termination saves
(see benchmarks/visit_order.py for real attention). Times are CUDA-graph replays, as in
bench_decode.py (per-layer policies select inside the graph).

Usage: python bench_policies.py [--batches 16 64] [--kv-lens 16384 32768] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from common import L2Flusher, as_cuda_graph, copy_bandwidth_tbps, device_info, markdown_table, median_time_us, utc_now, write_results

PAGE_SIZE = 16
DTYPE = torch.bfloat16
SHAPE = (32, 8, 128)
BUDGET = 128  # pages per (request, KV head) for the budgeted policies: 2048 tokens
POLICIES = {
    "dense (recency)": ("dense", dict(order="recency")),
    "dense (quest order)": ("dense", dict(order="quest")),
    "dense (mass order)": ("dense", dict(order="mass")),
    "streaming_llm": ("streaming_llm", dict(sink_pages=1, window_pages=BUDGET - 1)),
    "quest": ("quest", dict(budget=BUDGET)),
    "h2o": ("h2o", dict(budget=BUDGET, recent_pages=8)),
    "snapkv": ("snapkv", dict(budget=BUDGET, window=32)),
}
COLUMNS = [("batch", "batch", "d"), ("kv_len", "kv_len", "d"), ("policy", "policy", "s"), ("mode", "mode", "s"),
           ("pages read", "visited_fraction", ".3f"), ("µs", "us", ".1f"), ("FI dense µs", "flashinfer_us", ".1f"),
           ("vs FI dense", "speedup_vs_flashinfer", ".2f"), ("vs same policy off", "speedup_vs_off", ".2f")]


def build(batch, kv_len):
    from art_runtime import PageMetadata
    from art_runtime.paged_cache import allocate_paged_kv_cache

    hq, hk, dim = SHAPE
    pages = -(-kv_len // PAGE_SIZE)
    cache = allocate_paged_kv_cache(batch * pages, PAGE_SIZE, hk, dim, dtype=DTYPE, device="cuda")
    cache.normal_()
    kv_indptr = torch.arange(0, batch * pages + 1, pages, dtype=torch.int32, device="cuda")
    kv_indices = torch.randperm(batch * pages, device="cuda").int()
    kv_last = torch.full((batch,), kv_len - (pages - 1) * PAGE_SIZE, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, dim, dtype=DTYPE, device="cuda")
    meta = PageMetadata.from_cache(cache, kv_indptr, kv_indices, kv_last)
    return q, cache, (kv_indptr, kv_indices, kv_last), meta


def make_policy(label, q, cache, table, batch, kv_len):
    from art_runtime.paged_cache import gather_request_kv
    from art_runtime.policies import get

    name, kwargs = POLICIES[label]
    policy = get(name, **kwargs)
    if hasattr(policy, "prefill"):  # SnapKV votes with the prompt's last queries
        for b in range(batch):
            keys, _ = gather_request_kv(cache, *table, b)
            queries = q[b:b + 1].expand(kv_len, -1, -1)
            policy.prefill(f"r{b}", 0, queries, keys, PAGE_SIZE)
    return policy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--kv-lens", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES), metavar="POLICY",
                        help=f"policies to time (default all: {', '.join(POLICIES)})")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    import flashinfer

    from art_runtime import BatchARTDecodeWrapper, PageSelection, TerminationConfig
    from art_runtime.page_scores import quest_page_scores
    from art_runtime.policies import PolicyContext
    from art_runtime.selection import order_pages

    started, device = utc_now(), device_info()
    copy_tbps, flush = copy_bandwidth_tbps(), L2Flusher()
    hq, hk, dim = SHAPE
    modes = {"off": TerminationConfig(mode="off"), "stability": TerminationConfig(mode="stability"),
             "bound": TerminationConfig(mode="bound", relative_to="values"), "mass": TerminationConfig(mode="mass")}
    fi = flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"),
                                                       "NHD", use_tensor_cores=True)
    rows, scoring = [], []
    for batch in args.batches:
        for kv_len in args.kv_lens:
            q, cache, table, meta = build(batch, kv_len)
            fi.plan(*table, hq, hk, dim, PAGE_SIZE, q_data_type=DTYPE, kv_data_type=DTYPE)
            fi_us = median_time_us(as_cuda_graph(lambda: fi.run(q, cache))[0], args.iters, flush)
            ids = [f"r{b}" for b in range(batch)]
            off_us = {}
            for label in tqdm(args.policies, desc=f"batch {batch} kv {kv_len}"):
                for mode, termination in modes.items():
                    policy = make_policy(label, q, cache, table, batch, kv_len)
                    wrapper = BatchARTDecodeWrapper(backend="triton")
                    wrapper.plan(*table, hq, hk, dim, PAGE_SIZE, termination=termination, policy=policy,
                                 request_ids=ids)
                    replay, graphed = as_cuda_graph(lambda: wrapper.run(q, cache, page_meta=meta))
                    us = median_time_us(replay, args.iters, flush)
                    stats = wrapper.last_stats
                    off_us.setdefault(label, us)
                    rows.append(dict(batch=batch, kv_len=kv_len, policy=label, mode=mode, us=us, flashinfer_us=fi_us,
                                     graphed=graphed, speedup_vs_flashinfer=fi_us / us, speedup_vs_off=off_us[label] / us,
                                     visited_fraction=float(stats.visited_pages.sum() / (batch * hk * (-(-kv_len // PAGE_SIZE))))))
            # Quest's scoring and selection alone (each graph pays one replay's launch), and what
            # they add to a decode step: Quest's decode with the selection inside it, less the same
            # decode with that selection fixed at plan time.
            policy = make_policy("quest", q, cache, table, batch, kv_len)
            ctx = PolicyContext(*table, hq, hk, PAGE_SIZE, ids)
            layout = policy.layout(ctx)
            select_us = median_time_us(as_cuda_graph(lambda: policy.select(ctx, layout, 0, q, meta))[0], args.iters, flush)
            scores = quest_page_scores(ctx, q, meta, layout.width)
            scoring_us = median_time_us(as_cuda_graph(lambda: quest_page_scores(ctx, q, meta, layout.width))[0],
                                        args.iters, flush)
            ordering_us = median_time_us(as_cuda_graph(lambda: order_pages(scores, ctx, layout))[0],
                                         args.iters, flush)
            fixed = BatchARTDecodeWrapper(backend="triton")
            fixed.plan(*table, hq, hk, dim, PAGE_SIZE, termination=modes["off"],
                       selection=PageSelection(layout.indptr, order_pages(scores, ctx, layout)))
            fixed_us = median_time_us(as_cuda_graph(lambda: fixed.run(q, cache))[0], args.iters, flush)
            in_step_us = off_us["quest"] - fixed_us if "quest" in off_us else float("nan")
            box_bytes = ctx.num_rows * layout.width * meta.key_box_bytes_per_page()
            dense = BatchARTDecodeWrapper(backend="triton")
            dense.plan(*table, hq, hk, dim, PAGE_SIZE, termination=modes["off"])
            dense_off = median_time_us(as_cuda_graph(lambda: dense.run(q, cache))[0], args.iters, flush)
            scoring.append(dict(batch=batch, kv_len=kv_len, quest_select_us=select_us, dense_decode_us=dense_off,
                                fraction=select_us / dense_off, scoring_us=scoring_us, ordering_us=ordering_us,
                                box_bytes=box_bytes, scoring_floor_us=box_bytes / copy_tbps / 1e6,
                                fraction_of_flashinfer=select_us / fi_us, quest_fixed_selection_us=fixed_us,
                                in_step_us=in_step_us, in_step_fraction=in_step_us / dense_off))
            del q, cache, meta
            torch.cuda.empty_cache()
    score_table = markdown_table(scoring, [("batch", "batch", "d"), ("kv_len", "kv_len", "d"),
                                           ("scoring µs", "scoring_us", ".1f"),
                                           ("scoring floor µs (box bytes / copy)", "scoring_floor_us", ".1f"),
                                           ("selection µs", "ordering_us", ".1f"),
                                           ("scoring + selection µs", "quest_select_us", ".1f"),
                                           ("ART dense decode µs", "dense_decode_us", ".1f"),
                                           ("fraction of ART dense", "fraction", ".3f"),
                                           ("fraction of FI dense", "fraction_of_flashinfer", ".3f"),
                                           ("in the step µs", "in_step_us", ".1f"),
                                           ("in the step, fraction of ART dense", "in_step_fraction", ".3f")])
    markdown = "\n".join([
        f"# Policies with and without ART termination on {device['name']}", "",
        f"- date (UTC): {started.isoformat()}", f"- command: `{shlex.join(['python3', *sys.argv])}`",
        f"- versions: torch {device['torch']}, triton {device['triton']}, flashinfer {flashinfer.__version__}, "
        f"cuda {device['cuda']}", f"- copy bandwidth {copy_tbps:.3f} TB/s; heads {hq}/{hk}/{dim}, bf16, page {PAGE_SIZE}, "
        f"random data, shuffled pages; budgeted policies keep {BUDGET} pages per (request, KV head)",
        "- times: median CUDA-graph replays, L2 flushed before each; `stability` at the defaults, `bound` eps 0.05 "
        "relative to the values, `mass` eps 0.05; on random keys termination rarely fires (see the docstring)", "",
        markdown_table(rows, COLUMNS), "", "## Quest scoring and selection", "",
        "Alone: each in its own graph (one replay's launch included). In the step: Quest `off` from the "
        "table above less the same decode with that selection fixed at plan time, i.e. what scoring and "
        "selection add to a decode step, the writes of the plan's visit order included.", "", score_table, ""])
    print(markdown)
    write_results(args.out_dir, f"policies_{device['slug']}_{started:%Y-%m-%d}",
                  dict(date=started.isoformat(), device=device, copy_tbps=copy_tbps, rows=rows, scoring=scoring), markdown)


if __name__ == "__main__":
    main()
