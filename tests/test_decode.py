"""ART decode against a float64 reference, on both backends, across shapes and layouts.

On CPU CI the Triton backend runs under the Triton interpreter; on a GPU it runs compiled.
"""

import math

import pytest
import torch

from art_runtime import BatchARTDecodeWrapper, PageSelection, TerminationConfig
from attention_cases import exact_attention, make_case, relative_error

BACKENDS = ["torch", "triton"]
# Kernel error, measured on a float32 output so that the output format's own rounding
# (2^-9 relative for bf16, more than the whole budget) is not counted.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}
# Output in the input dtype: the float32 result rounded, so within one unit in the last place.
ROUNDING = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}

# (seq_lens, H_qo, H_kv, head_dim, page_size): GQA groups 1..16, head_dim 64/128/256,
# page sizes 1..64 (odd ones too), partial last pages everywhere.
SHAPES = [
    ([37, 5, 100], 4, 4, 64, 1),
    ([130, 17], 8, 2, 128, 16),
    ([300, 1, 77], 14, 2, 64, 16),
    ([95, 200], 16, 1, 64, 3),
    ([129, 64], 8, 1, 256, 64),
    ([71], 12, 4, 128, 7),
    ([250, 33], 32, 8, 128, 32),
]


def run_art(case, backend, termination, out_dtype=None, **plan_kwargs):
    wrapper = BatchARTDecodeWrapper(kv_layout=case.kv_layout, backend=backend)
    wrapper.plan(*case.plan_args(), termination=termination, **plan_kwargs)
    # Poisoned: every element must be written.
    out = torch.full(case.q.shape, float("nan"), dtype=out_dtype or case.q.dtype, device=case.q.device)
    _, lse = wrapper.run(case.q, case.cache, return_lse=True, out=out)
    return out, lse, wrapper.last_stats


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"G{s[1] // s[2]}-D{s[3]}-P{s[4]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_off_equals_exact_attention(backend, shape, dtype, device):
    seq_lens, hq, hk, dim, page = shape
    case = make_case(seq_lens, hq, hk, dim, page, dtype=dtype, device=device, seed=len(seq_lens) + dim)
    out, lse, stats = run_art(case, backend, TerminationConfig(mode="off"), out_dtype=torch.float32)
    ref, ref_lse = exact_attention(case)
    assert relative_error(out, ref).max() <= TOLERANCE[dtype]
    out_in_dtype, _, _ = run_art(case, backend, TerminationConfig(mode="off"))
    assert relative_error(out_in_dtype, ref).max() <= ROUNDING[dtype]
    assert torch.allclose(lse.cpu().double(), ref_lse, atol=1e-3, rtol=1e-4)
    assert torch.equal(stats.visited_pages, stats.selected_pages)
    assert (stats.stable_at == -1).all()
    tokens = torch.tensor(seq_lens, device=stats.visited_tokens.device)[:, None].expand(-1, hk)
    assert torch.equal(stats.visited_tokens.long(), tokens)
    assert int(stats.kv_bytes_read) == sum(seq_lens) * hk * 2 * dim * case.q.element_size()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_layout", ["NHD", "HND"])
@pytest.mark.parametrize("separate_kv", [False, True], ids=["single", "tuple"])
def test_layouts(backend, kv_layout, separate_kv, device):
    case = make_case([90, 33, 160], 8, 2, 64, 16, dtype=torch.bfloat16, kv_layout=kv_layout,
                     separate_kv=separate_kv, device=device, seed=3)
    out, _, _ = run_art(case, backend, TerminationConfig(mode="off"), out_dtype=torch.float32)
    ref, _ = exact_attention(case)
    assert relative_error(out, ref).max() <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_pages,head_dim", [(1, 64), (3, 64), (8, 64), (1, 256)])
def test_split_rows_merge_to_exact_attention(backend, chunk_pages, head_dim, device):
    """Head dim 256 with 50 one-page chunks: the merge reads 16 chunks a step and rescales."""
    case = make_case([400, 31, 257], 8, 2, head_dim, 8, device=device, seed=5)
    termination = TerminationConfig(mode="off", block_pages=1)
    out, lse, stats = run_art(case, backend, termination, chunk_pages=chunk_pages)
    ref, ref_lse = exact_attention(case)
    assert relative_error(out, ref).max() <= 1e-5
    assert torch.allclose(lse.cpu().double(), ref_lse, atol=1e-4)
    assert torch.equal(stats.visited_pages, stats.selected_pages)


def random_selection(case, seed, keep=0.5):
    """Random subsets of pages per (request, KV head), in random order."""
    gen = torch.Generator().manual_seed(seed)
    indptr, pages = [0], []
    for n in case.pages_per_request():
        for _ in range(case.num_kv_heads):
            count = max(1, int(n * keep))
            chosen = torch.randperm(n, generator=gen)[:count]
            pages.append(chosen)
            indptr.append(indptr[-1] + count)
    return PageSelection(torch.tensor(indptr, dtype=torch.int32, device=case.kv_indptr.device),
                         torch.cat(pages).to(torch.int32).to(case.kv_indptr.device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_pages", [None, 2])
def test_selection_equals_attention_over_selected_pages(backend, chunk_pages, device):
    case = make_case([260, 70, 129], 12, 3, 64, 16, device=device, seed=7)
    selection = random_selection(case, seed=1)
    out, _, stats = run_art(case, backend, TerminationConfig(mode="off", block_pages=1),
                            selection=selection, chunk_pages=chunk_pages)
    ref, _ = exact_attention(case, selection)
    assert relative_error(out, ref).max() <= 1e-5
    expected = (selection.indptr[1:] - selection.indptr[:-1]).view(3, 3)
    assert torch.equal(stats.visited_pages, expected)


@pytest.mark.parametrize("shape", [([300, 1, 77, 20, 5, 64, 33, 16, 140], 14, 2, 64, 16), ([37, 5, 300], 28, 4, 64, 1),
                                   ([900, 161, 7, 640, 33], 16, 4, 32, 8), ([700, 2, 513], 32, 4, 64, 16)],
                         ids=["G7-D64-P16", "G7-D64-P1", "G4-D32-P8", "G8-D64-P16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk_pages", [None, 1])
def test_heads_read_together_equal_exact_attention(shape, dtype, chunk_pages, monkeypatch, device):
    """Mode off on a dense plan reads adjacent KV heads in one program (``heads_per_item``):
    each query head's output, LSE and every work item's counters as if read alone, whole rows
    and split ones (each program then writes the same chunk of the heads' rows), padding rows
    of the tile (G7) or none (G8 two heads, G4 four heads at head_dim 32). Planned for one program slot,
    as on a CPU, so that these few rows read heads together on a GPU too."""
    monkeypatch.setattr(BatchARTDecodeWrapper, "_parallel_programs", staticmethod(lambda device, termination, row_width: 1))
    seq_lens, hq, hk, dim, page = shape
    case = make_case(seq_lens, hq, hk, dim, page, dtype=dtype, device=device, seed=11)
    wrapper = BatchARTDecodeWrapper(backend="triton")
    wrapper.plan(*case.plan_args(), termination=TerminationConfig(mode="off"), chunk_pages=chunk_pages)
    assert wrapper._plan.heads_per_item > 1
    assert wrapper._plan.split or chunk_pages is None
    out = torch.full(case.q.shape, float("nan"), dtype=torch.float32, device=device)
    _, lse = wrapper.run(case.q, case.cache, return_lse=True, out=out)
    ref, ref_lse = exact_attention(case)
    assert relative_error(out, ref).max() <= TOLERANCE[dtype]
    assert torch.allclose(lse.cpu().double(), ref_lse, atol=1e-3, rtol=1e-4)
    stats = wrapper.last_stats
    assert torch.equal(stats.visited_pages, stats.selected_pages)
    tokens = torch.tensor(seq_lens, device=stats.visited_tokens.device)[:, None].expand(-1, hk)
    assert torch.equal(stats.visited_tokens.long(), tokens) and torch.equal(stats.loaded_tokens.long(), tokens)
    assert (stats.stable_at == -1).all()


def test_heads_per_item_rule():
    """Adjacent KV heads can share a program where their query rows fit the group's tile and fill
    at least 7/8 of it, and their token rows are at most 128 wide; a plan uses them only where its
    rows still make a work item for every program slot."""
    from art_runtime.plan import rows_fill_slots, shared_heads_per_item

    assert shared_heads_per_item(2, 7, 64) == 2    # Qwen2.5-0.5B: 14 of 16 tile rows
    assert shared_heads_per_item(4, 8, 64) == 2    # 32/4/64: 16 of 16
    assert shared_heads_per_item(8, 4, 128) == 1   # Llama-3-8B: 256-wide rows were no faster
    assert shared_heads_per_item(8, 4, 64) == 1    # Llama-3.2-1B: 8 of 16 rows, slower than one head
    assert shared_heads_per_item(32, 1, 64) == 1   # MHA: 2 of 16 rows, slower than one head
    assert shared_heads_per_item(3, 3, 64) == 1    # SmolLM2: 3 KV heads
    assert shared_heads_per_item(16, 4, 32) == 4   # head_dim 32: 4 heads, 128 wide, 16 of 16 rows
    assert shared_heads_per_item(4, 16, 64) == 1   # 32 query rows would need a 32-row tile
    assert not rows_fill_slots(2, 256, 2 * 264)    # batch 1 at 2 KV heads: 2 rows x 64 chunks
    assert rows_fill_slots(32, 256, 2 * 264)       # batch 16
    assert not rows_fill_slots(32, 32, 2 * 264)    # batch 16 at 4K: chunks of two blocks, 16 a row
    assert rows_fill_slots(128, 32, 2 * 264)


@pytest.mark.parametrize("case_kwargs,plan_kwargs", [
    ({}, dict(termination=TerminationConfig(mode="mass"))),
    ({}, dict(termination=TerminationConfig(mode="off"), record_page_mass=True)),
    ({}, dict(termination=TerminationConfig(mode="off"), selection="random")),
    ({}, dict(termination=TerminationConfig(mode="off", block_pages=4))),
    (dict(kv_layout="HND"), dict(termination=TerminationConfig(mode="off"))),
    (dict(page_size=256), dict(termination=TerminationConfig(mode="off"))),
], ids=["mass", "page-mass", "selection", "block-pages", "HND", "page-256"])
def test_heads_per_item_only_for_a_shared_order_in_mode_off(case_kwargs, plan_kwargs, device):
    """Per-head visit orders (a selection, a termination mode's own stops), per-head page masses,
    an explicit block, an HND cache (not measured) and pages wider than the tile keep one KV
    head a program."""
    case = make_case([300, 77], 14, 2, 64, case_kwargs.pop("page_size", 16), device=device, seed=2, **case_kwargs)
    if plan_kwargs.get("selection") == "random":
        plan_kwargs = dict(plan_kwargs, selection=random_selection(case, seed=3))
    wrapper = BatchARTDecodeWrapper(kv_layout=case.kv_layout, backend="triton")
    wrapper.plan(*case.plan_args(), **plan_kwargs)
    assert wrapper._plan.heads_per_item == 1


def test_heads_per_item_is_checked(device):
    """``build_plan`` refuses heads read together where they would be wrong: query rows past the
    group's tile, or heads whose visit orders differ."""
    from art_runtime.plan import build_plan
    from art_runtime.selection import dense_selection

    case = make_case([300, 77], 32, 2, 64, 16, device=device, seed=4)  # 16 query heads a KV head
    args = (*case.plan_args(), TerminationConfig(mode="off"), 0.125)
    with pytest.raises(ValueError, match="heads_per_item"):
        build_plan(*args, dense_selection(case.kv_indptr, 2), None, 1, 128, heads_per_item=2)
    case = make_case([300, 77], 14, 2, 64, 16, device=device, seed=4)
    args = (*case.plan_args(), TerminationConfig(mode="off"), 0.125)
    build_plan(*args, dense_selection(case.kv_indptr, 2), None, 1, 128, heads_per_item=2)  # shared: accepted
    with pytest.raises(ValueError, match="same pages"):
        build_plan(*args, random_selection(case, seed=5, keep=1.0), None, 1, 128, heads_per_item=2)


def test_off_on_a_wave_split_plan_equals_exact_attention(monkeypatch, device):
    """Rows cut by the wave model into more chunks than slots over rows merge to exact attention."""
    monkeypatch.setattr(BatchARTDecodeWrapper, "_parallel_programs", staticmethod(lambda device, termination, row_width: 8))
    case = make_case([3072, 2900], 9, 3, 64, 16, device=device, seed=6)  # 6 rows of 24 blocks for 8 slots
    wrapper = BatchARTDecodeWrapper(backend="triton")
    wrapper.plan(*case.plan_args(), termination=TerminationConfig(mode="off"))
    assert wrapper._plan.num_work == 24  # 4 chunks a row: 3 waves of 6 blocks, against 1 of 24
    out, lse, stats = run_art(case, "triton", TerminationConfig(mode="off"), out_dtype=torch.float32)
    ref, ref_lse = exact_attention(case)
    assert relative_error(out, ref).max() <= 1e-5
    assert torch.allclose(lse.cpu().double(), ref_lse, atol=1e-4)
    assert torch.equal(stats.visited_pages, stats.selected_pages)


def test_empty_batch(device):
    empty = torch.zeros(1, dtype=torch.int32, device=device)
    wrapper = BatchARTDecodeWrapper()
    wrapper.plan(empty, empty[:0], empty[:0], 8, 2, 64, 16)
    cache = torch.randn(4, 2, 16, 2, 64, device=device)
    out = wrapper.run(torch.randn(0, 8, 64, device=device), cache)
    assert out.shape == (0, 8, 64)


def test_chunk_choice_bounds_chunk_count_and_length():
    """Mode off: chunks of at least two blocks and at most MAX_CHUNKS_PER_ROW a row; with
    termination at least 16 blocks; rows stay whole when they fill the device alone."""
    from art_runtime.plan import MAX_CHUNKS_PER_ROW, choose_chunk_pages

    assert MAX_CHUNKS_PER_ROW == 64
    assert choose_chunk_pages(2048, 2, 8, 264, terminates=False) == 32  # 132 splits would fit, 64 allowed
    assert choose_chunk_pages(256, 8, 8, 264, terminates=False) == 16  # 16 splits of 8 pages: 2 blocks
    assert choose_chunk_pages(4096, 8, 8, 264, terminates=False) == 128  # 32 splits of 16 blocks: one wave
    assert choose_chunk_pages(2048, 8, 8, 264, terminates=True) == 128  # 16 blocks
    assert choose_chunk_pages(2048, 512, 8, 264, terminates=False) == 2048  # one item a row fills the device


def test_wave_splits_fill_whole_waves():
    """Mode off cuts rows so that the work items fill whole waves: whole where rows and slots are
    powers of two apart, more chunks where they would leave a wave part-empty (192 rows on 264
    slots: one wave of whole rows, 60 SMs with two)."""
    from art_runtime.plan import choose_chunk_pages, wave_splits

    for rows, slots, blocks, splits in [(128, 264, 256, 2), (512, 264, 256, 1), (1024, 264, 32, 1), (32, 264, 256, 8),
                                        (128, 528, 256, 4), (256, 528, 256, 2), (2, 264, 256, 64), (256, 264, 256, 1)]:
        assert wave_splits(rows, blocks, slots, 64) == splits, (rows, slots, blocks)
    assert wave_splits(192, 64, 264, 32) == 4    # 768 items: 3 full waves of 16 blocks
    assert wave_splits(300, 256, 264, 64) == 7   # rounded: a second wave of 36 whole rows
    assert wave_splits(192, 64, 264, 1) == 1     # rows too short to cut
    assert choose_chunk_pages(512, 192, 8, 264, terminates=False) == 128    # 4 chunks of a 512-page row
    assert choose_chunk_pages(2048, 96, 8, 264, terminates=False) == 256    # 8 chunks: 3 waves, not 3 chunks in 2
    assert choose_chunk_pages(2048, 72, 8, 396, terminates=False) == 187    # 11 chunks: 2 waves of 3 programs an SM
    assert choose_chunk_pages(512, 192, 8, 264, terminates=True) == 512     # termination: rounded, whole


def dealt_positions(n, chunk_pages, block_pages):
    """Brute force of ``interleaved_slots`` for one row: its blocks dealt to its chunks in turn,
    first to all while the last chunk has room for a whole block, then to the others; a partial
    last block to the last chunk. Each chunk must end up exactly its planned size."""
    chunks = math.ceil(n / chunk_pages)
    sizes = [min(chunk_pages, n - k * chunk_pages) for k in range(chunks)]
    fill = [k * chunk_pages for k in range(chunks)]
    turn, dest = 0, []
    for start in range(0, n, block_pages):
        size = min(block_pages, n - start)
        if size < block_pages:
            k = chunks - 1
        else:
            while True:  # the next chunk in turn with room for a whole block
                k = turn % chunks
                turn += 1
                if sizes[k] - (fill[k] - k * chunk_pages) >= block_pages:
                    break
        dest += range(fill[k], fill[k] + size)
        fill[k] += size
    assert fill == [k * chunk_pages + sizes[k] for k in range(chunks)]
    return dest


def test_interleaved_slots_deal_each_rows_blocks_to_its_chunks():
    from art_runtime.plan import interleaved_slots

    gen = torch.Generator().manual_seed(4)
    for trial in range(200):
        block_pages = [1, 2, 3, 8][trial % 4]
        chunk_pages = block_pages * int(torch.randint(1, 6, (), generator=gen))
        lengths = torch.randint(1, 70, (int(torch.randint(1, 5, (), generator=gen)),), generator=gen)
        row_start = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
        row_start[1:] = lengths.cumsum(0)
        got = interleaved_slots(row_start, (lengths + chunk_pages - 1) // chunk_pages, chunk_pages, block_pages)
        expected = [int(row_start[r]) + d for r, n in enumerate(lengths.tolist())
                    for d in dealt_positions(n, chunk_pages, block_pages)]
        assert got.tolist() == expected
