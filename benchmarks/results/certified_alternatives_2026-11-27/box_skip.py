"""Could the bound skip the key sketch of tail pages whose key-box bound is already small?

For each KV head and the last captured query: each page's certified mass bound from its exact
key box (Quest's ``sum_d max(q_d min_d, q_d max_d)``, plus log 16 tokens) against the average
page's true mass (the head's total over the page count), the group's largest over its query
heads. Prints the fraction of pages whose box bound is below the average page mass by more
than 0, 3, 5, 8 and 10 nats. Usage: python3 box_skip.py CAPTURES_DIR
"""
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

PAGE = 16
captures = Path(sys.argv[1])
for name, layers in [("qwen2.5-0.5b_emma_16k", [12, 20]), ("smollm2-135m_pride-prejudice_8k", [15, 25])]:
    tensors = load_file(str(captures / f"{name}.safetensors"))
    for layer in layers:
        k, q = tensors[f"L{layer}.k"].double(), tensors[f"L{layer}.q_last"].double()
        heads, n, dim = k.shape
        group, scale = q.shape[0] // heads, 1 / math.sqrt(dim)
        for h in range(heads):
            pages = k[h][: n // PAGE * PAGE].view(-1, PAGE, dim)
            queries = q[h * group:(h + 1) * group, -1]
            box = scale * torch.maximum(queries[:, None] * pages.amin(1)[None], queries[:, None] * pages.amax(1)[None]).sum(-1)
            page_mass = torch.logsumexp(scale * torch.einsum("gd,ptd->gpt", queries, pages), -1)
            average = torch.logsumexp(page_mass, -1, keepdim=True) - math.log(pages.shape[0])
            margin = (box + math.log(PAGE) - average).amax(0)
            print(f"{name[:12]} L{layer} h{h} below the average page by >0/3/5/8/10 nats: "
                  + " ".join(f"{(margin < -x).float().mean():.3f}" for x in (0, 3, 5, 8, 10)))
