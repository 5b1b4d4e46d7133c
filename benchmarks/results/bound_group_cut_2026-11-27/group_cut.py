"""Throwaway simulation: bound's sketch cut from the group's summed box estimate (what the mass
order's scoring already computes) instead of every head's own; pages, errors, sketch pages and
bytes on the Qwen captures. CUT=head (shipped) or CUT=group."""
import inspect, json, math, os, sys, textwrap
import torch
import art_runtime.reference as ref
import art_runtime.decode as dec
from art_runtime.analysis import analyze_capture

if os.environ.get("CUT") == "group":
    src = textwrap.dedent(inspect.getsource(ref.bound_terms_torch))
    old = "    early = (work_of >= 0) & (estimate > threshold[item]).any(-1)\n"
    assert old in src
    new = ("    group = torch.logsumexp(estimate * 0.6931471805599453, -1) * 1.4426950408889634\n"
           "    early = (work_of >= 0) & (group > torch.logsumexp(threshold * 0.6931471805599453, -1)[item] * 1.4426950408889634"
           f" + {math.log2(float(os.environ.get('FACTOR', '1')))})\n")
    src = src.replace(old, new)
    ns = dict(ref.__dict__)
    exec(compile(src, "patched", "exec"), ns)
    ref.bound_terms_torch = ns["bound_terms_torch"]
    dec.bound_terms_torch = ns["bound_terms_torch"]

torch.set_num_threads(2)
path = sys.argv[1]
report = analyze_capture(path, layers=[int(x) for x in sys.argv[2].split(",")], queries=8, orders=["mass"],
                         settings=["bound:eps=0.05,rel=values"], progress=False)
for r in report.criteria:
    print(json.dumps(dict(cut=os.environ.get("CUT", "head"), factor=os.environ.get("FACTOR", "1"), layer=r.layer, pages=r.pages_read / r.pages_selected,
                          kv=r.kv_bytes / r.dense_bytes, meta=r.metadata_bytes / r.dense_bytes,
                          bytes=r.bytes_fraction, sketch_pages=r.sketch_pages, selected=r.pages_selected,
                          p99=r.err_values["p99"], viol=r.violations)), flush=True)
