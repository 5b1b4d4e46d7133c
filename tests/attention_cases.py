"""Random paged-attention cases and a float64 reference, shared by the kernel tests."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from art_runtime import PageMetadata, PageSelection
from art_runtime.paged_cache import allocate_paged_kv_cache, gather_request_kv, unpack_paged_kv_cache


@dataclass
class Case:
    q: torch.Tensor
    cache: object
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    kv_layout: str

    @property
    def batch_size(self) -> int:
        return self.q.shape[0]

    def pages_per_request(self) -> list[int]:
        return (self.kv_indptr[1:] - self.kv_indptr[:-1]).tolist()

    def page_meta(self) -> PageMetadata:
        return PageMetadata.from_cache(self.cache, self.kv_indptr, self.kv_indices, self.kv_last_page_len, self.kv_layout)

    def plan_args(self):
        return (self.kv_indptr, self.kv_indices, self.kv_last_page_len, self.num_qo_heads,
                self.num_kv_heads, self.head_dim, self.page_size)


def make_case(seq_lens, num_qo_heads, num_kv_heads, head_dim, page_size, *, dtype=torch.float32,
              kv_layout="NHD", separate_kv=False, device="cpu", seed=0, spare_pages=3) -> Case:
    """Fresh random q and a cache filled with random K/V, pages handed out shuffled.

    Slots past each request's length and spare pages hold NaN, so reading them shows.
    """
    gen = torch.Generator().manual_seed(seed)
    pages = [math.ceil(n / page_size) for n in seq_lens]
    max_pages = sum(pages) + spare_pages
    cache = allocate_paged_kv_cache(max_pages, page_size, num_kv_heads, head_dim, dtype=dtype, device=device,
                                    kv_layout=kv_layout, separate_kv=separate_kv)
    for part in unpack_paged_kv_cache(cache, kv_layout):
        part.copy_(torch.randn(part.shape, generator=gen).to(dtype))
    perm = torch.randperm(max_pages, generator=gen)[: sum(pages)].to(torch.int32)
    indptr = torch.tensor([0] + list(torch.tensor(pages).cumsum(0).tolist()), dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * page_size for n, p in zip(seq_lens, pages)], dtype=torch.int32)
    k_cache, v_cache = unpack_paged_kv_cache(cache, kv_layout)
    poison_unused_slots(k_cache, v_cache, perm, indptr, last, page_size, kv_layout)
    q = torch.randn(len(seq_lens), num_qo_heads, head_dim, generator=gen).to(dtype)
    to = lambda t: t.to(device)  # noqa: E731
    return Case(to(q), cache, to(indptr), to(perm), to(last), num_qo_heads, num_kv_heads, head_dim, page_size, kv_layout)


def poison_unused_slots(k_cache, v_cache, kv_indices, kv_indptr, kv_last_page_len, page_size, kv_layout):
    used = torch.zeros(k_cache.shape[0], page_size, dtype=torch.bool)
    for b in range(kv_last_page_len.numel()):
        pages = kv_indices[kv_indptr[b]:kv_indptr[b + 1]].long()
        used[pages] = True
        used[pages[-1], int(kv_last_page_len[b]):] = False
    mask = used if kv_layout == "NHD" else used  # [pages, slots]
    for part in (k_cache, v_cache):
        view = part if kv_layout == "NHD" else part.transpose(1, 2)
        view[~mask.to(part.device)] = float("nan")


def exact_attention(case: Case, selection: PageSelection | None = None, visited: torch.Tensor | None = None):
    """Float64 attention over each row's selected (or first ``visited``) pages.

    Returns ``out [B, H_qo, D]`` and base-2 ``lse [B, H_qo]`` in float64.
    """
    group = case.num_qo_heads // case.num_kv_heads
    out = torch.empty(case.batch_size, case.num_qo_heads, case.head_dim, dtype=torch.float64)
    lse = torch.empty(case.batch_size, case.num_qo_heads, dtype=torch.float64)
    cpu = lambda t: t.cpu()  # noqa: E731
    cache = tuple(map(cpu, case.cache)) if isinstance(case.cache, tuple) else cpu(case.cache)
    ps = case.page_size
    for b in range(case.batch_size):
        k, v = gather_request_kv(cache, cpu(case.kv_indptr), cpu(case.kv_indices), cpu(case.kv_last_page_len), b,
                                 case.kv_layout)
        for h in range(case.num_kv_heads):
            row = b * case.num_kv_heads + h
            if selection is None:
                pages = torch.arange(case.pages_per_request()[b])
            else:
                pages = selection.pages[selection.indptr[row]:selection.indptr[row + 1]].cpu().long()
            if visited is not None:
                pages = pages[: int(visited[b, h])]
            tokens = (pages[:, None] * ps + torch.arange(ps)[None, :]).flatten()
            tokens = tokens[tokens < k.shape[0]]
            kk, vv = k[tokens, h].double(), v[tokens, h].double()
            qq = case.q[b, h * group:(h + 1) * group].cpu().double()
            s = qq @ kk.T / math.sqrt(case.head_dim)
            out[b, h * group:(h + 1) * group] = s.softmax(-1) @ vv
            lse[b, h * group:(h + 1) * group] = torch.logsumexp(s, -1) / math.log(2)
    return out, lse


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-head ``|out - ref| / |ref|`` as float64 ``[B, H_qo]``.

    ``ref`` is first rounded to ``out``'s dtype: rounding the exact answer to bf16 alone costs
    up to 2^-9 ~ 2e-3 relative, which no kernel with a bf16 output can avoid; what is measured
    is the kernel's own error.
    """
    rounded = ref.to(out.dtype).double()
    return (out.cpu().double() - rounded).norm(dim=-1) / ref.norm(dim=-1)
