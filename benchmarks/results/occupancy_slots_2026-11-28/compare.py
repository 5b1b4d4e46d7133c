"""Side-by-side table of two bench_decode.py results (markdown), same call, same card.

Usage: python compare.py BASELINE.md NEW.md  ->  per (shape, batch, kv_len): ART µs in each, their
ratio, and each one's throughput over FlashInfer's (FlashInfer's time / ART's) measured with it.
"""
import sys


def rows(path):
    out = {}
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 15 and cells[1].isdigit():
            out[(cells[0], int(cells[1]), int(cells[2]))] = (float(cells[8]), float(cells[9]))
    return out


def main(baseline, new):
    a, b = rows(baseline), rows(new)
    print("| heads q/kv/dim | batch | kv_len | baseline µs | new µs | new / baseline | baseline vs FI | new vs FI |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, (art_a, fi_a) in a.items():
        if key in b:
            art_b, fi_b = b[key]
            print(f"| {key[0]} | {key[1]} | {key[2]} | {art_a:.1f} | {art_b:.1f} | {art_b / art_a:.3f} | "
                  f"{fi_a / art_a:.3f} | {fi_b / art_b:.3f} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
