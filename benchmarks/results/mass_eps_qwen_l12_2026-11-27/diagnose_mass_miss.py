"""Measured only: where mode mass's estimated error falls short of the true error at its stop.

Float64 replica of the mass rule (``reference.art_decode_torch``, mass order, 128-token checks,
the pull measured at every check) on a capture: per (query, KV head) row, the stop is the first
check after which every query head has estimated share <= MASS_MAX_SHARE and
``share_est * pull_est <= eps * |o_t|``. At the stop it compares, per query head,

* the unread share ``W / (L + W)``: the key-box estimate against the truth,
* the pull ``|vbar - o_t|``: the plain mean of the last block read against the true unread
  tokens' weighted mean value,

and reports both ratios (truth / estimate) for the heads whose true error exceeds 5% of |o|.
Usage: python diagnose_mass_miss.py CAPTURE LAYER EPS [QUERIES]
"""

import math
import sys

import torch

from art_runtime.analysis import PAGE_SIZE, _order_selection, _request_pages, _row_pages, build_batch, load_capture_layers
from art_runtime.page_metadata import PageMetadata
from art_runtime.policies.base import PolicyContext
from art_runtime.termination import MASS_MAX_SHARE

BLOCK = 8  # pages per check (128 tokens)


def main(path, layer, eps, queries=32):
    data = next(load_capture_layers(path, [layer]))
    num_kv, n_tokens, dim = data.keys.shape
    num_qo = data.queries.shape[0]
    group = num_qo // num_kv
    batch = build_batch(data.keys, data.values, data.queries, n_tokens, queries, PAGE_SIZE)
    meta = PageMetadata.from_cache(batch.cache, *batch.page_table)
    ctx = PolicyContext(*batch.page_table, num_qo, num_kv, PAGE_SIZE, sm_scale=data.scaling)
    order_sel = _order_selection("mass", ctx, batch.q, meta)
    read, total, errs, share_ratio, pull_ratio, all_share_ratio = 0, 0, [], [], [], []
    for b in range(len(batch.lengths)):
        z, sv, _, o_exact, _ = _request_pages(data, batch, b)  # [H_q, c], [H_q, c, D]
        c = z.shape[1]
        first = int(batch.kv_indptr[b])
        phys = batch.kv_indices[first: first + c].long()
        n = batch.lengths[b]
        tokens = torch.full((c,), PAGE_SIZE, dtype=torch.float64)
        tokens[-1] = n - (c - 1) * PAGE_SIZE
        for h in range(num_kv):
            heads = slice(h * group, (h + 1) * group)
            order = _row_pages(order_sel, b * num_kv + h)
            q = batch.q[b, heads].double()  # [G, D]
            kmin, kmax = meta.key_bounds(phys, torch.full_like(phys, h))
            centre, spread = (kmin.double() + kmax.double()) / 2, (kmax.double() - kmin.double()) / 4
            # each page's estimated mass (natural log), shifted like z by the head's largest logit
            log_est = (q @ centre.T) * data.scaling + (q.square() @ spread.square().T) * data.scaling ** 2 / 2
            s_tok = torch.einsum("gd,td->gt", q, data.keys[h, :n].double()) * data.scaling
            est = torch.exp(log_est - s_tok.amax(-1, keepdim=True)) * tokens[None]
            zo, svo, esto = z[heads][:, order], sv[heads][:, order], est[:, order]
            L = zo.cumsum(1)
            W = zo.sum(1, keepdim=True) - L
            west = esto.sum(1, keepdim=True) - esto.cumsum(1)
            o_t = svo.cumsum(1) / L[..., None]
            vbar = (svo.sum(1, keepdim=True) - svo.cumsum(1)) / W.clamp(min=1e-300)[..., None]
            # plain mean of the values of the last block read (pages order[t-BLOCK+1 .. t])
            v_rows = data.values[h, :n].double()
            v_pad = torch.nn.functional.pad(v_rows, (0, 0, 0, c * PAGE_SIZE - n)).view(c, PAGE_SIZE, dim)
            page_sum = v_pad.sum(1)[order]
            page_tok = tokens[order]
            stop = c
            for t in range(BLOCK, c, BLOCK):
                blk = slice(t - BLOCK, t)
                mean = page_sum[blk].sum(0) / page_tok[blk].sum()
                i = t - 1
                share_est = west[:, i] / (L[:, i] + west[:, i])
                pull_est = (o_t[:, i] - mean).norm(dim=-1)
                ok = (share_est <= MASS_MAX_SHARE) & (share_est * pull_est <= eps * o_t[:, i].norm(dim=-1))
                if bool(ok.all()):
                    stop = t
                    break
            read += stop
            total += c
            if stop == c:
                errs.append(torch.zeros(group, dtype=torch.float64))
                continue
            i = stop - 1
            err = (o_t[:, i] - o_exact[heads]).norm(dim=-1) / o_exact[heads].norm(dim=-1)
            errs.append(err)
            blk = slice(stop - BLOCK, stop)
            mean = page_sum[blk].sum(0) / page_tok[blk].sum()
            share_true = W[:, i] / (L[:, i] + W[:, i])
            share_est = west[:, i] / (L[:, i] + west[:, i])
            pull_true = (vbar[:, i] - o_t[:, i]).norm(dim=-1)
            pull_est = (o_t[:, i] - mean).norm(dim=-1)
            bad = err > 0.05
            share_ratio.append((share_true / share_est)[bad])
            pull_ratio.append((pull_true / pull_est)[bad])
            all_share_ratio.append((share_true / share_est).flatten())
    errs = torch.cat(errs)
    print(f"{path} layer {layer} eps {eps}: pages read {100 * read / total:.1f}%, "
          f"err p99 {100 * float(errs.quantile(0.99)):.1f}%, heads over 5%: {int((errs > 0.05).sum())} of {errs.numel()}")
    sr, pr = torch.cat(share_ratio), torch.cat(pull_ratio)
    if sr.numel():
        q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
        print(f"  heads over 5%: true/estimated share  p10 / median / p90 {[round(float(x), 2) for x in sr.quantile(q)]}")
        print(f"  heads over 5%: true/estimated pull   p10 / median / p90 {[round(float(x), 2) for x in pr.quantile(q)]}")
    allr = torch.cat(all_share_ratio)
    print(f"  all heads at the stop: true/estimated share p10 / median / p90 "
          f"{[round(float(x), 2) for x in allr.quantile(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))]}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 32)
