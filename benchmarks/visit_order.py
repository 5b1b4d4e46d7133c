"""Which dense visit order lets ART stop earliest on real attention (CPU, torch backend).

For every layer of each capture (``../shared/data/captures``: post-RoPE Q/K/V of real models
on real text), the last queries become requests over their causal prefixes
(``art_runtime.analysis.build_batch``: full pages shared, as with prefix caching, each request's
last page its own), and ART runs with ``DensePolicy(order=...)`` for each order and
termination setting. Reported per run: pages read / selected, and the per-query-head output
error against exact float64 attention (relative to |o| and to max|v|). Writes
``results/visit_order_<date>.json`` and ``.md``.

Usage: python benchmarks/visit_order.py [CAPTURE ...] [--queries N] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from art_runtime import BatchARTDecodeWrapper, PageMetadata, TerminationConfig
from art_runtime.analysis import build_batch, exact_attention, load_capture_layers
from art_runtime.policies import DensePolicy

CAPTURES = Path(__file__).resolve().parents[2] / "shared" / "data" / "captures"
PAGE_SIZE = 16
SETTINGS = {
    "stability tau 1e-3 (paper)": TerminationConfig(mode="stability", tau_mag=1e-3, tau_dir=1e-6, patience=2),
    "bound eps 0.05 values": TerminationConfig(mode="bound", eps=0.05, relative_to="values"),
    "bound eps 0.1 values": TerminationConfig(mode="bound", eps=0.1, relative_to="values"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("captures", nargs="*", type=Path, help=f"capture files (default: every file in {CAPTURES})")
    parser.add_argument("--queries", type=int, default=16, help="requests per layer, from the capture's last queries")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    captures = args.captures or sorted(CAPTURES.glob("*.safetensors"))
    rows = []
    jobs = [(c, order, name) for c in captures for order in ("recency", "quest") for name in SETTINGS]
    layers = {c: list(load_capture_layers(c)) for c in captures}
    progress = tqdm(total=sum(len(layers[c]) for c, _, _ in jobs), desc="runs", unit="run")
    for capture, order, name in jobs:
        for data in layers[capture]:
            batch = build_batch(data.keys, data.values, data.queries, data.n_tokens, args.queries, PAGE_SIZE)
            q = batch.q
            ref, vscale = exact_attention(data.keys, data.values, q, batch.lengths, data.scaling)
            meta = PageMetadata.from_cache(batch.cache, *batch.page_table)
            wrapper = BatchARTDecodeWrapper(backend="torch")
            wrapper.plan(*batch.page_table, q.shape[1], data.keys.shape[0], data.keys.shape[2], PAGE_SIZE,
                         termination=SETTINGS[name], sm_scale=data.scaling, policy=DensePolicy(order=order))
            out = wrapper.run(q, batch.cache, page_meta=meta).double()
            stats = wrapper.last_stats
            err = (out - ref).norm(dim=-1)
            rel, rel_v = (err / ref.norm(dim=-1)).flatten(), (err / vscale).flatten()
            rows.append({
                "capture": capture.name, "layer": data.layer, "order": order, "setting": name,
                "pages_read": float(stats.visited_pages.sum() / stats.selected_pages.sum()),
                "err_p99": float(rel.quantile(0.99)), "err_max": float(rel.max()),
                "err_values_max": float(rel_v.max()),
            })
            progress.update()
    progress.close()
    date = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"# Dense visit order vs ART termination on real attention ({date:%Y-%m-%d})", "",
             f"- command: `{shlex.join(['python', *sys.argv])}`", f"- {args.queries} requests per layer "
             f"(evenly spaced last queries, causal prefixes), page size {PAGE_SIZE}, fp32, torch backend, CPU",
             "- pages read: visited / selected pages over all (request, KV head); err: per query head "
             "|o - o_exact| / |o_exact| (p99, max); err/v: |o - o_exact| / max|v|", "",
             "| capture | layer | order | setting | pages read | err p99 | err max | err/v max |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['capture']} | {r['layer']} | {r['order']} | {r['setting']} | {r['pages_read']:.3f} | "
              f"{r['err_p99']:.2e} | {r['err_max']:.2e} | {r['err_values_max']:.2e} |" for r in rows]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"visit_order_{date:%Y-%m-%d}"
    stem.with_suffix(".json").write_text(json.dumps({"date": date.isoformat(), "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
