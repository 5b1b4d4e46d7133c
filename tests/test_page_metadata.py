"""Page metadata: outward-rounded fp8 key boxes and 8-bit key sketches, kept equal to a
from-scratch build on append.

Both update paths (torch reductions, Triton kernel) are checked against
``PageMetadata.from_cache``, bit for bit, including pages that are freed and handed to another
request (their summary must restart, not merge with the previous owner's); ``from_cache`` is
checked against brute force: each box contains its page's keys and is the tightest such box
on the fp8 grid; each token's sketch cell contains its key and the grid is the finest the
rule of ``build_key_sketch`` allows.
"""

import pytest
import torch

from hypothesis import given, settings
from hypothesis import strategies as st

from art_runtime import PageMetadata
from art_runtime.page_metadata import (KEY_BOX_DTYPE, SKETCH_LEVELS, key_box_scale, quantize_key_box,
                                      sketch_step_floor)
from art_runtime.backend import triton_runs_on
from art_runtime.paged_cache import allocate_paged_kv_cache, append_paged_kv_cache, get_batch_indices_positions


def assert_same_metadata(meta, expected, pages):
    pages = pages.long()
    assert torch.equal(meta.key_scale[pages], expected.key_scale[pages])
    assert torch.equal(meta.key_min[pages].view(torch.uint8), expected.key_min[pages].view(torch.uint8))
    assert torch.equal(meta.key_max[pages].view(torch.uint8), expected.key_max[pages].view(torch.uint8))
    assert torch.allclose(meta.value_norm_max[pages], expected.value_norm_max[pages], rtol=1e-6)
    assert meta.has_sketch == expected.has_sketch
    for name in ("key_grid_exponent", "key_codes") if expected.has_sketch else ():
        assert torch.equal(getattr(meta, name)[pages], getattr(expected, name)[pages]), name


class Growing:
    """Requests that grow token by token in a cache, with metadata kept current on append."""

    def __init__(self, page_size, dtype, kv_layout, device, seed, use_triton, sketch=True):
        self.page_size, self.kv_layout, self.device = page_size, kv_layout, device
        self.gen = torch.Generator().manual_seed(seed)
        self.max_pages, self.heads, self.dim = 160, 2, 64
        self.cache = allocate_paged_kv_cache(self.max_pages, page_size, self.heads, self.dim, dtype=dtype,
                                             device=device, kv_layout=kv_layout)
        self.cache.normal_()  # slots not yet written hold garbage, as in a real pool
        self.dtype = dtype
        self.meta = PageMetadata.allocate(self.max_pages, page_size, self.heads, self.dim, device=device, sketch=sketch)
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
        dtype = self.dtype
        keys = torch.randn(nnz, self.heads, self.dim, generator=self.gen).to(dtype).to(self.device)
        values = torch.randn(nnz, self.heads, self.dim, generator=self.gen).to(dtype).to(self.device)
        append_paged_kv_cache(keys, values, batch, positions, self.cache, indices, indptr, last, self.kv_layout)
        if self.use_triton:
            self.meta.update(keys, values, batch, positions, indices, indptr)
        else:
            self.meta._update_torch(keys, values, batch, positions, indices, indptr, self.page_size)

    def check(self):
        indptr, indices, last = self.table()
        expected = PageMetadata.from_cache(self.cache, indptr, indices, last, self.kv_layout,
                                           sketch=self.meta.has_sketch)
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


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_metadata_without_sketch_follows_appends(use_triton, device):
    """Metadata allocated without the key sketch (modes other than ``bound``) keeps its boxes
    and norms as the full build does."""
    if use_triton and not triton_runs_on(torch.device(device)):
        pytest.fail("the Triton path must run here (CUDA, or TRITON_INTERPRET=1 on CPU)")
    run = Growing(16, torch.bfloat16, "NHD", device, seed=3, use_triton=use_triton, sketch=False)
    run.add_request()
    run.add_request()
    run.append([37, 20])
    run.check()
    run.append([1, 1])
    run.check()
    assert run.meta.key_codes is None and run.meta.key_sketch_bytes_per_page() == 0


@pytest.mark.parametrize("sketch", [True, False])
@pytest.mark.parametrize("page_size, head_dim", [(16, 64), (5, 128), (1, 256)])
def test_stored_bytes_per_page_is_what_allocate_takes(sketch, page_size, head_dim):
    pages, heads = 7, 3
    meta = PageMetadata.allocate(pages, page_size, heads, head_dim, device="cpu", sketch=sketch)
    storages = {}
    for value in vars(meta).values():
        if isinstance(value, torch.Tensor):  # key_min and key_max share one storage
            storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    assert sum(storages.values()) == pages * heads * PageMetadata.stored_bytes_per_page(page_size, head_dim, sketch)
    assert meta.clone().has_sketch == sketch
    if not sketch:
        with pytest.raises(ValueError, match="other has no key sketch"):
            PageMetadata.allocate(pages, page_size, heads, head_dim, device="cpu").copy_pages_from(meta)


def test_from_cache_matches_brute_force(device):
    cache = torch.randn(6, 2, 4, 3, 16, device=device)
    indptr = torch.tensor([0, 2, 3], dtype=torch.int32, device=device)
    indices = torch.tensor([4, 1, 5], dtype=torch.int32, device=device)
    last = torch.tensor([3, 2], dtype=torch.int32, device=device)
    meta = PageMetadata.from_cache(cache, indptr, indices, last)
    for page, tokens in [(4, 4), (1, 3), (5, 2)]:
        keys, values = cache[page, 0, :tokens], cache[page, 1, :tokens]  # [tokens, H, D]
        assert_tightest_box(meta, page, keys)
        assert torch.allclose(meta.value_norm_max[page], values.norm(dim=-1).amax(0))
    untouched = torch.tensor([0, 2, 3])
    assert (meta.key_scale[untouched] == 0).all() and (meta.value_norm_max[untouched] == 0).all()


def test_a_page_shared_by_requests_is_summarized_over_its_longest_reader(device):
    cache = torch.randn(3, 2, 8, 1, 16, device=device)
    # Both requests read page 2: the first all 8 of its tokens, the second (listed last, so
    # a plain scatter would keep its summary) only 3.
    indptr = torch.tensor([0, 2, 4], dtype=torch.int32, device=device)
    indices = torch.tensor([1, 2, 0, 2], dtype=torch.int32, device=device)
    last = torch.tensor([8, 3], dtype=torch.int32, device=device)
    meta = PageMetadata.from_cache(cache, indptr, indices, last)
    assert_tightest_box(meta, 2, cache[2, 0])


def e4m3_values() -> torch.Tensor:
    """Every finite e4m3 value, sorted."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(KEY_BOX_DTYPE).float()
    return values[values.isfinite()].unique()


def assert_tightest_box(meta, page, keys):
    """The stored box of ``page`` contains ``keys`` (``[tokens, H, D]``) and is the tightest on its grid."""
    heads = keys.shape[1]
    lo, hi = meta.key_bounds(torch.full((heads,), page), torch.arange(heads))  # [H, D]
    lo, hi, keys = lo.double(), hi.double(), keys.double()
    assert (lo <= keys.amin(0)).all() and (hi >= keys.amax(0)).all()
    scale = meta.key_scale[page].double()[:, None]
    grid = e4m3_values().double().to(lo.device)
    # No grid value strictly between the stored bound and the true extreme.
    true_lo, true_hi = keys.amin(0) / scale, keys.amax(0) / scale
    next_above_lo = grid[torch.searchsorted(grid, (lo / scale).flatten(), right=True)].view_as(lo)
    next_below_hi = grid[torch.searchsorted(grid, (hi / scale).flatten()) - 1].view_as(hi)
    assert (next_above_lo > true_lo).all() and (next_below_hi < true_hi).all()
    # The scale puts the largest |key| in [128, 256): 4 significant bits everywhere above 2^-9.
    top = keys.abs().amax(0).amax(-1) / scale[:, 0]
    assert ((top >= 128) & (top < 256)).all()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(1e-6, 1e6), st.integers(1, 16))
def test_quantized_boxes_contain_keys_and_are_tightest(seed, magnitude, tokens):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(tokens, 2, 32, generator=gen, dtype=torch.float64) * magnitude
    keys[:, :, :4] *= 1e-4  # small dimensions next to large ones share a page's scale
    keys = keys.float()
    lo, hi = keys.amin(0), keys.amax(0)
    scale = key_box_scale(torch.maximum(lo.abs(), hi.abs()).amax(-1))
    lo8, hi8 = quantize_key_box(lo, hi, scale)
    meta = PageMetadata.allocate(1, 16, 2, 32, device="cpu")
    meta.key_min[0], meta.key_max[0], meta.key_scale[0] = lo8, hi8, scale
    assert_tightest_box(meta, 0, keys)


def assert_finest_sketch(meta, page, keys):
    """Every key of ``page`` (``[tokens, H, D]``) lies in its cell, and the grid is the finest the
    rule allows: the smallest power-of-two step (at least ``sketch_step_floor``) whose 256 cells
    from the box's ``floor(box_min / s) s`` reach above every key."""
    tokens, heads = keys.shape[:2]
    lo, hi = meta.key_cells(torch.full((heads,), page), torch.arange(heads))  # [H, P, D]
    keys = keys.transpose(0, 1).double()  # [H, tokens, D]
    lo, hi = lo[:, :tokens].double(), hi[:, :tokens].double()
    assert (lo <= keys).all() and (keys <= hi).all()
    step = (hi - lo)[:, 0]  # [H, D]
    assert ((hi - lo) == step[:, None]).all()
    assert (torch.log2(step) == torch.log2(step).round()).all()  # powers of two
    floor = sketch_step_floor(meta.key_scale[page]).double()[:, None]
    assert (step >= floor).all()
    box_min = meta.key_bounds(torch.full((heads,), page), torch.arange(heads))[0].double()
    base = torch.floor(box_min / step) * step
    assert ((lo - base[:, None]) / step[:, None]).remainder(1).eq(0).all()  # cells of the box-based grid
    kmax = keys.amax(1)
    assert (kmax < base + SKETCH_LEVELS * step).all()
    # Half the step breaks the rule or the floor.
    half = step / 2
    fits_half = kmax < torch.floor(box_min / half) * half + SKETCH_LEVELS * half
    assert (~fits_half | (half < floor)).all()


def test_sketch_of_a_page_of_zero_keys():
    """Zero keys give a zero box scale; their cells still hold them (the grid's step is 2^-126)."""
    cache = torch.zeros(1, 2, 16, 2, 32)
    meta = PageMetadata.from_cache(cache, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
                                   torch.tensor([5], dtype=torch.int32))
    lo, hi = meta.key_cells(torch.zeros(2, dtype=torch.long), torch.arange(2))
    assert (meta.key_scale[0] == 0).all() and (lo[:, :5] <= 0).all() and (hi[:, :5] >= 0).all()
    assert ((hi - lo)[:, :5] == 2.0**-126).all()


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(1e-6, 1e6), st.integers(1, 16),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), st.floats(0, 1e3))
def test_sketch_cells_contain_keys_and_are_finest(seed, magnitude, tokens, dtype, offset):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(tokens, 2, 32, generator=gen, dtype=torch.float64) * magnitude
    keys[:, :, :4] *= 1e-4  # small dimensions next to large ones
    keys[:, :, 4:8] = keys[:, :, 4:8] * 1e-3 + offset * magnitude  # nearly constant, far from zero
    keys[:, 1, 8:12] = keys[0, 1, 8:12].clone()  # identical tokens: a zero range
    keys[:, :, 12] = 0.0
    keys = keys.to(dtype)  # the cache's dtype: its values are what the sketch must contain
    if not keys.isfinite().all():
        return
    cache = torch.zeros(1, 2, 16, 2, 32, dtype=dtype)
    cache[0, 0, :tokens] = keys
    meta = PageMetadata.from_cache(cache, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
                                   torch.tensor([tokens], dtype=torch.int32))
    assert_finest_sketch(meta, 0, keys.float())
