"""Decode batches built from real attention captures, for the GPU benchmarks on real attention.

A capture layer (``../shared/data/captures/README.md``) holds the post-RoPE keys and values
``[H_kv, n, 64]`` of a real model over real text and the queries of its last 64 positions
``[H_q, 64, 64]``. ``build_real_batch`` turns one layer into a decode batch:

* request ``b`` decodes at position ``n - 64 + (b % 64)``: its query is captured query
  ``b % 64`` and its keys/values are the capture's tokens ``0 .. n - 64 + (b % 64)``
  (``len_b`` tokens), causally, exactly as the model attended;
* ``repeats > 1`` (a longer cache than the capture holds) lays that prefix down ``repeats``
  times in a row: the softmax over the repeated prefix gives every token the same share as
  before, split in ``repeats`` equal copies, so the exact output is unchanged and the
  attention's shape (how many pages carry the mass, in what order) is the capture's, spread
  over ``repeats`` times as many pages. The assumption is that attention at ``repeats * n``
  tokens is as concentrated, in fraction of pages, as at ``n``;
* another head shape than the capture's maps heads as follows: KV head ``j`` is capture KV
  head ``j % H_kv_capture`` (copies of a real head); query head ``m`` of KV head ``j``'s
  group is capture query head ``m' = ((j // H_kv_capture) * G + m) % G_capture`` of the
  capture KV head's group (``G``: group sizes), so each copy sees a different set of real
  queries. A head_dim that is ``r`` times the capture's repeats every vector ``r`` times along
  the dimension (``[x, x]``) with ``sm_scale = scaling / r``: the logits are the real ones
  exactly and every output is the real output repeated ``r`` times;
* every request has its own physical pages (nothing shared, through L2 or otherwise), all
  pages of the batch in one random order; bf16, FlashInfer NHD layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

PAGE_SIZE = 16
DTYPE = torch.bfloat16
CAPTURED_QUERIES = 64
# Capture files (../shared/data/captures) and their layers, by model.
CAPTURES = {
    "qwen2.5-0.5b": ("qwen2.5-0.5b_emma_16k.safetensors", (12, 20)),
    "smollm2-135m": ("smollm2-135m_pride-prejudice_8k.safetensors", (15, 25)),
}
DEFAULT_CAPTURES_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "captures"


def load_layer(captures_dir: Path, model: str, layer: int):
    """The capture layer ``layer`` of ``model`` (``art_runtime.analysis.CaptureLayer``, float32)."""
    from art_runtime.analysis import load_capture_layers

    file_name, _ = CAPTURES[model]
    return next(load_capture_layers(Path(captures_dir) / file_name, [layer]))


@dataclass
class RealBatch:
    """A bf16 decode batch over a capture layer (see the module docstring).

    ``keys``/``values`` ``[H_kv, n, D]`` are the head-mapped capture tokens as stored in the
    cache (bf16); request ``b``'s sequence is ``keys[:, :prefix_lens[b]]`` repeated
    ``repeats`` times.
    """

    q: torch.Tensor  # [B, H_qo, D] bf16
    paged_kv_cache: torch.Tensor  # [pages, 2, PAGE_SIZE, H_kv, D] bf16
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor
    sm_scale: float
    keys: torch.Tensor
    values: torch.Tensor
    prefix_lens: list[int]
    repeats: int

    @property
    def page_table(self):
        return self.kv_indptr, self.kv_indices, self.kv_last_page_len

    @property
    def kv_lens(self) -> list[int]:
        return [self.repeats * n for n in self.prefix_lens]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[0]

    def request_kv(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Request ``b``'s keys and values ``[H_kv, kv_len, D]``, in cache order."""
        n = self.prefix_lens[b]
        return self.keys[:, :n].repeat(1, self.repeats, 1), self.values[:, :n].repeat(1, self.repeats, 1)


def head_map(num_qo_heads: int, num_kv_heads: int, captured_qo: int, captured_kv: int):
    """Capture head of each KV head ``[H_kv]`` and of each query head ``[H_qo]`` (module docstring)."""
    group, captured_group = num_qo_heads // num_kv_heads, captured_qo // captured_kv
    kv = [j % captured_kv for j in range(num_kv_heads)]
    qo = [kv[j] * captured_group + ((j // captured_kv) * group + m) % captured_group
          for j in range(num_kv_heads) for m in range(group)]
    return kv, qo


def build_real_batch(layer, batch_size: int, device, num_qo_heads: int | None = None,
                     num_kv_heads: int | None = None, head_dim: int | None = None,
                     repeats: int = 1, seed: int = 0) -> RealBatch:
    """A ``RealBatch`` of ``batch_size`` requests over capture ``layer`` (module docstring).

    Parameters
    ----------
    layer : art_runtime.analysis.CaptureLayer
    batch_size : int
    device : str or torch.device
    num_qo_heads, num_kv_heads, head_dim : int, optional
        The head shape to build; default the capture's. ``head_dim`` must be a multiple of the
        capture's.
    repeats : int
        Times each request's causal prefix is laid down (kv_len = repeats * prefix).
    seed : int
        Seed of the physical page order.
    """
    captured_kv, n_tokens, captured_dim = layer.keys.shape
    captured_qo, num_queries, _ = layer.queries.shape
    num_qo_heads = num_qo_heads or captured_qo
    num_kv_heads = num_kv_heads or captured_kv
    head_dim = head_dim or captured_dim
    if head_dim % captured_dim or num_qo_heads % num_kv_heads:
        raise ValueError(f"head shape {num_qo_heads}/{num_kv_heads}/{head_dim}: head_dim must be a multiple of "
                         f"{captured_dim} and num_qo_heads a multiple of num_kv_heads")
    if repeats < 1 or batch_size < 1:
        raise ValueError(f"repeats and batch_size must be >= 1, got {repeats}, {batch_size}")
    dim_repeats = head_dim // captured_dim
    kv_map, qo_map = head_map(num_qo_heads, num_kv_heads, captured_qo, captured_kv)
    keys = layer.keys[kv_map].repeat(1, 1, dim_repeats).to(device, DTYPE)
    values = layer.values[kv_map].repeat(1, 1, dim_repeats).to(device, DTYPE)
    positions = [b % num_queries for b in range(batch_size)]
    q = layer.queries[qo_map][:, positions].transpose(0, 1).repeat(1, 1, dim_repeats)
    prefix_lens = [n_tokens - num_queries + p + 1 for p in positions]

    pages_per_request = [math.ceil(repeats * n / PAGE_SIZE) for n in prefix_lens]
    kv_indptr = torch.tensor([0, *torch.tensor(pages_per_request).cumsum(0).tolist()], dtype=torch.int32)
    generator = torch.Generator().manual_seed(seed)
    kv_indices = torch.randperm(int(kv_indptr[-1]), generator=generator).to(torch.int32)
    cache = torch.zeros(int(kv_indptr[-1]), 2, PAGE_SIZE, num_kv_heads, head_dim, dtype=DTYPE, device=device)
    batch = RealBatch(
        q=q.contiguous().to(device, DTYPE), paged_kv_cache=cache, kv_indptr=kv_indptr.to(device),
        kv_indices=kv_indices.to(device),
        kv_last_page_len=torch.tensor([repeats * n - (c - 1) * PAGE_SIZE for n, c in zip(prefix_lens, pages_per_request)],
                                      dtype=torch.int32, device=device),
        sm_scale=layer.scaling / dim_repeats, keys=keys, values=values, prefix_lens=prefix_lens, repeats=repeats,
    )
    for b, pages in enumerate(pages_per_request):
        physical = kv_indices[kv_indptr[b]: kv_indptr[b + 1]].to(device).long()
        for part, tokens in enumerate(batch.request_kv(b)):  # [H_kv, kv_len, D] -> [pages, PAGE_SIZE, H_kv, D]
            padded = torch.nn.functional.pad(tokens, (0, 0, 0, pages * PAGE_SIZE - tokens.shape[1]))
            cache[physical, part] = padded.view(num_kv_heads, pages, PAGE_SIZE, head_dim).transpose(0, 1).transpose(1, 2)
    return batch


def exact_attention(batch: RealBatch, selection=None) -> torch.Tensor:
    """float64 attention of every request over the pages of ``selection`` (None: all pages).

    Parameters
    ----------
    batch : RealBatch
        Queries and K/V are taken as stored (bf16), so that only what ART skips makes a difference.
    selection : art_runtime.PageSelection, optional
        Logical pages per (request, KV head) row (``DecodeStats.selection``).

    Returns
    -------
    torch.Tensor
        ``[B, H_qo, D]`` float64.
    """
    num_kv_heads = batch.num_kv_heads
    group = batch.q.shape[1] // num_kv_heads
    indptr = pages = None
    if selection is not None:
        indptr, pages = selection.indptr.tolist(), selection.pages.long()
    out = []
    for b, kv_len in enumerate(batch.kv_lens):
        keys, values = (t.double() for t in batch.request_kv(b))
        q = batch.q[b].double().view(num_kv_heads, group, -1)
        logits = torch.einsum("kgd,ktd->kgt", q, keys) * batch.sm_scale
        if selection is not None:
            num_pages = math.ceil(kv_len / PAGE_SIZE)
            page_kept = torch.zeros(num_kv_heads, num_pages, dtype=torch.bool, device=logits.device)
            for h in range(num_kv_heads):
                row = b * num_kv_heads + h
                page_kept[h, pages[indptr[row]: indptr[row + 1]]] = True
            token_kept = page_kept.repeat_interleave(PAGE_SIZE, dim=1)[:, :kv_len]
            logits = logits.masked_fill(~token_kept[:, None], float("-inf"))
        out.append(torch.einsum("kgt,ktd->kgd", torch.softmax(logits, -1), values).flatten(0, 1))
    return torch.stack(out)


def relative_errors(out: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``|out - ref| / |ref|`` per (request, query head), float64, flattened."""
    reference = reference.double()
    return ((out.double() - reference).norm(dim=-1) / reference.norm(dim=-1)).flatten()


def error_summary(errors: torch.Tensor) -> dict:
    """Mean, p99 and max of per-head relative errors."""
    errors = errors.double().cpu()
    return {"err_mean": float(errors.mean()), "err_p99": float(errors.quantile(0.99)), "err_max": float(errors.max())}


def plan_art(batch: RealBatch, policy, termination, page_meta, backend: str):
    """Plan ART decode on ``batch`` and run it once.

    Returns
    -------
    tuple
        ``(run, out, stats)``: ``run()`` repeats the decode call (the policy's per-layer
        selection included, as a server runs it), ``out [B, H_qo, D]`` and ``last_stats`` of
        the first call.
    """
    from art_runtime import BatchARTDecodeWrapper

    wrapper = BatchARTDecodeWrapper(kv_layout="NHD", backend=backend)
    num_qo_heads, head_dim = batch.q.shape[1:]
    wrapper.plan(*batch.page_table, num_qo_heads, batch.num_kv_heads, head_dim, PAGE_SIZE,
                 termination=termination, sm_scale=batch.sm_scale, policy=policy,
                 request_ids=list(range(len(batch.prefix_lens))))

    def run():
        return wrapper.run(batch.q, batch.paged_kv_cache, page_meta=page_meta)

    out = run()
    return run, out, wrapper.last_stats


def termination_settings(specs) -> list[tuple[str, object]]:
    """``("off", off)`` then one ``(label, TerminationConfig)`` per spec, duplicates dropped.

    A spec is ``default`` (``TerminationConfig()`` as the installed package ships it) or
    ``MODE[:key=value,...]`` (``art_runtime.analysis.parse_setting``; unset fields keep the
    shipped defaults).
    """
    from art_runtime import TerminationConfig
    from art_runtime.analysis import parse_setting, setting_label

    settings = [("off", TerminationConfig(mode="off"))]
    for spec in specs:
        if spec == "default":
            config = TerminationConfig()
            label = f"default ({setting_label(config)})"
        else:
            config = parse_setting(spec).config
            label = setting_label(config)
        if all(config != known for _, known in settings):
            settings.append((label, config))
    return settings
