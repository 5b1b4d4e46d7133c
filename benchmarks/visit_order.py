"""Which dense visit order lets ART stop earliest on real attention (CPU, torch backend).

For every layer of each capture (``../shared/data/captures``: post-RoPE Q/K/V of real models
on real text), the last queries become requests over their causal prefixes (pages shared, as
with prefix caching), and ART runs with ``DensePolicy(order=...)`` for each order and
termination setting. Reported per run: pages read / selected, and the per-query-head output
error against exact float64 attention (relative to |o| and to max|v|). Writes
``results/visit_order_<date>.json`` and ``.md``.

Usage: python benchmarks/visit_order.py [CAPTURE ...] [--queries N] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from art_runtime import BatchARTDecodeWrapper, PageMetadata, TerminationConfig
from art_runtime.policies import DensePolicy

CAPTURES = Path(__file__).resolve().parents[2] / "shared" / "data" / "captures"
PAGE_SIZE = 16
SETTINGS = {
    "stability tau 1e-3 (paper)": TerminationConfig(mode="stability", tau_mag=1e-3, tau_dir=1e-6, patience=2),
    "bound eps 0.05 values": TerminationConfig(mode="bound", eps=0.05, relative_to="values"),
    "bound eps 0.1 values": TerminationConfig(mode="bound", eps=0.1, relative_to="values"),
}


def load_layers(path: Path):
    """Yield (layer, keys [H_kv, n, D], values, queries [H_q, m, D], n_tokens, scaling) of a capture."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        layers = sorted({int(name.split(".")[0][1:]) for name in f.keys()})
        for layer in layers:
            yield (layer, f.get_tensor(f"L{layer}.k").float(), f.get_tensor(f"L{layer}.v").float(),
                   f.get_tensor(f"L{layer}.q_last").float(), int(meta["n_tokens"]), float(meta["scaling"]))


def build_batch(keys, values, queries, n_tokens, num_requests):
    """Requests = evenly spaced last queries; all share one paged copy of the capture."""
    num_kv_heads, _, head_dim = keys.shape
    pages = math.ceil(n_tokens / PAGE_SIZE)
    cache = torch.zeros(pages, 2, PAGE_SIZE, num_kv_heads, head_dim)
    padded = pages * PAGE_SIZE
    for part, tensor in ((0, keys), (1, values)):
        flat = torch.zeros(num_kv_heads, padded, head_dim)
        flat[:, :n_tokens] = tensor
        cache[:, part] = flat.view(num_kv_heads, pages, PAGE_SIZE, head_dim).permute(1, 2, 0, 3)
    last = queries.shape[1]
    picks = torch.linspace(0, last - 1, num_requests).round().long().tolist()
    lengths = [n_tokens - last + i + 1 for i in picks]
    counts = [math.ceil(n / PAGE_SIZE) for n in lengths]
    kv_indptr = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)
    kv_indices = torch.cat([torch.arange(c) for c in counts]).int()
    kv_last = torch.tensor([n - (c - 1) * PAGE_SIZE for n, c in zip(lengths, counts)], dtype=torch.int32)
    q = queries[:, picks].transpose(0, 1).contiguous()  # [B, H_q, D]
    return cache, kv_indptr, kv_indices, kv_last, q, lengths


def exact(keys, values, q, lengths, scaling):
    """float64 attention and the value scale max|v| per (request, query head)."""
    group = q.shape[1] // keys.shape[0]
    out, vscale = [], []
    for b, n in enumerate(lengths):
        k = keys[:, :n].double().repeat_interleave(group, 0)
        v = values[:, :n].double().repeat_interleave(group, 0)
        p = torch.softmax(torch.einsum("hd,htd->ht", q[b].double(), k) * scaling, -1)
        out.append(torch.einsum("ht,htd->hd", p, v))
        vscale.append(v.norm(dim=-1).amax(-1))
    return torch.stack(out), torch.stack(vscale)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("captures", nargs="*", type=Path, help=f"capture files (default: every file in {CAPTURES})")
    parser.add_argument("--queries", type=int, default=16, help="requests per layer, from the capture's last queries")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    captures = args.captures or sorted(CAPTURES.glob("*.safetensors"))
    rows = []
    jobs = [(c, order, name) for c in captures for order in ("recency", "quest") for name in SETTINGS]
    layers = {c: list(load_layers(c)) for c in captures}
    progress = tqdm(total=sum(len(layers[c]) for c, _, _ in jobs), desc="runs", unit="run")
    for capture, order, name in jobs:
        for layer, keys, values, queries, n_tokens, scaling in layers[capture]:
            cache, kv_indptr, kv_indices, kv_last, q, lengths = build_batch(keys, values, queries, n_tokens, args.queries)
            ref, vscale = exact(keys, values, q, lengths, scaling)
            meta = PageMetadata.from_cache(cache, kv_indptr, kv_indices, kv_last)
            wrapper = BatchARTDecodeWrapper(backend="torch")
            wrapper.plan(kv_indptr, kv_indices, kv_last, q.shape[1], keys.shape[0], keys.shape[2], PAGE_SIZE,
                         termination=SETTINGS[name], sm_scale=scaling, policy=DensePolicy(order=order))
            out = wrapper.run(q, cache, page_meta=meta).double()
            stats = wrapper.last_stats
            err = (out - ref).norm(dim=-1)
            rel, rel_v = (err / ref.norm(dim=-1)).flatten(), (err / vscale).flatten()
            rows.append({
                "capture": capture.name, "layer": layer, "order": order, "setting": name,
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
