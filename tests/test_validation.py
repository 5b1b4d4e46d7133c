"""Bad input raises ValueError naming the argument; nothing is read out of bounds."""

import pytest
import torch

from art_runtime import BatchARTDecodeWrapper, PageMetadata, PageSelection, TerminationConfig
from attention_cases import make_case


@pytest.fixture
def case(device):
    return make_case([40, 17], 8, 2, 64, 16, device=device, seed=0)


def plan(case, **overrides):
    args = dict(kv_indptr=case.kv_indptr, kv_indices=case.kv_indices, kv_last_page_len=case.kv_last_page_len,
                num_qo_heads=8, num_kv_heads=2, head_dim=64, page_size=16)
    args.update(overrides)
    wrapper = BatchARTDecodeWrapper(backend="torch")
    wrapper.plan(**args)
    return wrapper


def i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


@pytest.mark.parametrize("overrides,match", [
    (dict(num_qo_heads=7), "num_qo_heads"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(head_dim=96), "head_dim"),
    (dict(page_size=0), "page_size"),
    (dict(sm_scale=-1.0), "sm_scale"),
    (dict(termination="stability"), "termination"),
])
def test_plan_rejects_bad_arguments(case, overrides, match):
    with pytest.raises(ValueError, match=match):
        plan(case, **overrides)


def test_plan_rejects_bad_page_tables(case, device):
    with pytest.raises(ValueError, match="kv_indptr"):
        plan(case, kv_indptr=case.kv_indptr.long())
    with pytest.raises(ValueError, match="kv_indptr"):
        plan(case, kv_indptr=i32([0, 3, 2], device))  # not monotone
    with pytest.raises(ValueError, match="kv_last_page_len"):
        plan(case, kv_last_page_len=i32([0, 1], device))
    with pytest.raises(ValueError, match="kv_last_page_len"):
        plan(case, kv_last_page_len=i32([17, 1], device))
    with pytest.raises(ValueError, match="kv_indices"):
        plan(case, kv_indices=case.kv_indices.float())


def test_run_rejects_a_page_index_beyond_the_cache(case, device):
    wrapper = plan(case, kv_indices=torch.full_like(case.kv_indices, 10_000))
    with pytest.raises(ValueError, match="kv_indices"):
        wrapper.run(case.q, case.cache)


@pytest.mark.parametrize("make_q,match", [
    (lambda q: q.half() if q.dtype != torch.float16 else q.float(), "dtype"),
    (lambda q: q.to(torch.int32), "q"),
    (lambda q: q[:, :4], "q"),
    (lambda q: q[:1], "q"),
    (lambda q: q.to("meta"), "q"),
])
def test_run_rejects_bad_queries(case, make_q, match):
    wrapper = plan(case)
    with pytest.raises(ValueError, match=match):
        wrapper.run(make_q(case.q), case.cache)


def test_run_rejects_bad_caches_and_outputs(case):
    wrapper = plan(case)
    with pytest.raises(ValueError, match="paged_kv_cache"):
        wrapper.run(case.q, case.cache[:, :, :8])  # wrong page size
    with pytest.raises(ValueError, match="paged_kv_cache"):
        wrapper.run(case.q, case.cache[..., :32])  # wrong head_dim
    with pytest.raises(ValueError, match="out"):
        wrapper.run(case.q, case.cache, out=torch.empty(3, device=case.q.device))
    with pytest.raises(ValueError, match="page_meta"):
        bound = BatchARTDecodeWrapper(backend="torch")
        bound.plan(*case.plan_args(), termination=TerminationConfig(mode="bound"))
        bound.run(case.q, case.cache, page_meta="not metadata")
    without_sketch = PageMetadata.from_cache(case.cache, *case.plan_args()[:3], sketch=False)
    with pytest.raises(ValueError, match="page_meta has no key sketch"):
        bound.run(case.q, case.cache, page_meta=without_sketch)
    bound.plan(*case.plan_args(), termination=TerminationConfig(mode="mass"))
    bound.run(case.q, case.cache, page_meta=without_sketch)  # mass reads no sketch


def test_run_before_plan_and_stats_before_run():
    wrapper = BatchARTDecodeWrapper()
    with pytest.raises(ValueError, match="plan"):
        wrapper.run(torch.zeros(1, 8, 64), torch.zeros(1, 2, 16, 2, 64))
    with pytest.raises(ValueError, match="last_stats"):
        wrapper.last_stats


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="fast"), "mode"),
    (dict(relative_to="logits"), "relative_to"),
    (dict(eps=-0.1), "eps"),
    (dict(tau_mag=float("nan")), "tau_mag"),
    (dict(patience=0), "patience"),
    (dict(min_pages=-1), "min_pages"),
    (dict(block_pages=0), "block_pages"),
])
def test_termination_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TerminationConfig(**kwargs)


def test_eps_defaults_to_each_modes_calibrated_value():
    from dataclasses import replace

    from art_runtime.termination import DEFAULT_EPS

    assert TerminationConfig(mode="bound").eps == DEFAULT_EPS["bound"]
    assert TerminationConfig(mode="mass").eps == DEFAULT_EPS["mass"]
    assert TerminationConfig(mode="stability").eps == TerminationConfig(mode="off").eps == 0.0  # read by neither
    assert TerminationConfig(mode="mass", eps=0.2).eps == 0.2
    assert replace(TerminationConfig(mode="bound"), mode="mass", eps=None).eps == DEFAULT_EPS["mass"]


def test_wrapper_rejects_bad_layout_and_backend():
    with pytest.raises(ValueError, match="kv_layout"):
        BatchARTDecodeWrapper(kv_layout="NDH")
    with pytest.raises(ValueError, match="backend"):
        BatchARTDecodeWrapper(backend="cuda")


def test_selection_is_checked(case, device):
    def selection(indptr, pages):
        return PageSelection(i32(indptr, device), i32(pages, device))

    with pytest.raises(ValueError, match="selection"):  # wrong number of rows
        plan(case, selection=selection([0, 1], [0]))
    with pytest.raises(ValueError, match="selection"):  # page 3 does not exist in request 0 (3 pages)
        plan(case, selection=selection([0, 1, 2, 3, 4], [3, 0, 0, 0]))
    with pytest.raises(ValueError, match="selection"):  # a page twice in one row
        plan(case, selection=selection([0, 2, 3, 4, 5], [1, 1, 0, 0, 0]))
    with pytest.raises(ValueError, match="selection"):  # an empty row
        plan(case, selection=selection([0, 0, 1, 2, 3], [0, 0, 0]))


def test_bound_output_relative_cannot_be_split(case):
    with pytest.raises(ValueError, match="chunk_pages"):
        plan(case, termination=TerminationConfig(mode="bound", relative_to="output"), chunk_pages=1)
