"""Page metadata stays equal to a from-scratch build while tokens are appended.

Both update paths (torch scatter reductions, Triton kernel) are checked against
``PageMetadata.from_cache``, including pages that are freed and handed to another request
(their summary must restart, not merge with the previous owner's).
"""

import pytest
import torch

from art_runtime import PageMetadata
from art_runtime.backend import triton_runs_on
from art_runtime.paged_cache import allocate_paged_kv_cache, append_paged_kv_cache, get_batch_indices_positions


def assert_same_metadata(meta, expected, pages):
    pages = pages.long()
    assert torch.equal(meta.key_min[pages], expected.key_min[pages])
    assert torch.equal(meta.key_max[pages], expected.key_max[pages])
    assert torch.allclose(meta.value_norm_max[pages], expected.value_norm_max[pages], rtol=1e-6)


class Growing:
    """Requests that grow token by token in a cache, with metadata kept current on append."""

    def __init__(self, page_size, dtype, kv_layout, device, seed, use_triton):
        self.page_size, self.kv_layout, self.device = page_size, kv_layout, device
        self.gen = torch.Generator().manual_seed(seed)
        self.max_pages, self.heads, self.dim = 160, 2, 64
        self.cache = allocate_paged_kv_cache(self.max_pages, page_size, self.heads, self.dim, dtype=dtype,
                                             device=device, kv_layout=kv_layout)
        self.cache.normal_()  # slots not yet written hold garbage, as in a real pool
        self.meta = PageMetadata.allocate(self.max_pages, page_size, self.heads, self.dim, dtype=dtype, device=device)
        self.use_triton = use_triton
        self.free = torch.randperm(self.max_pages, generator=self.gen).tolist()
        self.pages, self.lengths = [], []

    def add_request(self):
        self.pages.append([])
        self.lengths.append(0)

    def release(self, request):
        self.free.extend(self.pages[request])
        del self.pages[request], self.lengths[request]

    def table(self):
        counts = [len(p) for p in self.pages]
        indptr = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32, device=self.device)
        indices = torch.tensor(sum(self.pages, []), dtype=torch.int32, device=self.device)
        last = torch.tensor([n - (len(p) - 1) * self.page_size for n, p in zip(self.lengths, self.pages)],
                            dtype=torch.int32, device=self.device)
        return indptr, indices, last

    def append(self, new_tokens):
        for b, n in enumerate(new_tokens):
            self.lengths[b] += n
            while len(self.pages[b]) * self.page_size < self.lengths[b]:
                self.pages[b].append(self.free.pop())
        indptr, indices, last = self.table()
        counts = torch.tensor(new_tokens, device=self.device)
        append_indptr = torch.zeros(len(new_tokens) + 1, dtype=torch.int32, device=self.device)
        append_indptr[1:] = counts.cumsum(0)
        nnz = int(counts.sum())
        seq_lens = torch.tensor(self.lengths, dtype=torch.int32, device=self.device)
        batch, positions = get_batch_indices_positions(append_indptr, seq_lens, nnz)
        dtype = self.meta.key_min.dtype
        keys = torch.randn(nnz, self.heads, self.dim, generator=self.gen).to(dtype).to(self.device)
        values = torch.randn(nnz, self.heads, self.dim, generator=self.gen).to(dtype).to(self.device)
        append_paged_kv_cache(keys, values, batch, positions, self.cache, indices, indptr, last, self.kv_layout)
        if self.use_triton:
            self.meta.update(keys, values, batch, positions, indices, indptr)
        else:
            self.meta._update_torch(keys, values, batch, positions, indices, indptr, self.page_size)

    def check(self):
        indptr, indices, last = self.table()
        expected = PageMetadata.from_cache(self.cache, indptr, indices, last, self.kv_layout)
        assert_same_metadata(self.meta, expected, indices)


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("page_size", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
def test_metadata_follows_appends_and_page_reuse(use_triton, page_size, dtype, kv_layout, device):
    if use_triton and not triton_runs_on(torch.device(device)):
        pytest.fail("the Triton path must run here (CUDA, or TRITON_INTERPRET=1 on CPU)")
    run = Growing(page_size, dtype, kv_layout, device, seed=page_size, use_triton=use_triton)
    run.add_request()
    run.add_request()
    run.append([37, 20])  # prefill
    run.check()
    for _ in range(3):  # decode steps, crossing page boundaries for small pages
        run.append([1, 1])
        run.check()
    run.release(0)  # its pages go back to the pool and are reused by a new request
    run.add_request()
    run.append([3, 45])
    run.check()
    run.append([1, 1])
    run.check()


def test_from_cache_matches_brute_force(device):
    cache = torch.randn(6, 2, 4, 3, 16, device=device)
    indptr = torch.tensor([0, 2, 3], dtype=torch.int32, device=device)
    indices = torch.tensor([4, 1, 5], dtype=torch.int32, device=device)
    last = torch.tensor([3, 2], dtype=torch.int32, device=device)
    meta = PageMetadata.from_cache(cache, indptr, indices, last)
    for page, tokens in [(4, 4), (1, 3), (5, 2)]:
        keys, values = cache[page, 0, :tokens], cache[page, 1, :tokens]  # [tokens, H, D]
        assert torch.equal(meta.key_min[page], keys.amin(0))
        assert torch.equal(meta.key_max[page], keys.amax(0))
        assert torch.allclose(meta.value_norm_max[page], values.norm(dim=-1).amax(0))
    untouched = torch.tensor([0, 2, 3])
    assert torch.isinf(meta.key_min[untouched]).all() and (meta.value_norm_max[untouched] == 0).all()


def test_a_page_shared_by_requests_is_summarized_over_its_longest_reader(device):
    cache = torch.randn(3, 2, 8, 1, 16, device=device)
    # Both requests read page 2: the first all 8 of its tokens, the second (listed last, so
    # a plain scatter would keep its summary) only 3.
    indptr = torch.tensor([0, 2, 4], dtype=torch.int32, device=device)
    indices = torch.tensor([1, 2, 0, 2], dtype=torch.int32, device=device)
    last = torch.tensor([8, 3], dtype=torch.int32, device=device)
    meta = PageMetadata.from_cache(cache, indptr, indices, last)
    assert torch.equal(meta.key_max[2], cache[2, 0].amax(0))
    assert torch.equal(meta.key_min[2], cache[2, 0].amin(0))
