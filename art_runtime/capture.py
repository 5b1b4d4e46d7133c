"""``art-runtime capture``: real queries, keys and values of a model over real text, to fp16
safetensors in the format of ``data/captures/README.md`` (what ``art_runtime.analysis`` and
the GPU benchmarks read).

Per captured layer ``L``: ``L{L}.k`` and ``L{L}.v`` ``[H_kv, n_tokens, D]`` (post-RoPE keys
and the values: the whole cache after the prefill) and ``L{L}.q_last`` ``[H_q, Q, D]``, the
post-RoPE queries of the last ``Q`` positions (position ``n_tokens - Q + i`` attends keys
``0 .. n_tokens - Q + i``): the queries the decode steps at those positions issue, teacher
forced. Metadata: ``model``, ``text``, ``n_tokens``, ``scaling`` (the attention scale),
``capture`` (the tool), ``chunk``, ``queries``.

The prefill runs in chunks through transformers with a capturing attention function
registered in ``AttentionInterface``, *and* its mask builder in ``AttentionMaskInterface``:
without the latter transformers builds no causal mask for an unknown implementation and a
chunked prefill silently attends to its own chunk only. ``verify=True`` repeats the prefill
as a single chunk and checks that every captured tensor matches.

Files hold at most ``MAX_FILE_BYTES`` (60 MiB): the layers are spread over as many files as
needed (``name.safetensors``, then ``name.part2.safetensors``, ...).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_FILE_BYTES = 60 * 1024 * 1024
CAPTURE_IMPLEMENTATION = "art_capture"
_recorder = threading.local()


@dataclass
class CaptureResult:
    """Captured tensors in float32 before they are written (``layer -> tensor``)."""

    keys: dict
    values: dict
    queries: dict
    n_tokens: int
    scaling: float


def _capture_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA attention that records the layer's queries of the captured positions."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = getattr(_recorder, "state", None)
    if state is not None and module.layer_idx in state["layers"]:
        end = key.shape[2]  # tokens so far, this chunk included
        start = end - query.shape[2]
        first = max(start, state["n_tokens"] - state["queries"])
        if first < end:
            state["q"].setdefault(module.layer_idx, []).append(query[0, :, first - start:].detach().float().clone())
        state["scaling"] = scaling
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


@contextlib.contextmanager
def _capturing(model, state: dict):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)  # the trap: see the module docstring
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    _recorder.state = state
    try:
        yield
    finally:
        _recorder.state = None
        model.set_attn_implementation(previous)


def capture_tensors(model, input_ids: torch.Tensor, layers, queries: int = 64, chunk: int = 1024,
                    progress: bool = False) -> CaptureResult:
    """Prefill ``input_ids [1, n]`` in chunks of ``chunk`` tokens; capture ``layers``.

    Returns
    -------
    CaptureResult
        ``keys``/``values`` ``[H_kv, n, D]`` and ``queries`` ``[H_q, queries, D]`` float32.
    """
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from .integrations.transformers import model_forward

    n_tokens = input_ids.shape[1]
    num_layers = model.config.num_hidden_layers
    layers = sorted(set(layers))
    if not layers or any(not isinstance(layer, int) or not 0 <= layer < num_layers for layer in layers):
        raise ValueError(f"layers must be layer indices in 0..{num_layers - 1}, got {layers}")
    if not isinstance(queries, int) or not 1 <= queries <= n_tokens:
        raise ValueError(f"queries must be an int in 1..{n_tokens} (the text's tokens), got {queries!r}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    state = {"layers": set(layers), "n_tokens": n_tokens, "queries": queries, "q": {}, "scaling": None}
    cache = DynamicCache(config=model.config)
    with _capturing(model, state), torch.no_grad():
        for start in tqdm(range(0, n_tokens, chunk), desc="capture prefill", unit="chunk", disable=not progress,
                          leave=False):
            model_forward(model, input_ids[:, start:start + chunk], cache)
    keys = {layer: cache.layers[layer].keys[0].float().clone() for layer in layers}
    values = {layer: cache.layers[layer].values[0].float().clone() for layer in layers}
    q = {layer: torch.cat(state["q"][layer], dim=1) for layer in layers}
    return CaptureResult(keys, values, q, n_tokens, float(state["scaling"]))


def _max_relative_difference(a: CaptureResult, b: CaptureResult) -> float:
    worst = 0.0
    for name in ("keys", "values", "queries"):
        for layer, tensor in getattr(a, name).items():
            other = getattr(b, name)[layer]
            worst = max(worst, float((tensor - other).abs().max() / other.abs().max().clamp(min=1e-30)))
    return worst


def capture(model_name: str, text: str, n_tokens: int, layers, out, *, queries: int = 64, chunk: int = 1024,
            verify: bool = True, tolerance: float = 1e-4, progress: bool = True) -> list[Path]:
    """Capture ``layers`` of ``model_name`` over the first ``n_tokens`` tokens of ``text``.

    Parameters
    ----------
    model_name : str
        ``smollm2``, ``qwen`` or a ``.gguf`` file (``integrations.transformers.load_model``).
    text : str
        A fetched text (``austen``, ``jargon``, ``emma``, ``pride_prejudice``, ...) or a file.
    n_tokens : int
        Tokens of the text to prefill (from its start).
    layers : sequence of int
    out : str or Path
        ``.safetensors`` path of the (first) file.
    queries : int
        Captured last positions (``Q``).
    chunk : int
        Prefill chunk in tokens.
    verify : bool
        Repeat the prefill as one chunk and raise ``RuntimeError`` unless every captured
        tensor matches within ``tolerance`` (relative to its largest magnitude) before the
        fp16 conversion.

    Returns
    -------
    list of Path
        The files written.
    """
    from safetensors.torch import save_file

    from .fetch import MODELS, fetch_text
    from .integrations.transformers import load_model

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"out must be a .safetensors path, got {str(out)!r}")
    if not isinstance(n_tokens, int) or n_tokens < 2:
        raise ValueError(f"n_tokens must be an int >= 2, got {n_tokens!r}")
    model, tokenizer = load_model(model_name, progress=False)
    path = Path(text) if Path(text).is_file() else fetch_text(text, progress=False)
    ids = tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
    if len(ids) < n_tokens:
        raise ValueError(f"n_tokens: {path.name} has only {len(ids)} tokens, {n_tokens} asked")
    input_ids = torch.tensor([ids[:n_tokens]])
    result = capture_tensors(model, input_ids, layers, queries, chunk, progress)
    difference = None
    if verify:
        single = capture_tensors(model, input_ids, layers, queries, n_tokens, progress)
        difference = _max_relative_difference(result, single)
        if difference > tolerance:
            raise RuntimeError(f"the chunked capture differs from a single-chunk forward by {difference:.3g} "
                               f"(relative), more than {tolerance:g}: the causal mask is not applied across chunks")
    metadata = {"model": MODELS[model_name].filename if model_name in MODELS else Path(model_name).name,
                "text": path.name, "n_tokens": str(n_tokens), "scaling": repr(result.scaling),
                "capture": "art-runtime capture", "chunk": str(chunk), "queries": str(queries),
                "verified_against_single_chunk": "not run" if difference is None else f"max relative difference {difference:.3g}"}
    files, current, size = [], {}, 0
    for layer in sorted(result.keys):
        tensors = {f"L{layer}.k": result.keys[layer].half().contiguous(),
                   f"L{layer}.v": result.values[layer].half().contiguous(),
                   f"L{layer}.q_last": result.queries[layer].half().contiguous()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if nbytes > MAX_FILE_BYTES:
            raise ValueError(f"n_tokens: one layer takes {nbytes / 2**20:.1f} MiB, more than a file's "
                             f"{MAX_FILE_BYTES / 2**20:.0f} MiB; capture fewer tokens")
        if current and size + nbytes > MAX_FILE_BYTES:
            files.append(current)
            current, size = {}, 0
        current.update(tensors)
        size += nbytes
    files.append(current)
    written = []
    for index, tensors in enumerate(files):
        target = out if index == 0 else out.with_name(f"{out.stem}.part{index + 1}.safetensors")
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(target), metadata=metadata)
        written.append(target)
    return written

