"""Per-row pages read by the default (mode mass, eps 0.05, mass order) on a real capture tiled to batch 64,
CPU torch backend (rows whole, as the plan keeps them on the CPU). Usage: row_depths.py MODEL:LAYER [CAPTURES]"""
import sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from real_batch import build_real_batch, load_layer, plan_art
from art_runtime import PageMetadata, TerminationConfig
from art_runtime.policies import DensePolicy
model, layer = sys.argv[1].split(":")
t0 = time.time()
batch = build_real_batch(load_layer(Path(sys.argv[2] if len(sys.argv) > 2 else "/work/shared/data/captures"), model, int(layer)), 64, "cpu")
meta = PageMetadata.from_cache(batch.paged_kv_cache, *batch.page_table)
_, _, stats = plan_art(batch, DensePolicy(), TerminationConfig(), meta, "torch")
v = stats.visited_pages.flatten().sort(descending=True).values
sel = stats.selected_pages.flatten()
print(sys.argv[1], "rows", v.numel(), "pages a row", int(sel.max()), "read fraction", float(v.sum() / sel.sum()),
      "deepest rows (pages):", v[:12].tolist(), "median", int(v.median()), f"({time.time() - t0:.0f} s)")

