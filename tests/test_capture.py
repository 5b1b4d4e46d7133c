"""``art-runtime capture`` on SmolLM2: the shared captures' format, checked against one chunk."""

import pytest
import torch
from safetensors import safe_open

from art_runtime.analysis import capture_info, load_capture_layers
from art_runtime.capture import capture_tensors
from art_runtime.cli import main
from art_runtime.fetch import fetch_text
from art_runtime.integrations.transformers import load_model

pytestmark = pytest.mark.slow
TOKENS, QUERIES, LAYERS = 300, 16, [3, 20]


@pytest.fixture(scope="module")
def smollm2():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")
        yield load_model("smollm2", progress=False)


def test_capture_writes_the_shared_format_and_matches_one_chunk(smollm2, tmp_path):
    out = tmp_path / "smol.safetensors"
    assert main(["capture", "--model", "smollm2", "--text", "emma", "--tokens", str(TOKENS), "--layers",
                 *map(str, LAYERS), "--queries", str(QUERIES), "--chunk", "128", "--out", str(out),
                 "--no-progress"]) == 0
    info = capture_info(out)
    assert info["layers"] == LAYERS and info["n_tokens"] == str(TOKENS) and float(info["scaling"]) == 0.125
    assert info["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and info["text"] == "austen_emma.txt"
    assert info["verified_against_single_chunk"].startswith("max relative difference")
    with safe_open(str(out), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    layers = list(load_capture_layers(out))
    assert [layer.keys.shape for layer in layers] == [torch.Size([3, TOKENS, 64])] * 2
    assert [layer.queries.shape for layer in layers] == [torch.Size([9, QUERIES, 64])] * 2
    # the file holds, rounded to fp16 (a rounding boundary may fall between chunked and
    # single-chunk float32 values: one fp16 ulp of slack), what a single-chunk forward computes
    model, tokenizer = smollm2
    ids = tokenizer.encode(fetch_text("emma", progress=False).read_text(), add_special_tokens=False)[:TOKENS]
    single = capture_tensors(model, torch.tensor([ids]), LAYERS, QUERIES, chunk=TOKENS)
    for layer in layers:
        for captured, exact in ((layer.keys, single.keys), (layer.values, single.values),
                                (layer.queries, single.queries)):
            assert torch.allclose(captured, exact[layer.layer], rtol=1e-3, atol=1e-3)


def test_without_the_mask_builder_the_chunked_capture_is_caught(smollm2, monkeypatch):
    """The trap of DESIGN §5: no mask builder -> each chunk attends to the first chunk only."""
    from transformers.masking_utils import AttentionMaskInterface

    model, tokenizer = smollm2
    monkeypatch.delitem(AttentionMaskInterface._global_mapping, "art_capture", raising=False)
    monkeypatch.setattr(AttentionMaskInterface, "register", classmethod(lambda cls, name, fn: None))
    ids = torch.tensor([tokenizer.encode("It was a truth universally acknowledged. " * 40,
                                         add_special_tokens=False)[:TOKENS]])
    chunked = capture_tensors(model, ids, [5], 8, chunk=100)
    single = capture_tensors(model, ids, [5], 8, chunk=TOKENS)
    assert (chunked.keys[5] - single.keys[5]).abs().max() > 1e-2


def test_bad_arguments(smollm2, tmp_path, capsys):
    model, _ = smollm2
    with pytest.raises(ValueError, match="layers"):
        capture_tensors(model, torch.tensor([[1, 2, 3]]), [30], 1)
    with pytest.raises(ValueError, match="queries"):
        capture_tensors(model, torch.tensor([[1, 2, 3]]), [0], 4)
    assert main(["capture", "--tokens", "10", "--layers", "0", "--out", str(tmp_path / "x.bin")]) == 2
    assert "safetensors" in capsys.readouterr().err
