"""The GPU benchmarks on real attention, exercised on the CPU: their batch construction and
their ``--dry-run`` mode (the same inputs at a small batch, torch backend, outputs checked).

A small synthetic capture in the captures' file format stands in for the real ones, so these
tests need neither ``../shared/data/captures`` nor a GPU.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
N_TOKENS, QUERIES, DIM = 160, 64, 64


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import real_batch

    return real_batch


def write_capture(path: Path, layers, num_qo_heads: int, num_kv_heads: int, seed: int) -> None:
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in layers:
        tensors[f"L{layer}.k"] = (2 * torch.randn(num_kv_heads, N_TOKENS, DIM, generator=generator)).half()
        tensors[f"L{layer}.v"] = torch.randn(num_kv_heads, N_TOKENS, DIM, generator=generator).half()
        tensors[f"L{layer}.q_last"] = (2 * torch.randn(num_qo_heads, QUERIES, DIM, generator=generator)).half()
    save_file(tensors, str(path), metadata={"model": "synthetic", "text": "random", "n_tokens": str(N_TOKENS),
                                            "scaling": str(DIM ** -0.5)})


@pytest.fixture
def captures(tmp_path, benchmarks):
    heads = {"qwen2.5-0.5b": (14, 2), "smollm2-135m": (9, 3)}
    for seed, (model, (file_name, layers)) in enumerate(benchmarks.CAPTURES.items()):
        write_capture(tmp_path / file_name, layers, *heads[model], seed)
    return tmp_path


def test_batch_positions_pages_and_heads(benchmarks, captures):
    layer = benchmarks.load_layer(captures, "smollm2-135m", 15)
    batch = benchmarks.build_real_batch(layer, 3, "cpu", num_qo_heads=8, num_kv_heads=4, head_dim=128, repeats=2)
    assert batch.prefix_lens == [N_TOKENS - QUERIES + b + 1 for b in range(3)]
    assert batch.kv_lens == [2 * n for n in batch.prefix_lens]
    assert batch.sm_scale == pytest.approx(DIM ** -0.5 / 2)
    # Each request's own pages, together a permutation of the cache's pages.
    assert sorted(batch.kv_indices.tolist()) == list(range(batch.paged_kv_cache.shape[0]))
    kv_map, qo_map = benchmarks.head_map(8, 4, 9, 3)
    assert kv_map == [0, 1, 2, 0] and qo_map == [0, 1, 3, 4, 6, 7, 2, 0]
    # Request 1's token t of KV head 3 is capture token t % prefix of KV head 0, repeated along D.
    from art_runtime.paged_cache import gather_request_kv

    keys, values = gather_request_kv(batch.paged_kv_cache, *batch.page_table, 1)
    n = batch.prefix_lens[1]
    expected = layer.keys[0, torch.arange(2 * n) % n].to(torch.bfloat16).repeat(1, 2)
    assert torch.equal(keys[:, 3], expected)
    assert torch.equal(batch.q[2, 5], layer.queries[qo_map[5], 2].to(torch.bfloat16).repeat(2))


def test_exact_attention_unchanged_by_repeats_and_dim_repeats(benchmarks, captures):
    layer = benchmarks.load_layer(captures, "qwen2.5-0.5b", 12)
    plain = benchmarks.build_real_batch(layer, 2, "cpu")
    tiled = benchmarks.build_real_batch(layer, 2, "cpu", head_dim=128, repeats=3)
    out_plain, out_tiled = benchmarks.exact_attention(plain), benchmarks.exact_attention(tiled)
    torch.testing.assert_close(out_tiled, out_plain.repeat(1, 1, 2), rtol=1e-9, atol=1e-12)


def test_exact_attention_over_a_selection(benchmarks, captures):
    from art_runtime import PageSelection

    layer = benchmarks.load_layer(captures, "smollm2-135m", 25)
    batch = benchmarks.build_real_batch(layer, 1, "cpu")
    num_pages = math.ceil(batch.kv_lens[0] / 16)
    keep = [0, num_pages - 1, 2]  # per KV head row: pages 0, last, 2
    selection = PageSelection(torch.arange(0, 3 * len(keep) + 1, len(keep), dtype=torch.int32),
                              torch.tensor(keep * 3, dtype=torch.int32))
    tokens = torch.cat([torch.arange(p * 16, min(p * 16 + 16, batch.kv_lens[0])) for p in sorted(keep)])
    k, v = (t.double()[:, tokens] for t in batch.request_kv(0))
    q = batch.q[0].double().view(3, 3, DIM)
    p = torch.softmax(torch.einsum("kgd,ktd->kgt", q, k) * batch.sm_scale, -1)
    expected = torch.einsum("kgt,ktd->kgd", p, v).flatten(0, 1)
    torch.testing.assert_close(benchmarks.exact_attention(batch, selection)[0], expected)


def test_real_attention_dry_run(benchmarks, captures, tmp_path):
    import bench_real_attention

    out_dir = tmp_path / "out"
    status = bench_real_attention.main(["--dry-run", "--batch", "2", "--captures", str(captures), "--out-dir",
                                        str(out_dir), "--layers", "smollm2-135m:25"])
    assert status == 0
    (result,) = out_dir.glob("real_attention_cpu_*_dry_run.json")
    payload = json.loads(result.read_text())
    rows = payload["rows"]
    assert {(r["model"], r["layer"]) for r in rows} == {("smollm2-135m", 25)}
    # off, the default, mass and bound (fewer if the shipped default is one of them), per policy.
    assert [r["policy"] for r in rows] == ["dense"] * len(payload["settings"]) + [
        f"quest {round(0.25 * 7)} pages"] * len(payload["settings"])  # 7 pages: ceil(99 / 16)
    for row in rows:
        assert 0 < row["read_of_all"] <= row["read_of_selected"] <= 1
        if row["setting"] == "off":
            assert row["read_of_selected"] == 1.0 and row["err_max"] < 1e-2
            assert row["policy"].startswith("quest") or row["dense_err_p99"] == row["err_p99"]
    assert payload["failures"] == []


def test_decode_step_dry_run(benchmarks, captures, tmp_path):
    """Qwen2.5-0.5B only: Llama-3-8B's zero weights take 1.5 GB and ~15 s on the CPU; its head
    mapping is checked by the batch tests and its step model by ``test_step_model_shapes``."""
    import bench_decode_step

    out_dir = tmp_path / "out"
    status = bench_decode_step.main(["--dry-run", "--captures", str(captures), "--out-dir", str(out_dir),
                                     "--kv-len", "300", "--models", "qwen2.5-0.5b"])
    assert status == 0
    (result,) = out_dir.glob("decode_step_cpu_*_dry_run.json")
    rows = json.loads(result.read_text())["rows"]
    assert [(r["model"], r["attention"].split(" ")[1]) for r in rows] == [
        ("qwen2.5-0.5b", "off"), ("qwen2.5-0.5b", "default")]
    for row in rows:
        assert len(row["per_layer"]) == 2
        for layer in row["per_layer"]:
            assert layer["repeats"] == 2  # round(300 / 160)
            assert int(layer["kv_len_range"].split("-")[0]) == 2 * (N_TOKENS - QUERIES + 1)
        if row["attention"] == "ART off":
            assert row["read_fraction"] == 1.0 and row["err_p99"] < 1e-2


def test_step_model_shapes(benchmarks):
    """Every model's step model (its heads and head_dim; hidden, intermediate, vocab 16x smaller)."""
    import dataclasses

    import bench_decode_step

    for shape in bench_decode_step.MODELS.values():
        small = dataclasses.replace(shape, hidden=shape.hidden // 16, intermediate=shape.intermediate // 16,
                                    vocab=shape.vocab // 16)
        step = bench_decode_step.StepModel(small, 3, 1000, 2, "cpu")
        assert step.run().shape == (3,)
        assert step.run(gemms=True, rest=False).shape == (3, small.vocab)
        assert step.run(gemms=False, rest=True).shape == (3,)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
