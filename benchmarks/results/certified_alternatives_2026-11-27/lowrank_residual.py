"""Certified logit bounds from a low-rank key sketch: how loose is Cauchy-Schwarz on the residual?

For each KV head: a PCA basis of rank r from the first half of the keys, and for every query
q and key k the overshoot of ``q_P . k_P + |q_R| |k_R|`` (projected part exact, residual by
Cauchy-Schwarz) over the true ``q . k``, in nats (times the softmax scale), median and
softmax-weighted mean. Usage: python3 lowrank_residual.py CAPTURES_DIR
"""
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

captures = Path(sys.argv[1])
for name, layers in [("qwen2.5-0.5b_emma_16k", [12, 20]), ("smollm2-135m_pride-prejudice_8k", [15, 25])]:
    tensors = load_file(str(captures / f"{name}.safetensors"))
    for layer in layers:
        k, q = tensors[f"L{layer}.k"].double(), tensors[f"L{layer}.q_last"].double()
        heads, n, dim = k.shape
        group, scale = q.shape[0] // heads, 1 / math.sqrt(dim)
        for h in range(heads):
            keys, queries = k[h], q[h * group:(h + 1) * group].reshape(-1, dim)
            centre = keys[: n // 2].mean(0)
            _, sv, vt = torch.linalg.svd(keys[: n // 2] - centre, full_matrices=False)
            weights = torch.softmax(scale * queries @ keys.T, -1)
            cells = []
            for rank in (8, 16, 24, 32, 48):
                basis = vt[:rank].T
                k_res = (keys - centre) - ((keys - centre) @ basis) @ basis.T
                q_res = queries - (queries @ basis) @ basis.T
                over = scale * (q_res.norm(dim=-1)[:, None] * k_res.norm(dim=-1)[None, :] - q_res @ k_res.T)
                cells.append(f"r{rank} {over.median():.1f}/{(weights * over).sum(-1).mean():.1f}")
            energy = (sv**2).cumsum(0) / (sv**2).sum()
            print(f"{name[:12]} L{layer} h{h} energy@16 {energy[15]:.2f} @32 {energy[31]:.2f} | " + " | ".join(cells))
