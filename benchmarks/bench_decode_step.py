"""A decode-step model at batch 64 / kv_len 32K: tokens per second with ART against without.

Performance issue target 5: tokens/s with ART at least 1.3x the same policy without ART at
batch 64, kv_len 32K, for Llama-3-8B and Qwen2.5-0.5B shapes. One decode step is modelled
as ``non-attention + layers x attention per layer``, each measured on the GPU:

* non-attention: every layer's work except attention, with random bf16 weights at the model's
  real shapes (each layer its own weights): RMSNorm (``F.rms_norm``), the QKV GEMM (+ bias for
  Qwen), RoPE (rotate-half torch ops), the write of the new K/V into cache slots, the O GEMM
  and residual add, RMSNorm, the gate+up GEMM, SiLU-mul, the down GEMM and residual add; then
  the embedding lookup, the final RMSNorm, the LM head GEMM and a greedy argmax. All layers
  in one CUDA graph, timed whole, and again with only the GEMMs and only the rest (the
  breakdown). The torch ops are not fused, as a serving engine would fuse them: ``rest`` is an
  upper estimate;
* attention per layer: ART (Triton) on real captured attention (``real_batch``): dense
  (``DensePolicy()``, its ``auto`` order: mass at the default mode), termination ``off``
  against ``TerminationConfig()`` as installed (the calibrated default, read at run time),
  each a median CUDA-graph replay with L2 flushed; the model's attention time per layer is the mean over its captured layers.
  FlashInfer's dense decode is timed on the same caches as a reference.

How the captures map onto each model (``real_batch`` module docstring; also in the results):
Qwen2.5-0.5B uses its own capture (layers 12 and 20, 14/2/64, 16K tokens) with each request's
causal prefix laid down twice (kv_len 32642-32768): the softmax over the doubled prefix is the
real one with every token's weight split in two copies, so the exact output is the capture's
and the assumption is that at 32K attention is as concentrated, in fraction of pages, as at
16K. Llama-3-8B (32/8/128) has no capture: its attention is built from both captures' layers
(Qwen 12, 20: prefix x2; SmolLM2 15, 25: 8K, prefix x4) with KV head j a copy of real KV head
``j % H_kv``, each copy's 4 query heads real query heads of that KV head's group (the next ones
round-robin, so copies see different ones; SmolLM2's groups of 3 repeat one head), and
every head vector repeated twice along head_dim (64 -> 128, ``sm_scale = scaling / 2``: real
logits exactly). Bytes, shapes and page counts are the model's; the attention pattern is real
attention of a smaller model.

``--dry-run`` runs everything on the CPU at a small batch (one layer's weights, zero-valued;
the torch backend of ART; no FlashInfer, no timing) and checks the attention outputs against
exact attention: what CI runs (tests/test_real_benchmarks.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import command_line, run_header, L2Flusher, as_cuda_graph, copy_bandwidth_tbps, device_info, markdown_table, median_time_us, utc_now, report
from real_batch import (DEFAULT_CAPTURES_DIR, DTYPE, PAGE_SIZE, build_real_batch, error_summary, exact_attention,
                        load_layer, plan_art, relative_errors, termination_settings)

TARGET_SPEEDUP = 1.3
MAX_OFF_ERROR = 2e-2
FLASHINFER_WORKSPACE_BYTES = 256 << 20
QWEN_LAYERS = (("qwen2.5-0.5b", 12), ("qwen2.5-0.5b", 20))
SMOLLM2_LAYERS = (("smollm2-135m", 15), ("smollm2-135m", 25))


@dataclass(frozen=True)
class ModelShape:
    """The shapes of one decoder-only model, and the captured layers its attention is timed on."""

    hidden: int
    layers: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    qkv_bias: bool
    tied_embeddings: bool
    captured_layers: tuple


MODELS = {
    "llama-3-8b": ModelShape(4096, 32, 32, 8, 128, 14336, 128256, False, False, QWEN_LAYERS + SMOLLM2_LAYERS),
    "qwen2.5-0.5b": ModelShape(896, 24, 14, 2, 64, 4864, 151936, True, True, QWEN_LAYERS),
}
COLUMNS = [
    ("model", "model", "s"), ("attention", "attention", "s"), ("attention µs / layer", "attention_us", ".1f"),
    ("attention ms / step", "attention_ms", ".2f"), ("GEMMs ms", "gemms_ms", ".2f"), ("rest ms", "rest_ms", ".2f"),
    ("non-attention ms", "non_attention_ms", ".2f"), ("step ms", "step_ms", ".2f"), ("tokens/s", "tokens_per_s", ".0f"),
    ("tokens/s / ART off", "speedup_vs_off", ".3f"), ("attention share", "attention_share", ".3f"),
    ("pages read", "read_fraction", ".3f"), ("err p99 (worst layer)", "err_p99", ".1e"), ("target met", "target", "s"),
]


class StepModel:
    """Random weights and buffers of the non-attention work of one decode step.

    ``run(gemms, rest)`` launches the step's GEMMs and/or its other ops (norms, RoPE, SiLU-mul,
    residuals, K/V slot writes, embedding, argmax) into preallocated buffers, so that either
    part alone is a valid graph to time. The attention output is a fixed buffer.
    """

    def __init__(self, shape: ModelShape, batch: int, kv_len: int, num_layers: int, device):
        self.shape, self.batch = shape, batch
        q_width, kv_width = shape.num_qo_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
        # Values don't matter for timing; scaled so that activations stay finite. The CPU dry run
        # uses zeros (cheap to allocate; it checks shapes only).
        make = ((lambda *size: torch.randn(*size, dtype=DTYPE, device=device).mul_(size[-1] ** -0.5))
                if torch.device(device).type == "cuda" else
                (lambda *size: torch.zeros(*size, dtype=DTYPE, device=device)))
        self.layer_weights = [dict(
            norm_in=torch.ones(shape.hidden, dtype=DTYPE, device=device),
            qkv=make(q_width + 2 * kv_width, shape.hidden),
            qkv_bias=make(q_width + 2 * kv_width) if shape.qkv_bias else None,
            o=make(shape.hidden, q_width),
            norm_post=torch.ones(shape.hidden, dtype=DTYPE, device=device),
            gate_up=make(2 * shape.intermediate, shape.hidden),
            down=make(shape.hidden, shape.intermediate),
        ) for _ in range(num_layers)]
        self.embedding = make(shape.vocab, shape.hidden)
        self.lm_head = self.embedding if shape.tied_embeddings else make(shape.vocab, shape.hidden)
        self.norm_final = torch.ones(shape.hidden, dtype=DTYPE, device=device)
        half = shape.head_dim // 2
        positions = torch.full((batch, 1), float(kv_len), device=device)
        angles = positions * 500000.0 ** (-torch.arange(half, device=device) / half)
        self.cos, self.sin = (f(angles).repeat(1, 2)[:, None].to(DTYPE) for f in (torch.cos, torch.sin))
        self.tokens = torch.randint(shape.vocab, (batch,), device=device)
        self.slots = torch.randperm(4 * batch, device=device)[:batch]
        self.kv_slots = torch.zeros(2, 4 * batch, shape.num_kv_heads, shape.head_dim, dtype=DTYPE, device=device)
        self.attention_out = make(batch, q_width)
        self.x = torch.zeros(batch, shape.hidden, dtype=DTYPE, device=device)
        self.qkv = torch.zeros(batch, q_width + 2 * kv_width, dtype=DTYPE, device=device)
        self.gate_up = torch.zeros(batch, 2 * shape.intermediate, dtype=DTYPE, device=device)
        self.mlp = torch.zeros(batch, shape.intermediate, dtype=DTYPE, device=device)
        self.proj = torch.zeros(batch, shape.hidden, dtype=DTYPE, device=device)
        self.logits = torch.zeros(batch, shape.vocab, dtype=DTYPE, device=device)

    def _rope(self, x: torch.Tensor) -> None:
        """Rotate-half RoPE in place on ``[B, H, D]``."""
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        x.copy_(x * self.cos + rotated * self.sin)

    def run(self, gemms: bool = True, rest: bool = True) -> torch.Tensor:
        s = self.shape
        q_width, kv_width = s.num_qo_heads * s.head_dim, s.num_kv_heads * s.head_dim
        if rest:
            self.x.copy_(F.embedding(self.tokens, self.embedding))
        for w in self.layer_weights:
            if rest:
                h = F.rms_norm(self.x, (s.hidden,), w["norm_in"])
            if gemms:
                torch.mm(h if rest else self.x, w["qkv"].t(), out=self.qkv)
            if rest:
                if w["qkv_bias"] is not None:
                    self.qkv.add_(w["qkv_bias"])
                self._rope(self.qkv[:, :q_width].view(self.batch, s.num_qo_heads, s.head_dim))
                k = self.qkv[:, q_width:q_width + kv_width].view(self.batch, s.num_kv_heads, s.head_dim)
                self._rope(k)
                self.kv_slots[0].index_copy_(0, self.slots, k)
                self.kv_slots[1].index_copy_(0, self.slots, self.qkv[:, q_width + kv_width:].view_as(k))
            if gemms:
                torch.mm(self.attention_out, w["o"].t(), out=self.proj)
            if rest:
                self.x.add_(self.proj)
                h = F.rms_norm(self.x, (s.hidden,), w["norm_post"])
            if gemms:
                torch.mm(h if rest else self.x, w["gate_up"].t(), out=self.gate_up)
            if rest:
                gate, up = self.gate_up.chunk(2, dim=-1)
                torch.mul(F.silu(gate), up, out=self.mlp)
            if gemms:
                torch.mm(self.mlp, w["down"].t(), out=self.proj)
            if rest:
                self.x.add_(self.proj)
        if rest:
            h = F.rms_norm(self.x, (s.hidden,), self.norm_final)
        if gemms:
            torch.mm(h if rest else self.x, self.lm_head.t(), out=self.logits)
        return self.logits.argmax(-1) if rest else self.logits


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captures", type=Path, default=DEFAULT_CAPTURES_DIR, metavar="DIR",
                        help=f"folder of the capture files (default {DEFAULT_CAPTURES_DIR})")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for the JSON and markdown results (default benchmarks/results)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="MODEL",
                        help=f"model shapes (default all: {', '.join(MODELS)})")
    parser.add_argument("--batch", type=int, default=None, help="requests (default 64; --dry-run: 2)")
    parser.add_argument("--kv-len", type=int, default=32768,
                        help="target tokens per request: each captured prefix is laid down round(kv_len / n) times")
    parser.add_argument("--iters", type=int, default=20, help="timed replays per measurement, median reported")
    parser.add_argument("--setting", default="default", metavar="SETTING",
                        help="ART's termination against 'off': 'default' (TerminationConfig() as installed) or "
                             "MODE[:key=value,...] (default: default)")
    parser.add_argument("--no-flashinfer", action="store_true", help="skip FlashInfer's dense decode reference")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, torch backend, small batch, one layer of zero weights: check, no timing")
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.dry_run else 64)
    return args


def attention_rows(model: str, shape: ModelShape, args, settings, timer, flashinfer_wrapper, device) -> list[dict]:
    """ART (each setting) and FlashInfer dense on each captured layer mapped onto ``shape``."""
    from art_runtime import PageMetadata
    from art_runtime.policies import DensePolicy

    rows = []
    for capture, layer_id in shape.captured_layers:
        layer = load_layer(args.captures, capture, layer_id)
        repeats = max(1, round(args.kv_len / layer.n_tokens))
        batch = build_real_batch(layer, args.batch, device, shape.num_qo_heads, shape.num_kv_heads, shape.head_dim,
                                 repeats=repeats)
        page_meta = PageMetadata.from_cache(batch.paged_kv_cache, *batch.page_table)
        exact = exact_attention(batch)
        fields = dict(model=model, capture=capture, layer=layer_id, repeats=repeats,
                      kv_len_range=f"{min(batch.kv_lens)}-{max(batch.kv_lens)}")
        if flashinfer_wrapper is not None:
            flashinfer_wrapper.plan(*batch.page_table, shape.num_qo_heads, shape.num_kv_heads, shape.head_dim,
                                    PAGE_SIZE, sm_scale=batch.sm_scale, q_data_type=DTYPE, kv_data_type=DTYPE)
            run_flashinfer = lambda: flashinfer_wrapper.run(batch.q, batch.paged_kv_cache)  # noqa: E731
            errors = relative_errors(run_flashinfer(), exact)
            rows.append(dict(fields, attention="FlashInfer dense", us=timer(run_flashinfer), read_fraction=1.0,
                             **error_summary(errors)))
        for label, termination in settings:
            run, out, stats = plan_art(batch, DensePolicy(), termination, page_meta, "torch" if args.dry_run else "triton")
            rows.append(dict(fields, attention=f"ART {label}", termination=dataclasses.asdict(termination),
                             us=None if timer is None else timer(run),
                             read_fraction=float(stats.visited_pages.sum() / stats.selected_pages.sum()),
                             kv_megabytes_read=int(stats.kv_bytes_read) / 1e6, **error_summary(relative_errors(out, exact))))
        del batch, page_meta
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def step_rows(model: str, shape: ModelShape, attention: list[dict], non_attention: dict, batch: int) -> list[dict]:
    """One row per attention variant: the step's time, tokens/s and breakdown."""
    rows = []
    for variant in dict.fromkeys(row["attention"] for row in attention):
        layers = [row for row in attention if row["attention"] == variant]
        row = dict(model=model, attention=variant, read_fraction=sum(r["read_fraction"] for r in layers) / len(layers),
                   err_p99=max(r["err_p99"] for r in layers), per_layer=layers)
        if non_attention:
            row["attention_us"] = sum(r["us"] for r in layers) / len(layers)
            row["attention_ms"] = shape.layers * row["attention_us"] / 1e3
            row.update(non_attention)
            row["step_ms"] = row["non_attention_ms"] + row["attention_ms"]
            row["tokens_per_s"] = batch / row["step_ms"] * 1e3
            row["attention_share"] = row["attention_ms"] / row["step_ms"]
        rows.append(row)
    off = next(row for row in rows if row["attention"] == "ART off")
    for row in rows:
        if "tokens_per_s" in row:
            row["speedup_vs_off"] = row["tokens_per_s"] / off["tokens_per_s"]
            if row["attention"].startswith("ART") and row is not off:
                row["target"] = "yes" if row["speedup_vs_off"] >= TARGET_SPEEDUP else "no"
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = termination_settings([args.setting])
    started = utc_now()
    flashinfer_wrapper, timer, info, versions, copy_tbps = None, None, {}, {}, None
    if args.dry_run:
        device, timing = "cpu", "none (--dry-run: CPU, torch backend)"
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_decode_step.py needs a CUDA GPU (or --dry-run)")
        device, info = "cuda", device_info()
        versions = {key: info.pop(key) for key in ("python", "torch", "cuda", "triton")}
        copy_tbps, flush_l2 = copy_bandwidth_tbps(), L2Flusher()
        timer = lambda fn: median_time_us(as_cuda_graph(fn)[0], args.iters, flush_l2)  # noqa: E731
        timing = (f"median of {args.iters} CUDA-graph replays after 5 warm-up replays, each timed alone with CUDA "
                  f"events, L2 flushed before each by reading a {flush_l2.nbytes >> 20} MiB buffer")
        if not args.no_flashinfer:
            import flashinfer

            versions["flashinfer"] = flashinfer.__version__
            flashinfer_wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device="cuda"), "NHD",
                use_tensor_cores=True)
        print(f"{info['name']}: device-to-device copy {copy_tbps:.2f} TB/s (read + write)")

    rows, attention, failures = [], [], []
    for model in tqdm(args.models, desc="models", unit="model"):
        shape = MODELS[model]
        model_attention = attention_rows(model, shape, args, settings, timer, flashinfer_wrapper, device)
        failures += [r for r in model_attention if r["attention"] == "ART off" and not r["err_max"] <= MAX_OFF_ERROR]
        step = StepModel(shape, args.batch, args.kv_len, 1 if args.dry_run else shape.layers, device)
        next_tokens = step.run()
        if next_tokens.shape != (args.batch,):
            raise RuntimeError(f"{model}: the step model returned tokens of shape {list(next_tokens.shape)}")
        non_attention = {}
        if timer is not None:
            non_attention = {f"{part}_ms": timer(lambda: step.run(gemms=part != "rest", rest=part != "gemms")) / 1e3
                             for part in ("non_attention", "gemms", "rest")}
        del step
        if device == "cuda":
            torch.cuda.empty_cache()
        attention += model_attention
        rows += step_rows(model, shape, model_attention, non_attention, args.batch)

    layer_table = markdown_table(attention, [
        ("model", "model", "s"), ("capture", "capture", "s"), ("layer", "layer", "d"), ("prefix x", "repeats", "d"),
        ("kv_len", "kv_len_range", "s"), ("attention", "attention", "s"), ("µs", "us", ".1f"),
        ("pages read", "read_fraction", ".3f"), ("err mean", "err_mean", ".1e"), ("err p99", "err_p99", ".1e"),
        ("err max", "err_max", ".1e")])
    shapes = "; ".join(f"{m}: {dataclasses.asdict(MODELS[m])}" for m in args.models)
    command = command_line("bench_decode_step.py", argv)
    markdown = "\n".join([
        f"# Decode-step model, batch {args.batch}, kv_len ~{args.kv_len}" + (" (dry run, CPU)" if args.dry_run else
                                                                          f" on {info['name']}"),
        "",
        *run_header(started, command, versions, copy_tbps),
        f"- model shapes: {shapes}",
        "- step = non-attention (all layers' GEMMs at the real shapes with random bf16 weights, each layer its own, "
        "plus unfused torch ops for norms, RoPE, SiLU-mul, residuals, K/V slot writes, embedding, LM head, argmax: "
        "one CUDA graph) + layers x attention per layer (mean over the captured layers below)",
        "- attention: ART dense (`DensePolicy()`, order `auto`: Quest order under `stability`, the mass order otherwise), termination "
        + ", ".join(f"`{label}` = {dataclasses.asdict(config)}" for label, config in settings),
        "- captures -> model: each request's causal prefix of a captured layer laid down `prefix x` times "
        "(kv_len ~32K; assumes attention as concentrated in fraction of pages at 32K as at the capture's length); "
        "Llama-3-8B's 8 KV heads are copies of the capture's real KV heads, each copy's 4 query heads real query "
        "heads of its group taken round-robin, head vectors repeated twice along head_dim (64 -> 128) with sm_scale "
        "halved (real logits); error: against float64 exact attention over the same bf16 cache",
        f"- timing: {timing}",
        f"- target (issue 7, 5): ART's tokens/s >= {TARGET_SPEEDUP}x ART off at batch 64 / 32K",
        "",
        markdown_table(rows, COLUMNS),
        "",
        "## Attention per captured layer",
        "",
        layer_table,
        "",
        *(f"- FAIL: {r['model']} {r['capture']} L{r['layer']} ART off: max error {r['err_max']:.2e} > {MAX_OFF_ERROR}"
          for r in failures),
    ])
    payload = dict(benchmark="decode_step", date=started.isoformat(), command=command, device=info, versions=versions,
                   copy_bandwidth_tbps=copy_tbps, timing=timing, dry_run=args.dry_run, captures=str(args.captures),
                   batch=args.batch, kv_len=args.kv_len, model_shapes={m: dataclasses.asdict(MODELS[m]) for m in args.models},
                   settings={label: dataclasses.asdict(config) for label, config in settings},
                   target_speedup=TARGET_SPEEDUP, rows=rows, failures=failures)
    stem = f"decode_step_{info.get('slug', 'cpu')}_{started.date().isoformat()}" + ("_dry_run" * args.dry_run)
    return report(args.out_dir, stem, payload, markdown, failures,
                  f"ART off differs from exact attention by more than {MAX_OFF_ERROR}")


if __name__ == "__main__":
    sys.exit(main())
