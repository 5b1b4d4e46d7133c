"""First look (float64, exact softmax weights): how early could `bound` stop with a tighter value term?

For 8 of the 64 captured queries per layer and every KV head, pages are visited sink, current,
then by the group's true page mass (an ideal order); the group stops at the first page after
which every query head's error bound is at most eps * max|v| (values-relative, eps 0.05).
Value terms compared, all with the exact unread mass W:
  cur        the shipped one: min(W/(l+W) (Vmax_rest + |o|), (sum_j W_j Vmax_j + W |o|)/(l+W))
  centre     per-page centre (mean) plus spread around a row reference c: no cancellation
  mean_dev   exact per-page value means (cancellation across pages) plus each page's spread
             times its tokens' weight deviation from uniform
  vsN        an N-bit per-token value sketch (per page and dim, power-of-two step): the unread
             sum_t w_t v_t known up to the cells' half widths (cancellation across tokens)
  truth      the true error |o_final - o_t| (hindsight, not certifiable)
Prints the mean fraction of pages read per (query, KV head).
Usage: python3 potential.py CAPTURE LAYER
"""
import math
import sys

import torch
from safetensors import safe_open

torch.set_default_dtype(torch.float64)
path, layer = sys.argv[1], int(sys.argv[2])
f = safe_open(path, "pt")
k, v, q = (f.get_tensor(f"L{layer}.{n}").double() for n in ("k", "v", "q_last"))
Hkv, N, D = k.shape
G, P, eps = q.shape[0] // Hkv, 16, 0.05
scale = 1 / math.sqrt(D)
res = {name: [] for name in ("cur", "centre", "mean_dev", "vs2", "vs3", "vs4", "truth")}
for qi in range(0, 64, 8):
    n = N - 64 + qi + 1
    npg, pad = (n + P - 1) // P, -n % P
    for h in range(Hkv):
        s = q[h * G:(h + 1) * G, qi] @ k[h, :n].T * scale
        w = torch.exp(s - s.max(-1, keepdim=True).values)
        wp = torch.nn.functional.pad(w, (0, pad)).view(G, npg, P)
        Vp = torch.nn.functional.pad(v[h, :n], (0, 0, 0, pad)).view(npg, P, D)
        valid = torch.nn.functional.pad(torch.ones(n), (0, pad)).view(npg, P) > 0
        key = wp.sum((0, 2))
        key[0] = key[-1] = float("inf")
        order = torch.argsort(key, descending=True)
        wp, Vp, valid = wp[:, order], Vp[order], valid[order]
        Wj = wp.sum(-1)  # [G, npg]
        vmax = torch.where(valid, Vp.norm(dim=-1), 0.0).max()
        cum_l, cum_wv = Wj.cumsum(-1), torch.einsum("gjp,jpd->gjd", wp, Vp).cumsum(1)
        Wrest = cum_l[:, -1:] - cum_l
        wvrest = cum_wv[:, -1:] - cum_wv
        o_t = cum_wv / cum_l[..., None]
        onorm = o_t.norm(dim=-1)
        denom = cum_l + Wrest

        def suffix(x):  # sum over the pages after each position (dim 1)
            return x.sum(1, keepdim=True) - x.cumsum(1)

        def depth(bound):
            ok = bound <= eps * vmax
            ok[:, -1] = True
            return (int(ok.all(0).nonzero()[0]) + 1) / npg

        Vn = torch.where(valid, Vp.norm(dim=-1), 0.0).amax(-1)
        vrest = torch.cat([torch.flip(torch.cummax(torch.flip(Vn, [0]), 0).values, [0])[1:], torch.zeros(1)])
        res["cur"].append(depth(torch.minimum(Wrest / denom * (vrest + onorm),
                                              (suffix(Wj * Vn) + Wrest * onorm) / denom)))
        res["truth"].append(depth((wvrest / Wrest.clamp(min=1e-300)[..., None] - o_t).norm(dim=-1) * Wrest / denom))
        mean = (Vp * valid[..., None]).sum(1) / valid.sum(1)[:, None]
        spread = torch.where(valid, (Vp - mean[:, None]).norm(dim=-1), 0.0).amax(-1)
        c = mean.mean(0)
        res["centre"].append(depth((suffix(Wj * ((mean - c).norm(dim=-1) + spread))
                                    + Wrest * (c - o_t).norm(dim=-1)) / denom))
        dev = torch.where(valid, (wp - (Wj / valid.sum(1))[..., None]).abs(), 0.0).sum(-1)
        res["mean_dev"].append(depth(((suffix(Wj[..., None] * mean) - Wrest[..., None] * o_t).norm(dim=-1)
                                      + suffix(dev * spread)) / denom))
        lo = torch.where(valid[..., None], Vp, float("inf")).amin(1)
        hi = torch.where(valid[..., None], Vp, float("-inf")).amax(1)
        for bits in (2, 3, 4):
            half = torch.exp2(torch.ceil(torch.log2(((hi - lo) / (2**bits - 1)).clamp(min=2.0**-24)))) / 2
            num = ((wvrest - Wrest[..., None] * o_t).abs() + suffix(Wj[..., None] * half)).norm(dim=-1)
            res[f"vs{bits}"].append(depth(num / denom))
print(f"{path.split('/')[-1]} layer {layer}: " + ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in res.items()))
