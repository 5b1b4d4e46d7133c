"""ART decode on real captured attention at batch 64: time, pages read and error, with and without termination.

Performance issue target 4: at the calibrated defaults, attention time at most 0.5x of the
same policy without termination at kv_len >= 16K, for dense and for Quest.

For each captured layer (Qwen2.5-0.5B 16K layers 12 and 20, SmolLM2-135M 8K layers 15 and 25;
``--captures``) the batch is built by ``real_batch.build_real_batch``: request ``b`` decodes at
position ``n - 64 + (b % 64)`` with the captured query of that position over the capture's
keys/values ``0 .. position`` (kv_len ``n - 63 .. n``), each request its own physical pages,
all pages shuffled, bf16, FlashInfer NHD layout, page size 16; ``PageMetadata`` is built from
the cache once (a server keeps it current on append). Then, per policy -- dense
(``DensePolicy()``, whose ``auto`` order is Quest's under ``stability`` and the mass order
otherwise) and Quest (``QuestPolicy`` keeping ``--quest-fraction`` of the longest request's
pages) -- ART runs with termination ``off`` and with every ``--settings`` entry
(``default`` is ``TerminationConfig()`` as installed, read at run time). Per row:

* µs: median CUDA-graph replay of one ``run`` call (the policy's per-layer scoring and
  selection included), L2 flushed before each (``common.median_time_us``); ``select µs``: the
  policy's scoring and selection alone; FlashInfer's dense tensor-core decode in the same run;
* ratio to the same policy with ``off`` (the target: <= 0.5 at kv_len >= 16K);
* pages read, of the selection and of all pages; KV bytes read (``last_stats.kv_bytes_read``:
  K and V read plus the page metadata read) and that over the time;
* the output error per (request, query head), ``|o - o_exact| / |o_exact|`` with ``o_exact``
  float64 attention over the policy's selected pages of the same bf16 cache (mean, p99, max),
  and against dense attention over all pages.

``--dry-run`` builds the same inputs on the CPU at a small batch, runs the torch backend and
checks the outputs (no FlashInfer, no timing): what CI runs (tests/test_real_benchmarks.py).
Rows of mode ``off`` whose max error exceeds 2e-2 are failures (exit status 1), timed or not.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from common import command_line, run_header, L2Flusher, as_cuda_graph, copy_bandwidth_tbps, device_info, markdown_table, median_time_us, utc_now, report
from real_batch import (CAPTURES, DEFAULT_CAPTURES_DIR, PAGE_SIZE, build_real_batch, error_summary, exact_attention,
                        load_layer, plan_art, relative_errors, termination_settings)

TARGET_RATIO = 0.5
TARGET_MIN_KV_LEN = 16384  # rows whose longest request has at least this many tokens (the Qwen 16K capture)
MAX_OFF_ERROR = 2e-2
DEFAULT_SETTINGS = ["default", "mass", "bound"]
FLASHINFER_WORKSPACE_BYTES = 256 << 20
COLUMNS = [
    ("model", "model", "s"), ("layer", "layer", "d"), ("kv_len", "kv_len_range", "s"), ("policy", "policy", "s"),
    ("termination", "setting", "s"), ("µs", "us", ".1f"), ("select µs", "select_us", ".1f"),
    ("time / same policy off", "ratio_to_off", ".3f"), ("time / FI dense", "ratio_to_flashinfer", ".3f"),
    ("pages read / selected", "read_of_selected", ".3f"), ("pages read / all", "read_of_all", ".3f"),
    ("KV MB read", "kv_megabytes_read", ".1f"), ("read TB/s", "read_tbps", ".2f"),
    ("err mean", "err_mean", ".1e"), ("err p99", "err_p99", ".1e"), ("err max", "err_max", ".1e"),
    ("err vs dense p99", "dense_err_p99", ".1e"), ("target met", "target", "s"),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captures", type=Path, default=DEFAULT_CAPTURES_DIR, metavar="DIR",
                        help=f"folder of the capture files (default {DEFAULT_CAPTURES_DIR})")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for the JSON and markdown results (default benchmarks/results)")
    parser.add_argument("--batch", type=int, default=None, help="requests (default 64; --dry-run: 4)")
    parser.add_argument("--iters", type=int, default=50, help="timed replays per measurement, median reported")
    parser.add_argument("--quest-fraction", type=float, default=0.25,
                        help="Quest's budget as a fraction of the longest request's pages (default 0.25)")
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, metavar="SETTING",
                        help="termination settings besides off: 'default' (TerminationConfig() as installed) or "
                             "MODE[:key=value,...], e.g. bound:relative_to=values (default: default mass bound)")
    parser.add_argument("--layers", nargs="+", default=None, metavar="MODEL:LAYER",
                        help="captured layers (default: " + " ".join(f"{m}:{layer}" for m, (_, layers) in
                                                                     CAPTURES.items() for layer in layers) + ")")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, torch backend, small batch: build the inputs and check the outputs, no timing")
    args = parser.parse_args(argv)
    args.batch = args.batch or (4 if args.dry_run else 64)
    if not 0 < args.quest_fraction <= 1:
        parser.error("--quest-fraction must be in (0, 1]")
    if args.layers is None:
        args.layers = [(model, layer) for model, (_, layers) in CAPTURES.items() for layer in layers]
    else:
        args.layers = [(text.split(":")[0], int(text.split(":")[1])) for text in args.layers]
        unknown = [model for model, _ in args.layers if model not in CAPTURES]
        if unknown:
            parser.error(f"--layers: unknown models {unknown}; known: {list(CAPTURES)}")
    return args


def policies(num_pages: int, fraction: float):
    """``{label: factory}`` of the two policies; Quest keeps ``round(fraction * num_pages)`` pages."""
    from art_runtime.policies import DensePolicy, QuestPolicy

    budget = max(2, round(fraction * num_pages))
    return {"dense": DensePolicy, f"quest {budget} pages": lambda: QuestPolicy(budget=budget)}


def select_time_us(batch, policy, page_meta, timer) -> float:
    """GPU time of the policy's scoring and selection alone (CUDA-graph replays)."""
    from art_runtime.policies import PolicyContext

    ctx = PolicyContext(*batch.page_table, batch.q.shape[1], batch.num_kv_heads, PAGE_SIZE,
                        list(range(batch.q.shape[0])), batch.sm_scale)
    layout = policy.layout(ctx)
    return timer(lambda: policy.select(ctx, layout, 0, batch.q, page_meta))


def layer_rows(model, layer_id, args, settings, timer, flashinfer_wrapper, device) -> list[dict]:
    """Every (policy, setting) row of one captured layer, plus FlashInfer's dense row."""
    from art_runtime import PageMetadata

    layer = load_layer(args.captures, model, layer_id)
    batch = build_real_batch(layer, args.batch, device)
    page_meta = PageMetadata.from_cache(batch.paged_kv_cache, *batch.page_table)
    kv_lens = batch.kv_lens
    common_fields = dict(model=model, layer=layer_id, batch=args.batch, kv_len_min=min(kv_lens),
                         kv_len_max=max(kv_lens), kv_len_range=f"{min(kv_lens)}-{max(kv_lens)}",
                         heads=f"{batch.q.shape[1]}/{batch.num_kv_heads}/{batch.q.shape[2]}")
    total_pages = int(batch.kv_indptr[-1]) * batch.num_kv_heads
    dense_exact = exact_attention(batch)
    rows = []
    flashinfer_us = None
    if flashinfer_wrapper is not None:
        num_qo_heads, head_dim = batch.q.shape[1:]
        flashinfer_wrapper.plan(*batch.page_table, num_qo_heads, batch.num_kv_heads, head_dim, PAGE_SIZE,
                                sm_scale=batch.sm_scale, q_data_type=batch.q.dtype, kv_data_type=batch.q.dtype)
        run_flashinfer = lambda: flashinfer_wrapper.run(batch.q, batch.paged_kv_cache)  # noqa: E731
        errors = relative_errors(run_flashinfer(), dense_exact)
        flashinfer_us = timer(run_flashinfer)
        rows.append(dict(common_fields, policy="FlashInfer dense", setting="-", us=flashinfer_us,
                         read_of_all=1.0, **error_summary(errors)))
    for policy_label, make_policy in policies(math.ceil(max(kv_lens) / PAGE_SIZE), args.quest_fraction).items():
        off_us = selection_exact = None
        select_us = None if timer is None else select_time_us(batch, make_policy(), page_meta, timer)
        for setting_label, termination in settings:
            run, out, stats = plan_art(batch, make_policy(), termination, page_meta, "torch" if args.dry_run else "triton")
            if selection_exact is None:  # every setting of a policy selects the same pages
                selection_exact = exact_attention(batch, stats.selection)
            us = None if timer is None else timer(run)
            off_us = us if termination.mode == "off" else off_us
            read, selected = int(stats.visited_pages.sum()), int(stats.selected_pages.sum())
            kv_bytes = int(stats.kv_bytes_read)
            ratio = None if us is None else us / off_us
            row = dict(common_fields, policy=policy_label, setting=setting_label,
                       termination=dataclasses.asdict(termination), us=us, select_us=select_us, ratio_to_off=ratio,
                       ratio_to_flashinfer=None if flashinfer_us is None else us / flashinfer_us,
                       read_of_selected=read / selected, read_of_all=read / total_pages,
                       kv_megabytes_read=kv_bytes / 1e6, read_tbps=None if us is None else kv_bytes / us / 1e6,
                       **error_summary(relative_errors(out, selection_exact)),
                       dense_err_p99=error_summary(relative_errors(out, dense_exact))["err_p99"])
            if termination.mode != "off" and ratio is not None and max(kv_lens) >= TARGET_MIN_KV_LEN:
                row["target"] = "yes" if ratio <= TARGET_RATIO else "no"
            rows.append(row)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = termination_settings(args.settings)
    started = utc_now()
    if args.dry_run:
        device, timer, flashinfer_wrapper, copy_tbps, info, versions = "cpu", None, None, None, {}, {}
        timing = "none (--dry-run: CPU, torch backend)"
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_real_attention.py needs a CUDA GPU (or --dry-run)")
        import flashinfer

        device, info = "cuda", device_info()
        versions = {key: info.pop(key) for key in ("python", "torch", "cuda", "triton")}
        versions["flashinfer"] = flashinfer.__version__
        copy_tbps, flush_l2 = copy_bandwidth_tbps(), L2Flusher()
        timer = lambda fn: median_time_us(as_cuda_graph(fn)[0], args.iters, flush_l2)  # noqa: E731
        flashinfer_wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device="cuda"), "NHD", use_tensor_cores=True)
        timing = (f"median of {args.iters} CUDA-graph replays after 10 warm-up replays, each timed alone with CUDA "
                  f"events, L2 flushed before each by reading a {flush_l2.nbytes >> 20} MiB buffer")
        print(f"{info['name']}: device-to-device copy {copy_tbps:.2f} TB/s (read + write)")
    rows = []
    for model, layer_id in tqdm(args.layers, desc="captured layers", unit="layer"):
        rows += layer_rows(model, layer_id, args, settings, timer, flashinfer_wrapper, device)
        if device == "cuda":
            torch.cuda.empty_cache()
    failures = [row for row in rows if row["setting"] == "off" and not row["err_max"] <= MAX_OFF_ERROR]
    met = [row for row in rows if row.get("target") == "yes"]
    judged = [row for row in rows if "target" in row]

    config_lines = [f"  - `{label}`: {dataclasses.asdict(config)}" for label, config in settings]
    command = command_line("bench_real_attention.py", argv)

    markdown = "\n".join([
        f"# ART on real captured attention, batch {args.batch}" + (" (dry run, CPU)" if args.dry_run else
                                                                 f" on {info['name']}"),
        "",
        *run_header(started, command, versions, copy_tbps),
        f"- inputs: captures in `{args.captures}`; request b decodes at position n-64+(b%64) with that captured "
        f"query over keys 0..position (each request its own pages, shuffled), bf16, NHD, page size {PAGE_SIZE}; "
        f"PageMetadata built once from the cache",
        "- policies: dense (`DensePolicy()`, order `auto`: Quest order under `stability`, the mass order otherwise); Quest keeping {args.quest_fraction:g} of the longest "
        f"request's pages (`QuestPolicy(budget=...)`)",
        "- termination settings (fields as installed at run time):", *config_lines,
        f"- timing: {timing}; `µs` includes the policy's per-layer scoring and selection (`select µs` alone)",
        "- error: |o - o_exact| / |o_exact| per (request, query head), o_exact float64 over the policy's selected "
        "pages of the same bf16 cache; `err vs dense`: against attention over all pages",
        f"- target (issue 7, 4): termination rows at <= {TARGET_RATIO}x of the same policy with `off`, judged on rows "
        f"whose longest request has >= {TARGET_MIN_KV_LEN} tokens: met in {len(met)} of {len(judged)}"
        + (": " + ", ".join(f"{r['model']} L{r['layer']} {r['policy']} {r['setting']}" for r in met) if met else ""),
        "",
        markdown_table(rows, COLUMNS),
        "",
        *(f"- FAIL: {r['model']} L{r['layer']} {r['policy']} off: max error {r['err_max']:.2e} > {MAX_OFF_ERROR}"
          for r in failures),
    ])
    payload = dict(benchmark="real_attention", date=started.isoformat(), command=command, device=info,
                   versions=versions, copy_bandwidth_tbps=copy_tbps, timing=timing, dry_run=args.dry_run,
                   captures=str(args.captures), batch=args.batch, quest_fraction=args.quest_fraction,
                   settings={label: dataclasses.asdict(config) for label, config in settings},
                   target_ratio=TARGET_RATIO, target_min_kv_len=TARGET_MIN_KV_LEN, rows=rows, failures=failures)
    stem = f"real_attention_{info.get('slug', 'cpu')}_{started.date().isoformat()}" + ("_dry_run" * args.dry_run)
    return report(args.out_dir, stem, payload, markdown, failures,
                  f"mode off differs from exact attention by more than {MAX_OFF_ERROR}")


if __name__ == "__main__":
    sys.exit(main())
