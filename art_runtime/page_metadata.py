"""Per-page summaries of the paged KV cache: key boxes and value norms.

For every physical page and KV head: the per-dimension minimum and maximum of the page's keys
(Quest's metadata) and the largest value-vector norm. Quest scoring and the ``bound``
termination criterion read only these, never K/V. They are kept current on append (a Triton
kernel on the GPU, scatter reductions on the CPU), from the appended tokens alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backend import triton_runs_on
from .paged_cache import cache_geometry, unpack_paged_kv_cache, validate_page_table
from .plan import next_power_of_two


@dataclass
class PageMetadata:
    """Key boxes and value norms of every physical page.

    Attributes
    ----------
    key_min, key_max : torch.Tensor
        ``[max_pages, H_kv, D]`` in the cache dtype (exact: they are key values).
    value_norm_max : torch.Tensor
        ``[max_pages, H_kv]`` float32: the largest ``|v|`` of the page's tokens.

    A page that holds no token has ``key_min = +inf``, ``key_max = -inf`` and norm 0.

    page_size : int
        Tokens per page of the cache these pages belong to.
    """

    key_min: torch.Tensor
    key_max: torch.Tensor
    value_norm_max: torch.Tensor
    page_size: int

    @classmethod
    def allocate(cls, max_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *, dtype, device) -> "PageMetadata":
        """Empty metadata for a cache of ``max_pages`` pages of ``page_size`` tokens."""
        shape = (max_pages, num_kv_heads, head_dim)
        return cls(
            page_size=page_size,
            key_min=torch.full(shape, float("inf"), dtype=dtype, device=device),
            key_max=torch.full(shape, float("-inf"), dtype=dtype, device=device),
            value_norm_max=torch.zeros(max_pages, num_kv_heads, dtype=torch.float32, device=device),
        )

    @classmethod
    def from_cache(cls, paged_kv_cache, kv_indptr, kv_indices, kv_last_page_len, kv_layout="NHD") -> "PageMetadata":
        """Build metadata by reading every page of the page table once (the slow path).

        Parameters
        ----------
        paged_kv_cache : torch.Tensor or tuple of torch.Tensor
            FlashInfer-format cache (see ``art_runtime.paged_cache``).
        kv_indptr : torch.Tensor
            ``[B + 1]`` int32.
        kv_indices : torch.Tensor
            ``[nnz_pages]`` int32 physical page ids.
        kv_last_page_len : torch.Tensor
            ``[B]`` int32, 1..page_size.
        kv_layout : {"NHD", "HND"}
        """
        k_cache, v_cache = unpack_paged_kv_cache(paged_kv_cache, kv_layout)
        max_pages, page_size, num_kv_heads, head_dim = cache_geometry(paged_kv_cache, kv_layout)
        validate_page_table(kv_indptr, kv_indices, kv_last_page_len, page_size, max_pages)
        meta = cls.allocate(max_pages, page_size, num_kv_heads, head_dim, dtype=k_cache.dtype, device=k_cache.device)
        num_pages = int(kv_indptr[-1])
        listed = kv_indices[:num_pages].long()
        if kv_layout == "HND":
            k_cache, v_cache = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
        # Tokens per listed page: full, except each request's last page. A page listed by
        # several requests (a shared prefix) is summarized over the most tokens any of them
        # reads, so that its box bounds every reader's keys.
        listed_tokens = torch.full((num_pages,), page_size, dtype=torch.long, device=listed.device)
        listed_tokens[kv_indptr[1:].long() - 1] = kv_last_page_len.long()
        pages = torch.unique(listed)
        tokens = torch.zeros(max_pages, dtype=torch.long, device=listed.device)
        tokens = tokens.scatter_reduce(0, listed, listed_tokens, "amax")[pages]
        keys = k_cache[pages].float()  # [n, P, H, D]
        values = v_cache[pages].float()
        valid = (torch.arange(page_size, device=pages.device)[None, :] < tokens[:, None])[:, :, None, None]
        meta.key_min[pages] = keys.masked_fill(~valid, float("inf")).amin(1).to(meta.key_min.dtype)
        meta.key_max[pages] = keys.masked_fill(~valid, float("-inf")).amax(1).to(meta.key_max.dtype)
        meta.value_norm_max[pages] = values.norm(dim=-1).masked_fill(~valid[..., 0], 0.0).amax(1)
        return meta

    def update(self, append_key, append_value, batch_indices, positions, kv_indices, kv_indptr) -> None:
        """Fold freshly appended tokens into the summaries of the pages they went to.

        Parameters
        ----------
        append_key, append_value : torch.Tensor
            ``[nnz, H_kv, D]``, the tokens just written into the cache.
        batch_indices, positions : torch.Tensor
            ``[nnz]`` int32: request of each token (non-decreasing) and its position in it.
        kv_indices, kv_indptr : torch.Tensor
            The page table the tokens were appended through.

        A token in slot 0 starts its page afresh (pages are reused across requests); other
        tokens merge with the page's current summary. No host synchronization.
        """
        nnz = append_key.shape[0]
        if nnz == 0:
            return
        num_requests = kv_indptr.shape[0] - 1
        # First appended token of each request; batch_indices is sorted by construction.
        append_indptr = torch.searchsorted(
            batch_indices.contiguous(),
            torch.arange(num_requests + 1, dtype=batch_indices.dtype, device=batch_indices.device),
        ).to(torch.int32)
        page_size = self.page_size
        if triton_runs_on(append_key.device):
            from .kernels.page_metadata import page_metadata_update_kernel

            page_metadata_update_kernel[(nnz, append_key.shape[1])](
                append_key, append_value, batch_indices, positions, append_indptr,
                kv_indices, kv_indptr, self.key_min, self.key_max, self.value_norm_max, nnz,
                append_key.stride(0), append_key.stride(1), append_value.stride(0), append_value.stride(1),
                self.key_min.stride(0), self.key_min.stride(1), self.value_norm_max.stride(0),
                PAGE_SIZE=page_size, PAGE_SIZE_POW2=next_power_of_two(page_size), HEAD_DIM=append_key.shape[2],
            )
        else:
            self._update_torch(append_key, append_value, batch_indices, positions, kv_indices, kv_indptr, page_size)

    def _update_torch(self, append_key, append_value, batch_indices, positions, kv_indices, kv_indptr, page_size):
        """The CPU path of ``update``: scatter reductions over the touched pages."""
        pages = kv_indices[kv_indptr[batch_indices.long()].long() + positions.long() // page_size].long()
        fresh = pages[positions % page_size == 0]
        self.key_min[fresh] = float("inf")
        self.key_max[fresh] = float("-inf")
        self.value_norm_max[fresh] = 0.0
        keys = append_key.to(self.key_min.dtype).reshape(append_key.shape[0], -1)  # [nnz, H * D]
        index = pages[:, None].expand_as(keys)
        self.key_min.view(self.key_min.shape[0], -1).scatter_reduce_(0, index, keys, "amin")
        self.key_max.view(self.key_max.shape[0], -1).scatter_reduce_(0, index, keys, "amax")
        norms = append_value.float().norm(dim=-1)
        self.value_norm_max.scatter_reduce_(0, pages[:, None].expand_as(norms), norms, "amax")

    def key_box_bytes_per_page(self) -> int:
        """Bytes of key box (min and max) per (page, KV head): what Quest scoring reads."""
        return 2 * self.key_min.shape[-1] * self.key_min.element_size()

    def nbytes_per_page(self) -> int:
        """Bytes of metadata per (page, KV head) that the bound criterion reads (box and norm)."""
        return self.key_box_bytes_per_page() + self.value_norm_max.element_size()
