"""Table of sweep.sh's runs: python3 table.py OUT. Bytes add the value sketch of the pages that
read it: int4 codes (P * D / 2 B) plus its grid (3 B a dimension: int8 step exponent, int16 base index; 2 B in the int8 variant)."""
import glob
import json
import os
import sys

rows = []
for f in glob.glob(os.path.join(sys.argv[1], "r_*/analysis.json")):
    parts = os.path.basename(os.path.dirname(f)).split("_")[1:]
    bits, cut, variant = int(parts[0]), float(parts[1]), "_".join(parts[2:])
    for r in json.load(open(f))["reports"]:
        D, P = r["head_dim"], r["page_size"]
        vs_bytes = (bits * P * D // 8 + (2 if variant.endswith("int8") else 3) * D) if bits else 0
        for c in r["criteria"]:
            page_bytes = c["dense_bytes"] / c["pages_selected"]
            vs_pages = c["vs_pages"] if bits else 0
            total = c["bytes_fraction"] + vs_pages * vs_bytes / page_bytes / c["pages_selected"]
            rows.append((r["capture"][:12], c["layer"], c["setting"], bits, cut, variant,
                         100 * vs_pages / c["pages_selected"], 100 * c["pages_fraction"], 100 * c["bytes_fraction"],
                         100 * total, 100 * c["sketch_pages"] / c["pages_selected"], c["violations"], c["err_values"]["max"]))
rows.sort()
print(f"{'capture':12s} {'L':>3s} {'setting':24s} bits  cut  variant  v-sketch  pages  bytes w/o v-sketch  bytes  k-sketch  viol  max err/max|v|")
for r in rows:
    print(f"{r[0]:12s} {r[1]:3d} {r[2]:24s} {r[3]:4d} {r[4]:4.0f} {r[5]:>8s} {r[6]:8.1f} {r[7]:6.1f} {r[8]:18.1f} {r[9]:6.1f} {r[10]:9.1f} {r[11]:5d}  {r[12]:.3g}")
