"""Tests of art_runtime.paged_cache: FlashInfer-format paged KV cache helpers.

Caches are poisoned with NaN before use, so a read of a slot that was never written, or a
write that lands in the wrong slot, shows up as a NaN or a mismatch.
"""

import math
from itertools import accumulate

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from art_runtime.paged_cache import (
    _append_paged_kv_cache_torch,
    allocate_paged_kv_cache,
    append_paged_kv_cache,
    cache_geometry,
    gather_request_kv,
    get_batch_indices_positions,
    get_seq_lens,
    unpack_paged_kv_cache,
    validate_page_table,
)

LAYOUTS = ["NHD", "HND"]
PAGE_SIZES = [1, 3, 16, 64]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
NUM_KV_HEADS, HEAD_DIM = 2, 8
SPARE_PAGES = 3  # pages no request ever owns: they must stay untouched


class Scenario:
    """A batch of requests growing inside a cache whose pages are handed out shuffled."""

    def __init__(self, max_lens, page_size, dtype, kv_layout, separate_kv, seed,
                 num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, device="cpu"):
        self.page_size, self.dtype, self.kv_layout = page_size, dtype, kv_layout
        self.num_kv_heads, self.head_dim, self.device = num_kv_heads, head_dim, device
        self.generator = torch.Generator().manual_seed(seed)
        pages_per_request = [math.ceil(n / page_size) for n in max_lens]
        self.max_pages = sum(pages_per_request) + SPARE_PAGES
        shuffled = torch.randperm(self.max_pages, generator=self.generator).tolist()
        starts = [sum(pages_per_request[:b]) for b in range(len(max_lens))]
        self.request_pages = [shuffled[s:s + n] for s, n in zip(starts, pages_per_request)]
        self.cache = allocate_paged_kv_cache(
            self.max_pages, page_size, num_kv_heads, head_dim, dtype=dtype, device=device,
            kv_layout=kv_layout, separate_kv=separate_kv,
        )
        for part in unpack_paged_kv_cache(self.cache, kv_layout):
            part.fill_(float("nan"))
        self.lengths = [0] * len(max_lens)
        self.keys = [[] for _ in max_lens]
        self.values = [[] for _ in max_lens]

    def page_table(self):
        """(kv_indptr, kv_indices, kv_last_page_len) for the current lengths."""
        counts = [math.ceil(n / self.page_size) for n in self.lengths]
        indptr = list(accumulate(counts, initial=0))
        indices = [page for pages, n in zip(self.request_pages, counts) for page in pages[:n]]
        last_lens = [n - (count - 1) * self.page_size for n, count in zip(self.lengths, counts)]
        as_int32 = lambda values: torch.tensor(values, dtype=torch.int32, device=self.device)
        return as_int32(indptr), as_int32(indices), as_int32(last_lens)

    def random_kv(self, nnz):
        shape = (nnz, self.num_kv_heads, self.head_dim)
        return tuple(torch.randn(shape, generator=self.generator).to(self.dtype).to(self.device)
                     for _ in range(2))

    def append_inputs(self, new_tokens):
        """Grow each request by new_tokens[b]; return the arguments of an append call."""
        self.lengths = [n + k for n, k in zip(self.lengths, new_tokens)]
        kv_indptr, kv_indices, kv_last_page_len = self.page_table()
        append_indptr = torch.tensor([0] + new_tokens, device=self.device).cumsum(0)
        seq_lens = get_seq_lens(kv_indptr, kv_last_page_len, self.page_size)
        nnz = sum(new_tokens)
        batch_indices, positions = get_batch_indices_positions(append_indptr, seq_lens, nnz)
        keys, values = self.random_kv(nnz)
        for b, (key, value) in enumerate(zip(keys.split(new_tokens), values.split(new_tokens))):
            self.keys[b].append(key)
            self.values[b].append(value)
        return keys, values, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len

    def append(self, new_tokens):
        keys, values, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len = (
            self.append_inputs(new_tokens)
        )
        append_paged_kv_cache(keys, values, batch_indices, positions, self.cache, kv_indices,
                              kv_indptr, kv_last_page_len, kv_layout=self.kv_layout)

    def check_round_trip(self):
        kv_indptr, kv_indices, kv_last_page_len = self.page_table()
        for b in range(len(self.lengths)):
            keys, values = gather_request_kv(self.cache, kv_indptr, kv_indices, kv_last_page_len,
                                             b, kv_layout=self.kv_layout)
            assert torch.equal(keys, torch.cat(self.keys[b]))
            assert torch.equal(values, torch.cat(self.values[b]))


def ragged_lengths(page_size, seed):
    """Four prompt lengths: one token, a full page, and random ones with partial last pages."""
    generator = torch.Generator().manual_seed(seed)
    return [1, page_size] + torch.randint(1, 3 * page_size + 2, (2,), generator=generator).tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("separate_kv", [False, True])
@pytest.mark.parametrize("kv_layout", LAYOUTS)
def test_prompt_then_decode_round_trips(kv_layout, separate_kv, page_size, dtype):
    prompts = ragged_lengths(page_size, seed=page_size)
    decode_steps = page_size + 2  # crosses at least one page boundary in every request
    scenario = Scenario([n + decode_steps for n in prompts], page_size, dtype, kv_layout,
                        separate_kv, seed=1)
    scenario.append(prompts)
    for _ in range(decode_steps):
        scenario.append([1] * len(prompts))
    scenario.check_round_trip()


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("separate_kv", [False, True])
@pytest.mark.parametrize("kv_layout", LAYOUTS)
def test_append_into_partially_filled_last_page(kv_layout, separate_kv, page_size):
    prompts = [page_size + 1, 2 * page_size - 1 if page_size > 1 else 2, 1]
    chunks = [page_size + 2, 0, 2 * page_size]  # the middle request appends nothing
    scenario = Scenario([p + c for p, c in zip(prompts, chunks)], page_size, torch.float32,
                        kv_layout, separate_kv, seed=2)
    scenario.append(prompts)
    scenario.append(chunks)
    scenario.check_round_trip()


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("separate_kv", [False, True])
@pytest.mark.parametrize("kv_layout", LAYOUTS)
def test_append_leaves_unwritten_slots_untouched(kv_layout, separate_kv, page_size):
    prompts = ragged_lengths(page_size, seed=3)
    # Requests own pages for 2 more pages than they fill: those stay NaN, as do spare pages.
    scenario = Scenario([n + 2 * page_size for n in prompts], page_size, torch.float16,
                        kv_layout, separate_kv, seed=3)
    scenario.append(prompts)
    scenario.append([1, 0, 2, 1])
    kv_indptr, kv_indices, kv_last_page_len = scenario.page_table()
    written = torch.zeros(scenario.max_pages, page_size, dtype=torch.bool)
    for b in range(len(prompts)):
        pages = kv_indices[kv_indptr[b]:kv_indptr[b + 1]].long()
        written[pages] = True
        written[pages[-1], kv_last_page_len[b]:] = False
    for part in unpack_paged_kv_cache(scenario.cache, kv_layout):
        nhd = part.transpose(1, 2) if kv_layout == "HND" else part
        assert not nhd[written].isnan().any()
        assert nhd[~written].isnan().all()


@settings(max_examples=200, deadline=None)
@given(page_size=st.integers(1, 70), data=st.data())
def test_get_seq_lens_matches_brute_force(page_size, data):
    pages = data.draw(st.lists(st.integers(1, 5), max_size=6))
    last_lens = [data.draw(st.integers(1, page_size)) for _ in pages]
    indptr = list(accumulate(pages, initial=0))
    seq_lens = get_seq_lens(torch.tensor(indptr, dtype=torch.int32),
                            torch.tensor(last_lens, dtype=torch.int32), page_size)
    expected = [(count - 1) * page_size + last for count, last in zip(pages, last_lens)]
    assert seq_lens.dtype == torch.int32
    assert seq_lens.tolist() == expected


@settings(max_examples=200, deadline=None)
@given(data=st.data(), index_dtype=st.sampled_from([torch.int32, torch.int64]))
def test_get_batch_indices_positions_matches_brute_force(data, index_dtype):
    appended = data.draw(st.lists(st.integers(0, 7), max_size=6))  # zero-token appends too
    seq_lens = [n + data.draw(st.integers(0, 20)) for n in appended]
    append_indptr = list(accumulate(appended, initial=0))
    expected_batch, expected_positions = [], []
    for b, (count, seq_len) in enumerate(zip(appended, seq_lens)):
        for j in range(count):
            expected_batch.append(b)
            expected_positions.append(seq_len - count + j)
    batch_indices, positions = get_batch_indices_positions(
        torch.tensor(append_indptr, dtype=index_dtype), torch.tensor(seq_lens, dtype=index_dtype),
        append_indptr[-1],
    )
    assert batch_indices.dtype == positions.dtype == torch.int32
    assert batch_indices.tolist() == expected_batch
    assert positions.tolist() == expected_positions


def test_get_batch_indices_positions_flashinfer_docstring_example():
    append_indptr = torch.tensor([0, 1, 3, 6, 10], dtype=torch.int32)
    batch_indices, positions = get_batch_indices_positions(append_indptr, torch.tensor([5] * 4), 10)
    assert batch_indices.tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    assert positions.tolist() == [4, 3, 4, 2, 3, 4, 1, 2, 3, 4]


@pytest.mark.parametrize("kv_layout", LAYOUTS)
def test_allocate_shapes_and_geometry(kv_layout):
    single = allocate_paged_kv_cache(5, 4, 3, 8, dtype=torch.bfloat16, kv_layout=kv_layout)
    k_cache, v_cache = allocate_paged_kv_cache(5, 4, 3, 8, kv_layout=kv_layout, separate_kv=True)
    page_shape = (4, 3, 8) if kv_layout == "NHD" else (3, 4, 8)
    assert single.shape == (5, 2, *page_shape) and single.dtype == torch.bfloat16
    assert k_cache.shape == v_cache.shape == (5, *page_shape) and k_cache.dtype == torch.float16
    for cache in (single, (k_cache, v_cache)):
        assert cache_geometry(cache, kv_layout) == (5, 4, 3, 8)
    k_view, v_view = unpack_paged_kv_cache(single, kv_layout)
    assert k_view.data_ptr() == single.data_ptr() and v_view.shape == (5, *page_shape)


def test_validate_page_table_accepts_empty_batch_and_long_indices_buffer():
    int32 = lambda values: torch.tensor(values, dtype=torch.int32)
    assert validate_page_table(int32([0]), int32([]), int32([]), page_size=4, max_pages=1) == 0
    # Entries past kv_indptr[-1] are an unused tail of the buffer: never read, never checked.
    assert validate_page_table(int32([0, 2, 3]), int32([4, 0, 1, 99, -1]), int32([4, 1]),
                               page_size=4, max_pages=5) == 2


def test_append_calls_page_meta_update():
    class RecordingPageMeta:
        def update(self, *args):
            self.args = args

    scenario = Scenario([5, 2], 4, torch.float32, "NHD", False, seed=4)
    keys, values, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len = (
        scenario.append_inputs([5, 2])
    )
    page_meta = RecordingPageMeta()
    append_paged_kv_cache(keys, values, batch_indices, positions, scenario.cache, kv_indices,
                          kv_indptr, kv_last_page_len, page_meta=page_meta)
    expected = (keys, values, batch_indices, positions, kv_indices, kv_indptr)
    assert len(page_meta.args) == len(expected)
    assert all(got is want for got, want in zip(page_meta.args, expected))
    scenario.check_round_trip()


# ---- validation errors -----------------------------------------------------------------------

def _int32(values):
    return torch.tensor(values, dtype=torch.int32)


GOOD_TABLE = dict(kv_indptr=_int32([0, 2, 3]), kv_indices=_int32([4, 0, 1]),
                  kv_last_page_len=_int32([3, 1]), page_size=4, max_pages=5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_pages=0), "max_pages"),
    (dict(page_size=-1), "page_size"),
    (dict(num_kv_heads=1.5), "num_kv_heads"),
    (dict(head_dim=True), "head_dim"),
    (dict(kv_layout="NDH"), "kv_layout"),
])
def test_allocate_errors(kwargs, match):
    sizes = dict(max_pages=2, page_size=4, num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match=match):
        allocate_paged_kv_cache(**{**sizes, **kwargs})


@pytest.mark.parametrize("cache", [
    pytest.param(torch.zeros(2, 4, 1, 8), id="rank-4 single tensor"),
    pytest.param(torch.zeros(2, 3, 4, 1, 8), id="dim 1 not 2"),
    pytest.param((torch.zeros(2, 4, 1, 8),) * 3, id="three members"),
    pytest.param((torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 4)), id="member shapes"),
    pytest.param((torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8, dtype=torch.float16)),
                 id="member dtypes"),
    pytest.param((torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8, device="meta")),
                 id="member devices"),
    pytest.param((torch.zeros(2, 1, 4, 1, 8),) * 2, id="rank-5 members"),
    pytest.param([torch.zeros(2, 4, 1, 8), "v"], id="non-tensor member"),
    pytest.param("cache", id="not a tensor"),
])
def test_unpack_errors(cache):
    with pytest.raises(ValueError, match="paged_kv_cache"):
        unpack_paged_kv_cache(cache)
    with pytest.raises(ValueError, match="paged_kv_cache"):
        cache_geometry(cache)


def test_unpack_layout_error():
    with pytest.raises(ValueError, match="kv_layout"):
        unpack_paged_kv_cache(torch.zeros(2, 2, 4, 1, 8), kv_layout="nhd")


@pytest.mark.parametrize("override, match", [
    (dict(kv_indptr=torch.tensor([0, 2, 3])), "kv_indptr"),  # int64
    (dict(kv_indices=torch.tensor([4, 0, 1])), "kv_indices"),
    (dict(kv_last_page_len=torch.tensor([3, 1])), "kv_last_page_len"),
    (dict(kv_indptr=_int32([[0, 2, 3]])), "kv_indptr"),  # 2-D
    (dict(kv_indices=_int32([[4, 0, 1]])), "kv_indices"),
    (dict(kv_last_page_len=_int32([[3, 1]])), "kv_last_page_len"),
    (dict(kv_indptr=[0, 2, 3]), "kv_indptr"),  # not a tensor
    (dict(kv_indices=_int32([4, 0, 1]).to("meta")), "kv_indices"),
    (dict(kv_last_page_len=_int32([3, 1]).to("meta")), "kv_last_page_len"),
    (dict(kv_indptr=_int32([0, 3])), "kv_indptr"),  # B+1 entries
    (dict(kv_indptr=_int32([1, 2, 3])), r"kv_indptr\[0\]"),
    (dict(kv_indptr=_int32([0, 3, 3])), "kv_indptr.*strictly increasing"),
    (dict(kv_indptr=_int32([0, 2, 1])), "kv_indptr.*strictly increasing"),
    (dict(kv_indptr=_int32([0, 2, 4])), r"kv_indptr\[-1\].*kv_indices"),
    (dict(kv_indices=_int32([5, 0, 1])), "kv_indices out of range"),
    (dict(kv_indices=_int32([4, -1, 1])), "kv_indices out of range"),
    (dict(kv_last_page_len=_int32([3, 0])), "kv_last_page_len"),
    (dict(kv_last_page_len=_int32([5, 1])), "kv_last_page_len"),
    (dict(page_size=0), "page_size"),
    (dict(max_pages=0), "max_pages"),
])
def test_validate_page_table_errors(override, match):
    with pytest.raises(ValueError, match=match):
        validate_page_table(**{**GOOD_TABLE, **override})


def test_validate_page_table_without_max_pages_checks_only_negative_ids():
    table = {**GOOD_TABLE, "kv_indices": _int32([400, 0, 1]), "max_pages": None}
    assert validate_page_table(**table) == 2
    with pytest.raises(ValueError, match="kv_indices out of range"):
        validate_page_table(**{**table, "kv_indices": _int32([-4, 0, 1])})


@pytest.mark.parametrize("args, match", [
    ((torch.tensor([0, 2, 3]), _int32([3, 1]), 4), "kv_indptr"),
    ((_int32([0, 2, 3]), torch.tensor([3.0, 1.0]), 4), "kv_last_page_len"),
    ((_int32([0, 3]), _int32([3, 1]), 4), "kv_indptr"),
    ((_int32([0, 2, 3]), _int32([3, 1]).to("meta"), 4), "kv_last_page_len"),
    ((_int32([0, 2, 3]), _int32([3, 1]), 0), "page_size"),
])
def test_get_seq_lens_errors(args, match):
    with pytest.raises(ValueError, match=match):
        get_seq_lens(*args)


@pytest.mark.parametrize("args, match", [
    ((torch.tensor([0.0, 1.0]), _int32([1]), 1), "append_indptr"),
    ((_int32([0, 1]), torch.tensor([1.0]), 1), "seq_lens"),
    ((_int32([0, 1, 2]), _int32([1]), 1), "append_indptr"),
    ((_int32([0, 1]), _int32([1]).to("meta"), 1), "seq_lens"),
    ((_int32([0, 1]), _int32([1]), -1), "nnz"),
    ((_int32([0, 1]), _int32([1]), 1.0), "nnz"),
])
def test_get_batch_indices_positions_errors(args, match):
    with pytest.raises(ValueError, match=match):
        get_batch_indices_positions(*args)


def _good_append_args():
    """Two requests of 3 and 1 tokens (page size 4) appended to a 5-page NHD fp32 cache."""
    cache = torch.full((5, 2, 4, NUM_KV_HEADS, HEAD_DIM), float("nan"))
    return dict(
        append_key=torch.randn(4, NUM_KV_HEADS, HEAD_DIM),
        append_value=torch.randn(4, NUM_KV_HEADS, HEAD_DIM),
        batch_indices=_int32([0, 0, 0, 1]),
        positions=_int32([0, 1, 2, 0]),
        paged_kv_cache=cache,
        kv_indices=_int32([3, 1]),
        kv_indptr=_int32([0, 1, 2]),
        kv_last_page_len=_int32([3, 1]),
    )


def test_good_append_args_are_good():
    args = _good_append_args()
    append_paged_kv_cache(**args)
    keys, _ = gather_request_kv(args["paged_kv_cache"], args["kv_indptr"], args["kv_indices"],
                                args["kv_last_page_len"], 0)
    assert torch.equal(keys, args["append_key"][:3])


@pytest.mark.parametrize("override, match", [
    (dict(append_key=torch.randn(4, NUM_KV_HEADS + 1, HEAD_DIM)), "append_key"),
    (dict(append_key=torch.randn(4, NUM_KV_HEADS * HEAD_DIM)), "append_key"),
    (dict(append_value=torch.randn(3, NUM_KV_HEADS, HEAD_DIM)), "append_value"),
    (dict(append_value=torch.randn(4, NUM_KV_HEADS, HEAD_DIM - 1)), "append_value"),
    (dict(append_key=torch.randn(4, NUM_KV_HEADS, HEAD_DIM, dtype=torch.float64)), "append_key"),
    (dict(append_value=torch.randn(4, NUM_KV_HEADS, HEAD_DIM).half()), "append_value"),
    (dict(append_key=torch.randn(4, NUM_KV_HEADS, HEAD_DIM, device="meta")), "append_key"),
    (dict(batch_indices=_int32([0, 0, 1])), "batch_indices"),
    (dict(batch_indices=torch.zeros(4)), "batch_indices"),
    (dict(positions=_int32([[0, 1, 2, 0]])), "positions"),
    (dict(positions=_int32([0, 1, 2, 0]).to("meta")), "positions"),
    (dict(kv_indices=torch.tensor([3, 1])), "kv_indices"),
    (dict(kv_indptr=torch.tensor([0, 1, 2])), "kv_indptr"),
    (dict(kv_indptr=_int32([0, 2])), "kv_indptr"),
    (dict(kv_last_page_len=_int32([3, 1]).to("meta")), "kv_last_page_len"),
    (dict(paged_kv_cache=torch.zeros(5, 4, NUM_KV_HEADS, HEAD_DIM)), "paged_kv_cache"),
    (dict(kv_layout="HDN"), "kv_layout"),
])
def test_append_errors(override, match):
    with pytest.raises(ValueError, match=match):
        append_paged_kv_cache(**{**_good_append_args(), **override})


@pytest.mark.parametrize("request_index", [-1, 2, 1.0])
def test_gather_request_errors(request_index):
    args = _good_append_args()
    with pytest.raises(ValueError, match="request"):
        gather_request_kv(args["paged_kv_cache"], args["kv_indptr"], args["kv_indices"],
                          args["kv_last_page_len"], request_index)


def test_gather_validates_page_table_against_the_cache():
    args = _good_append_args()  # its cache has 5 pages
    with pytest.raises(ValueError, match="kv_indices out of range"):
        gather_request_kv(args["paged_kv_cache"], args["kv_indptr"], _int32([3, 5]),
                          args["kv_last_page_len"], 0)


# ---- GPU: torch path == FlashInfer's kernel ---------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("separate_kv", [False, True])
@pytest.mark.parametrize("kv_layout", LAYOUTS)
def test_torch_append_matches_flashinfer_on_cuda(kv_layout, separate_kv, page_size, dtype):
    import flashinfer.page  # must be installed on the GPU machine: an ImportError fails here

    def clone(cache):
        return tuple(part.clone() for part in cache) if separate_kv else cache.clone()

    prompts = ragged_lengths(page_size, seed=5)
    scenario = Scenario([n + 2 for n in prompts], page_size, dtype, kv_layout, separate_kv,
                        seed=5, num_kv_heads=4, head_dim=128, device="cuda")
    for part in unpack_paged_kv_cache(scenario.cache, kv_layout):
        part.copy_(torch.randn(part.shape, generator=scenario.generator).to(dtype))
    for new_tokens in (prompts, [1, 0, 2, 1]):
        args = scenario.append_inputs(new_tokens)
        keys, values, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len = args
        torch_cache, public_cache = clone(scenario.cache), clone(scenario.cache)
        flashinfer.page.append_paged_kv_cache(keys, values, batch_indices, positions,
                                              scenario.cache, kv_indices, kv_indptr,
                                              kv_last_page_len, kv_layout=kv_layout)
        _append_paged_kv_cache_torch(keys, values, batch_indices, positions, torch_cache,
                                     kv_indices, kv_indptr, kv_layout)
        append_paged_kv_cache(keys, values, batch_indices, positions, public_cache, kv_indices,
                              kv_indptr, kv_last_page_len, kv_layout=kv_layout)
        torch.cuda.synchronize()
        for flashinfer_part, torch_part, public_part in zip(
            unpack_paged_kv_cache(scenario.cache, kv_layout),
            unpack_paged_kv_cache(torch_cache, kv_layout),
            unpack_paged_kv_cache(public_cache, kv_layout),
        ):
            assert torch.equal(torch_part, flashinfer_part)
            assert torch.equal(public_part, flashinfer_part)
    scenario.check_round_trip()
