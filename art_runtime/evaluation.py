"""``art-runtime eval``: quality of ART on a real model, against exact dense attention.

For every configuration (a page-selection policy, with or without an ART termination
setting) and against the exact dense model on the same prompts:

* **tasks**: passkey and RULER-style needles (``art_runtime.tasks``) at several context
  lengths with depths spread over the context; the answer is generated greedily and scored
  as RULER does (the expected numbers present in the output);
* **next-token agreement and KL**: at every decode step of every task the configuration's
  logits are compared with dense logits *on the same prefix* (a dense cache is fed the
  configuration's own tokens in lockstep): top-1 agreement and ``KL(p_dense || p_config)``;
* **perplexity**: teacher-forced over ``ppl_tokens`` tokens of held-out real text after a
  ``ppl_context``-token prefix, in ``ppl_segments`` consecutive segments from a third of the
  way into the text (past front matter), decoded as one batch; every scored token is a
  decode step through ART;
* **pages and bytes**: pages read per (layer, request, KV head) over pages in the context,
  and K+V (+ metadata) bytes over a dense read, from the decode records;
* **captured attention** (optional): per-head attention-output error and pages read on
  captured Q/K/V (``art_runtime.analysis``, the same torch backend) for each termination
  setting, in the order the dense policy visits under it.

Per-head output error alone is not the quality measure (real attention is diffuse; pruners
with good task scores still show large per-head errors): judge by the task and logit
measures. Prefill is exact and shared: one prefill per prompt, cloned for each
configuration (SnapKV, which scores the prompt at prefill, prefills its own). The samples of
one (kind, length) are decoded as one batch: on the CPU the torch backend's cost per step
hardly grows with the batch, and every request still stops on its own.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .termination import TerminationConfig

DEFAULT_KINDS = ("passkey", "single", "multikey", "multivalue")
# tokens per prefill forward (see Evaluator._prefill)
PREFILL_CHUNK = 1024
# greedy tokens generated per answer: a space and one token per digit (SmolLM2, Qwen2.5), and a
# separator between the numbers of a multi-value answer
ANSWER_TOKENS = {"passkey": 6, "single": 8, "multikey": 8}
MULTIVALUE_TOKENS_PER_NEEDLE = 10
# The calibration rule of the defaults (issue 4): every task prompt scored as dense scores it and
# perplexity within this relative change of dense's; among the settings that meet it, the one
# reading the fewest pages.
PPL_TOLERANCE = 0.01


@dataclass(frozen=True)
class EvalConfig:
    """One evaluated configuration: a policy (registry name and arguments) and a termination.

    ``policy`` ``"dense"`` is ``DensePolicy()`` (every page, order ``auto``); with termination
    ``off`` it is exact attention (the reference itself, not evaluated as a row).
    """

    policy: str
    policy_kwargs: tuple = ()
    termination: TerminationConfig = TerminationConfig(mode="off")

    @property
    def name(self) -> str:
        from .analysis import setting_label

        policy = self.policy + (f"({', '.join(f'{k}={v}' for k, v in self.policy_kwargs)})"
                                if self.policy_kwargs else "")
        return policy if self.termination.mode == "off" else f"{policy} + {setting_label(self.termination)}"

    def make_policy(self):
        from .policies import get

        return get(self.policy, **dict(self.policy_kwargs))


def build_configs(policies, modes, *, tau_mags=(1e-3,), patience=(2,), epss=(0.05,),
                  relative_to=("output",), settings=(), budget_fraction: float = 0.25, min_pages: int | None = None,
                  block_pages: int | None = None, context_tokens: int = 2048, page_size: int = 16) -> list[EvalConfig]:
    """Every policy alone (except dense) and with every ART setting.

    Parameters
    ----------
    policies : sequence of str
        Registered policy names (``dense``, ``quest``, ``streaming_llm``, ``snapkv``, ``h2o``).
    modes : sequence of str
        Termination modes to add on top of each policy. ``stability`` gets one setting per
        (``tau_mags``, ``patience``) pair (``tau_dir = tau_mag**2``, the paper's choice);
        ``bound`` one per (``epss``, ``relative_to``) pair; every other mode (``mass``, and
        any mode ``TerminationConfig`` accepts) one per ``epss`` value.
    patience, relative_to : sequence
        Stability patiences and bound ``relative_to`` values to sweep.
    settings : sequence of str
        More settings, each given whole in ``art-runtime analyze``'s syntax
        (``MODE[:key=value,...]``, e.g. ``mass:eps=0.02``, ``bound:eps=0.5,rel=values``), after
        the swept ones (``modes=["off"]`` sweeps none).
    budget_fraction : float
        Budgeted policies keep this fraction of the pages of a ``context_tokens`` context.
    """
    if not 0 < budget_fraction <= 1:
        raise ValueError(f"budget_fraction must be in (0, 1], got {budget_fraction!r}")
    pages = max(4, math.ceil(budget_fraction * context_tokens / page_size))
    kwargs = {"dense": (), "quest": (("budget", pages),), "h2o": (("budget", pages), ("recent_pages", 4)),
              "snapkv": (("budget", pages), ("window", 32)),
              "streaming_llm": (("sink_pages", 1), ("window_pages", pages - 1))}
    common = {k: v for k, v in (("min_pages", min_pages), ("block_pages", block_pages)) if v is not None}
    settings_specs, settings = settings, []
    for mode in modes:
        if mode == "stability":
            settings += [TerminationConfig(mode=mode, tau_mag=t, tau_dir=t * t, patience=p, **common)
                         for p in patience for t in tau_mags]
        elif mode == "bound":
            settings += [TerminationConfig(mode=mode, eps=e, relative_to=r, **common) for r in relative_to for e in epss]
        elif mode != "off":
            settings += [TerminationConfig(mode=mode, eps=e, **common) for e in epss]
    from .analysis import parse_setting

    for spec in settings_specs:  # --min-pages and --block-pages apply where the spec sets neither
        setting = parse_setting(spec, block_pages).config
        if min_pages is not None and "min" not in spec:  # the key min_pages or its alias min
            setting = replace(setting, min_pages=min_pages)
        if setting not in settings and setting.mode != "off":
            settings.append(setting)
    configs = []
    for policy in policies:
        if policy not in kwargs:
            raise ValueError(f"policies: unknown policy {policy!r}; known: {sorted(kwargs)}")
        if policy != "dense":
            configs.append(EvalConfig(policy, kwargs[policy]))
        configs += [EvalConfig(policy, kwargs[policy], setting) for setting in settings]
    return configs


@dataclass
class RunStats:
    """What one configuration did on one prompt."""

    score: float | None = None
    answer: str | None = None
    top1: list = field(default_factory=list)  # per step: 1.0 / 0.0
    kl: list = field(default_factory=list)  # per step, nats
    nll: list = field(default_factory=list)  # per scored token (perplexity runs)
    pages_read: int = 0
    pages_context: int = 0
    bytes_read: int = 0
    bytes_dense: int = 0


def _kl(dense_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(dense) || softmax(logits))`` per row, nats (float64)."""
    p = torch.log_softmax(dense_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1)


class Evaluator:
    """Runs the configurations on a loaded model (see the module docstring).

    Parameters
    ----------
    model, tokenizer
        From ``art_runtime.integrations.transformers.load_model`` (switched to ART here).
    configs : list of EvalConfig
    page_size : int
    progress : bool
        tqdm bars on stderr.
    """

    def __init__(self, model, tokenizer, configs, page_size: int = 16, progress: bool = True,
                 prefill_chunk: int = PREFILL_CHUNK):
        from .integrations.transformers import enable_art

        self.model = enable_art(model)
        self.tokenizer = tokenizer
        self.configs = list(configs)
        self.page_size = page_size
        self.progress = progress
        self.prefill_chunk = prefill_chunk

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, file=sys.stderr, leave=False)

    def _prefill(self, ids: torch.Tensor, termination: TerminationConfig = TerminationConfig(mode="off"),
                 policy=None):
        """A cache holding ``ids`` (exact prefill), ready to clone or to decode with these settings.

        Chunked (``prefill_chunk`` tokens a forward) and without logits, so that memory stays
        linear in the context: one 32K-token forward would hold a 32K x 32K mask and a
        32K x vocabulary logit matrix. SnapKV's votes come from its window inside the last
        chunk.
        """
        from .integrations.transformers import ARTPagedCache, model_forward

        cache = ARTPagedCache(self.model, termination, policy=policy, page_size=self.page_size)
        chunk = self.prefill_chunk
        starts = list(range(0, ids.shape[1], chunk))
        if len(starts) > 1 and ids.shape[1] - starts[-1] < chunk // 2:  # no short last chunk (SnapKV's window)
            starts.pop()
        bounds = starts[1:] + [ids.shape[1]]
        with torch.no_grad():
            for start, end in zip(starts, bounds):
                model_forward(self.model, ids[:, start:end], cache, logits_to_keep=1)
        return cache

    def _config_cache(self, prefilled, ids, config: EvalConfig):
        policy = config.make_policy()
        if getattr(policy, "prefill", None) is not None:  # SnapKV votes on the prompt's queries
            return self._prefill(ids, config.termination, policy)
        return prefilled.clone(config.termination, policy=policy)

    @staticmethod
    def _account(stats: RunStats, cache, request: int | None = None, steps: int | None = None) -> None:
        """Add pages and bytes of ``cache``'s decode steps to ``stats``: of every request, or
        of one ``request`` of the batch and its first ``steps`` steps. Bytes are counted per
        batch: a request gets an even share (sums over the batch's requests stay exact)."""
        record = cache.decode_record()
        steps = record.steps if steps is None else steps
        visited = record.visited_pages[:steps]
        if request is not None:
            visited = visited[:, :, request:request + 1]
        share = 1 if request is None else record.visited_pages.shape[2]
        stats.pages_read += int(visited.sum())
        stats.pages_context += int(record.context_pages[:steps].sum()) * visited.shape[1] * visited[0, 0].numel()
        stats.bytes_read += int(record.kv_bytes_read[:steps].sum()) // share
        stats.bytes_dense += int(record.dense_kv_bytes[:steps].sum()) // share

    def run_tasks(self, samples, answer_tokens: int) -> list[dict]:
        """Dense and every configuration on task samples of one length, decoded as one batch:
        per sample ``{config name | "dense": RunStats}``.

        A configuration's step is compared with dense on the configuration's own prefix,
        request by request. While a request's prefix is dense's own greedy prefix, dense's
        logits there are those of dense's greedy run (computed once); once the
        configuration's answer departs from dense's, a dense cache follows the
        configuration's tokens from then on. Each request of the batch decides its own
        termination (ART works per request and KV head; on the CPU no row is split into chunks),
        so batching changes no page read.
        """
        from .integrations.transformers import greedy_decode, model_forward

        ids = torch.tensor([sample.input_ids for sample in samples])
        if ids.ndim != 2:
            raise ValueError("samples: a batch needs prompts of one length")
        prefilled = self._prefill(ids[:, :-1])
        last = ids[:, -1:]
        dense_tokens, dense_logits = greedy_decode(self.model, last, prefilled.dense_cache(), answer_tokens)
        out = []
        for b, sample in enumerate(samples):
            answer = self.tokenizer.decode(dense_tokens[b])
            out.append({"dense": RunStats(score=sample.score(answer), answer=answer)})
        for config in self.configs:
            cache = self._config_cache(prefilled, ids[:, :-1], config)
            stats = [RunStats() for _ in samples]
            inputs = [last]  # what this configuration fed so far: the prefix of its next step
            dense, dense_fed = None, 0  # a dense cache on this configuration's tokens, once they differ
            with torch.no_grad():
                for step in range(answer_tokens):
                    logits = model_forward(self.model, inputs[-1], cache)[:, -1]
                    generated = torch.cat(inputs[1:], 1) if step else dense_tokens[:, :0]
                    on_dense_path = (generated == dense_tokens[:, :step]).all(1)
                    reference = dense_logits[:, step]
                    if not bool(on_dense_path.all()):
                        dense = prefilled.dense_cache() if dense is None else dense
                        for fed in inputs[dense_fed:]:
                            own = model_forward(self.model, fed, dense)[:, -1]
                        dense_fed = len(inputs)
                        reference = torch.where(on_dense_path[:, None], reference, own)
                    top1 = (logits.argmax(-1) == reference.argmax(-1)).tolist()
                    for row, agree, kl in zip(stats, top1, _kl(reference, logits).tolist()):
                        row.top1.append(float(agree))
                        row.kl.append(kl)
                    inputs.append(logits.argmax(-1, keepdim=True))
            answers = torch.cat(inputs[1:], 1)
            for b, (sample, row) in enumerate(zip(samples, stats)):
                row.answer = self.tokenizer.decode(answers[b])
                row.score = sample.score(row.answer)
                self._account(row, cache, request=b)
                out[b][config.name] = row
            cache.release()
        return out

    def run_perplexity(self, ids: torch.Tensor, context: int) -> dict:
        """Teacher-forced NLL of ``ids[:, context:]`` (a batch of text segments), every token
        predicted by a decode step.

        The first ``context - 1`` tokens are prefilled; step ``s`` feeds token
        ``context - 1 + s`` and scores token ``context + s``. Each configuration's logits
        are also compared with dense's at every step (the same prefix by construction).
        Returns ``{"dense" | config name: RunStats}``, the segments' tokens together.
        """
        from .integrations.transformers import model_forward

        prefilled = self._prefill(ids[:, :context - 1])
        steps = ids.shape[1] - context
        targets = ids[:, context:].flatten()

        def run(cache):
            with torch.no_grad():
                return torch.stack([model_forward(self.model, ids[:, context - 1 + s:context + s], cache)[:, -1]
                                    for s in range(steps)], 1).flatten(0, 1)  # [segments * steps, vocab]

        dense_logits = run(prefilled.dense_cache())
        nll = lambda logits: torch.nn.functional.cross_entropy(logits.double(), targets, reduction="none")  # noqa: E731
        out = {"dense": RunStats(nll=nll(dense_logits).tolist())}
        for config in self.configs:
            cache = self._config_cache(prefilled, ids[:, :context - 1], config)
            logits = run(cache)
            stats = RunStats(nll=nll(logits).tolist(), kl=_kl(dense_logits, logits).tolist(),
                             top1=(logits.argmax(-1) == dense_logits.argmax(-1)).double().tolist())
            self._account(stats, cache)
            cache.release()
            out[config.name] = stats
        return out


# ---------------------------------------------------------------------------------------
# the whole evaluation


@dataclass
class EvalSettings:
    """What ``art-runtime eval`` runs (the command's options; see ``art-runtime eval --help``)."""

    model: str = "smollm2"
    lengths: tuple = (1024, 2048)
    kinds: tuple = DEFAULT_KINDS
    samples: int = 2
    num_needles: int = 4
    filler: str = "austen"
    ppl_text: str = "jargon"
    ppl_context: int = 1024
    ppl_tokens: int = 32
    ppl_segments: int = 1
    policies: tuple = ("dense", "quest")
    modes: tuple = ("stability", "bound")
    tau_mags: tuple = (1e-3,)
    patience: tuple = (2,)
    epss: tuple = (0.05,)
    relative_to: tuple = ("output",)
    settings: tuple = ()
    budget_fraction: float = 0.25
    min_pages: int | None = None
    block_pages: int | None = None
    page_size: int = 16
    capture: str | None = None
    capture_queries: int = 8
    seed: int = 0
    threads: int | None = None


def _answer_tokens(kind: str, num_needles: int) -> int:
    return MULTIVALUE_TOKENS_PER_NEEDLE * num_needles if kind == "multivalue" else ANSWER_TOKENS[kind]


def _check_settings(settings: EvalSettings) -> None:
    from .tasks import KINDS

    for name in ("samples", "page_size", "capture_queries", "ppl_segments"):
        value = getattr(settings, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not isinstance(settings.ppl_tokens, int) or settings.ppl_tokens < 0:
        raise ValueError(f"ppl_tokens must be an int >= 0 (0: no perplexity), got {settings.ppl_tokens!r}")
    if not settings.lengths or any(not isinstance(n, int) or n < 256 for n in settings.lengths):
        raise ValueError(f"lengths must be ints >= 256, got {list(settings.lengths)}")
    unknown = [kind for kind in settings.kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"kinds: unknown {unknown}; known: {list(KINDS)}")
    if settings.ppl_context < 2 and settings.ppl_tokens:
        raise ValueError(f"ppl_context must be >= 2, got {settings.ppl_context}")


def run_eval(settings: EvalSettings, argv: list | None = None) -> dict:
    """Run the evaluation; return the report (``write_report`` writes it)."""
    from .integrations.transformers import load_model
    from .tasks import TaskBuilder, load_filler, spread_depths

    _check_settings(settings)
    started = time.time()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    configs = build_configs(settings.policies, settings.modes, tau_mags=settings.tau_mags,
                            patience=settings.patience, epss=settings.epss, relative_to=settings.relative_to,
                            settings=settings.settings,
                            budget_fraction=settings.budget_fraction, min_pages=settings.min_pages,
                            block_pages=settings.block_pages, context_tokens=max(settings.lengths),
                            page_size=settings.page_size)
    model, tokenizer = load_model(settings.model, progress=False)
    evaluator = Evaluator(model, tokenizer, configs, settings.page_size)
    builder = TaskBuilder(tokenizer, load_filler(settings.filler), num_needles=settings.num_needles)
    # one batch per (length, kind): its samples, needle depths spread, decoded together
    batches = [(kind, length) for length in settings.lengths for kind in settings.kinds]
    depths = spread_depths(settings.samples)
    tasks = []
    from tqdm.auto import tqdm

    with tqdm(batches, desc="tasks", file=sys.stderr, unit="batch") as bar:
        for batch, (kind, length) in enumerate(bar):
            bar.set_postfix(kind=kind, length=length, samples=settings.samples)
            samples = [builder.build(kind, length, depth, seed=settings.seed + batch * settings.samples + i)
                       for i, depth in enumerate(depths)]
            runs = evaluator.run_tasks(samples, _answer_tokens(kind, settings.num_needles))
            tasks += [{"kind": kind, "length": length, "depth": depth, "answers": sample.answers,
                       "runs": {name: asdict(stats) for name, stats in sample_runs.items()}}
                      for depth, sample, sample_runs in zip(depths, samples, runs)]
    perplexity = None
    if settings.ppl_tokens:
        print(f"art-runtime eval: perplexity on {settings.ppl_text}, {settings.ppl_segments} x {settings.ppl_tokens} "
              f"tokens after {settings.ppl_context}", file=sys.stderr, flush=True)
        from .fetch import fetch_text

        text = Path(settings.ppl_text) if Path(settings.ppl_text).is_file() else fetch_text(settings.ppl_text,
                                                                                                progress=False)
        ids = tokenizer.encode(text.read_text(encoding="utf-8"), add_special_tokens=False)
        start = len(ids) // 3  # past the front matter (title pages, tables of contents)
        span = settings.ppl_context + settings.ppl_tokens
        if start + settings.ppl_segments * span > len(ids):
            raise ValueError(f"ppl_segments: {settings.ppl_segments} segments of {span} tokens do not fit in the "
                             f"last two thirds of {settings.ppl_text} ({len(ids) - start} tokens)")
        ids = torch.tensor([ids[start + i * span:start + (i + 1) * span] for i in range(settings.ppl_segments)])
        runs = evaluator.run_perplexity(ids, settings.ppl_context)
        perplexity = {name: asdict(stats) for name, stats in runs.items()}
    capture = _capture_errors(settings, configs) if settings.capture else None
    report = {
        "command": "art-runtime " + " ".join(argv) if argv is not None else None,
        "settings": asdict(settings),
        "configs": [{"name": c.name, "policy": c.policy, "policy_kwargs": dict(c.policy_kwargs),
                     "termination": asdict(c.termination)} for c in configs],
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": _version("transformers"),
                    "device": "cpu"},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tasks": tasks,
        "perplexity": perplexity,
        "capture": capture,
    }
    report["summary"] = summarize(report)
    report["seconds"] = time.time() - started
    return report


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _capture_errors(settings: EvalSettings, configs) -> dict:
    """Per termination setting: pages read and per-head output error on the capture (in ``DensePolicy()``'s order)."""
    from .analysis import analyze_capture, setting_label
    from .policies import DensePolicy

    terminations = []
    for config in configs:
        if config.termination not in terminations:
            terminations.append(config.termination)
    # each setting in the order DensePolicy() visits under its mode
    order_of = {t.mode: DensePolicy().for_mode(t.mode).order for t in terminations if t.mode != "off"}
    report = analyze_capture(settings.capture, queries=settings.capture_queries, page_size=settings.page_size,
                             orders=sorted(set(order_of.values())) or ["mass"],
                             settings=[TerminationConfig(mode="off"), *terminations])
    out = {}
    for name, config in report.settings.items():
        order = order_of.get(config["mode"], report.orders[0])  # off: every page, in any order
        rows = [r for r in report.criteria if r.setting == name and r.order == order]
        out[name] = {
            "pages_fraction": sum(r.pages_read for r in rows) / sum(r.pages_selected for r in rows),
            "bytes_fraction": sum(r.kv_bytes + r.metadata_bytes for r in rows) / sum(r.dense_bytes for r in rows),
            "err_output_p99": max(r.err_output["p99"] for r in rows),
            "err_output_max": max(r.err_output["max"] for r in rows),
            "err_values_max": max(r.err_values["max"] for r in rows),
            "layers": [r.layer for r in rows],
            "order": order,
        }
    out["_labels"] = {c.name: setting_label(c.termination) for c in configs}
    out["_file"] = str(settings.capture)
    return out


def summarize(report: dict) -> dict:
    """Per configuration (``dense`` first): accuracy per kind and length, agreement, KL,
    perplexity, pages and bytes read."""
    names = ["dense"] + [c["name"] for c in report["configs"]]
    summary = {}
    for name in names:
        runs = [(t, t["runs"][name]) for t in report["tasks"]]
        row: dict = {"accuracy": {}, "accuracy_by_length": {}}
        for kind in dict.fromkeys(t["kind"] for t, _ in runs):
            scores = [r["score"] for t, r in runs if t["kind"] == kind]
            row["accuracy"][kind] = sum(scores) / len(scores)
        for length in dict.fromkeys(t["length"] for t, _ in runs):
            scores = [r["score"] for t, r in runs if t["length"] == length]
            row["accuracy_by_length"][str(length)] = sum(scores) / len(scores)
        scores = [r["score"] for _, r in runs]
        row["accuracy_all"] = sum(scores) / len(scores) if scores else None
        row["same_answer_as_dense"] = (sum(r["answer"] == t["runs"]["dense"]["answer"] for t, r in runs) / len(runs)
                                       if runs else None)
        row["same_score_as_dense"] = all(r["score"] == t["runs"]["dense"]["score"] for t, r in runs)
        ppl = (report["perplexity"] or {}).get(name)
        steps = [r for _, r in runs] + ([ppl] if ppl else [])
        top1 = [x for r in steps for x in r["top1"]]
        kl = [x for r in steps for x in r["kl"]]
        row["top1_agreement"] = sum(top1) / len(top1) if top1 else None
        row["kl_mean"] = sum(kl) / len(kl) if kl else None
        row["kl_max"] = max(kl) if kl else None
        if ppl:
            row["perplexity"] = math.exp(sum(ppl["nll"]) / len(ppl["nll"]))
        read = sum(r["pages_read"] for r in steps)
        context = sum(r["pages_context"] for r in steps)
        row["pages_fraction"] = read / context if context else 1.0
        bytes_read, bytes_dense = sum(r["bytes_read"] for r in steps), sum(r["bytes_dense"] for r in steps)
        row["bytes_fraction"] = bytes_read / bytes_dense if bytes_dense else 1.0
        capture = report.get("capture")
        # the capture is simulated over every page in DensePolicy()'s order: it describes dense + ART only
        if capture and name != "dense" and name.startswith("dense"):
            row["capture"] = capture.get(capture["_labels"][name])
        summary[name] = row
    dense_ppl = summary["dense"].get("perplexity")
    for row in summary.values():
        if dense_ppl and row.get("perplexity"):
            row["perplexity_change"] = row["perplexity"] / dense_ppl - 1
        row["meets_rule"] = row["same_score_as_dense"] and abs(row.get("perplexity_change", 0.0)) <= PPL_TOLERANCE
    return summary


def format_table(report: dict) -> str:
    """The markdown results table."""
    summary = report["summary"]
    kinds = list(next(iter(summary.values()))["accuracy"])
    lengths = list(next(iter(summary.values()))["accuracy_by_length"])
    head = (["config", "pages read", "KV bytes"] + [f"acc {k}" for k in kinds] + [f"acc {n}" for n in lengths]
            + ["same answer", "top-1 agree", "KL mean", "KL max", "PPL", "PPL change", "rule"])
    capture = report.get("capture")
    if capture:
        head += ["capture order", "capture pages", "capture err p99", "capture err max"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pct = lambda v: "–" if v is None else f"{v:.1%}"  # noqa: E731
    num = lambda v, f="{:.3g}": "–" if v is None else f.format(v)  # noqa: E731
    for name, row in summary.items():
        cells = [name, pct(row["pages_fraction"]), pct(row["bytes_fraction"])]
        cells += [pct(row["accuracy"][k]) for k in kinds] + [pct(row["accuracy_by_length"][n]) for n in lengths]
        cells += [pct(row["same_answer_as_dense"]) if name != "dense" else "–",
                  pct(row["top1_agreement"]), num(row["kl_mean"]), num(row["kl_max"]),
                  num(row.get("perplexity"), "{:.3f}"),
                  "–" if row.get("perplexity_change") is None or name == "dense" else f"{row['perplexity_change']:+.2%}",
                  "–" if name == "dense" else ("yes" if row["meets_rule"] else "no")]
        if capture:
            entry = row.get("capture")
            # reports before 2026-11-28 name no order: they simulated every setting in Quest order
            cells += ([entry.get("order", "quest"), pct(entry["pages_fraction"]), pct(entry["err_output_p99"]),
                       pct(entry["err_output_max"])] if entry else ["–"] * 4)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def merge_reports(reports: list[dict]) -> dict:
    """One report from runs of the same configurations on other prompts (e.g. one run per
    context length, run side by side): their tasks together, the perplexity of the one run
    that measured it, every run's command, settings, machine and duration under ``parts``."""
    if not reports:
        raise ValueError("reports: nothing to merge")
    names = [c["name"] for c in reports[0]["configs"]]
    for report in reports[1:]:
        if [c["name"] for c in report["configs"]] != names or report["settings"]["model"] != reports[0]["settings"]["model"]:
            raise ValueError("reports: every run must have the same model and configurations")
    perplexity = [r["perplexity"] for r in reports if r.get("perplexity")]
    if len(perplexity) > 1:
        raise ValueError("reports: more than one run measured perplexity")
    parts = [{key: r[key] for key in ("command", "settings", "machine", "date", "seconds")}
             for r in reports if "parts" not in r] + [p for r in reports for p in r.get("parts", [])]
    merged = {**reports[0], "command": [p["command"] for p in parts], "parts": parts,
              "tasks": [t for r in reports for t in r["tasks"]], "perplexity": perplexity[0] if perplexity else None,
              "capture": None, "seconds": sum(p["seconds"] for p in parts)}
    merged["summary"] = summarize(merged)
    return merged


def write_report(report: dict, out_dir, plots: bool = True) -> list[Path]:
    """Write ``eval.json``, ``eval.md`` and (matplotlib) ``tradeoff.png``, ``accuracy.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "eval.json", out_dir / "eval.md"]
    written[0].write_text(json.dumps(report, indent=1) + "\n")
    header = [f"# ART quality on {report['settings']['model']}", ""]
    for part in report.get("parts") or [report]:
        settings = part["settings"]
        header += [
            f"* command: `{part['command']}`",
            f"* machine: {part['machine']['platform']}, {part['machine']['cpu_threads']} CPU threads, "
            f"torch {part['machine']['torch']}, transformers {part['machine']['transformers']}",
            f"* date: {part['date']}, duration {part['seconds'] / 60:.1f} min",
            f"* tasks: {', '.join(settings['kinds'])} at {', '.join(map(str, settings['lengths']))} tokens, "
            f"{settings['samples']} sample(s) each (depths spread), filler {settings['filler']}; "
            + (f"perplexity: {settings.get('ppl_segments', 1)} x {settings['ppl_tokens']} tokens of "
               f"{settings['ppl_text']} after {settings['ppl_context']}" if settings["ppl_tokens"] else "no perplexity"),
        ]
    capture = report.get("capture")
    header += [
        "* pages read: pages read / pages in the context, over every decode step, layer and KV head; "
        "KV bytes: read (K+V and page metadata) / a dense read",
        "* top-1 agree, KL: at every decode step (tasks and perplexity), against dense on the same prefix",
        f"* rule: every task prompt scored as dense scores it, and perplexity within {PPL_TOLERANCE:.0%} of dense's "
        "(the calibration rule of the defaults)",
        "* capture: attention-output error per query head relative to |o_exact| on the captured Q/K/V "
        + (f"({Path(capture['_file']).name}), every page in the capture order column's visit order (dense + ART "
           "rows only)" if capture else "(none)"),
        "",
        "",
    ]
    written[1].write_text("\n".join(header) + format_table(report))
    if plots:
        written += plot_report(report, out_dir)
    return written


def plot_report(report: dict, out_dir: Path) -> list[Path]:
    """Trade-off (pages read vs accuracy, KL and perplexity change) and accuracy per length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    names = list(summary)
    # one curve per (policy, mode), its settings in order of pages read and labelled by what
    # differs (thresholds); a filled marker where the setting meets the calibration rule
    families: dict = {}
    for name in names:
        policy, _, setting = name.partition(" + ")
        mode, _, knobs = setting.partition(" ")
        families.setdefault(f"{policy} + {mode}" if setting else policy, []).append((name, knobs))
    fig, axes = plt.subplots(1, 4, figsize=(20, 5))
    measures = [("accuracy_all", "task accuracy"), ("top1_agreement", "next-token top-1 agreement with dense"),
                ("kl_mean", "mean KL to dense (nats)"), ("perplexity_change", "perplexity change vs dense")]
    for ax, (key, label) in zip(axes, measures):
        for index, (family, members) in enumerate(families.items()):
            points = sorted((summary[n]["pages_fraction"], summary[n].get(key), summary[n]["meets_rule"], knobs)
                            for n, knobs in members if summary[n].get(key) is not None)
            if not points:
                continue
            colour = f"C{index % 10}"
            ax.plot([x for x, *_ in points], [y for _, y, *_ in points], color=colour, alpha=0.5, label=family)
            for x, y, meets, knobs in points:
                ax.scatter(x, y, color=colour, facecolors=colour if meets else "none", zorder=3)
                if knobs:
                    ax.annotate(knobs.replace("tau=", "").replace("eps=", ""), (x, y), fontsize=6,
                                xytext=(3, 3), textcoords="offset points")
        if key == "perplexity_change":
            ax.axhline(PPL_TOLERANCE, color="grey", linestyle="--", linewidth=0.8)  # the rule's limit
        ax.set_xlabel("fraction of context pages read")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title="filled: meets the rule", title_fontsize=7)
    fig.suptitle(f"ART on {report['settings']['model']}: pages read vs quality")
    fig.tight_layout()
    tradeoff = out_dir / "tradeoff.png"
    fig.savefig(tradeoff, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, name in enumerate(names):
        by_length = summary[name]["accuracy_by_length"]
        ax.plot([int(n) for n in by_length], list(by_length.values()), marker="o", label=name, color=f"C{index % 10}")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("task accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    accuracy = out_dir / "accuracy.png"
    fig.savefig(accuracy, dpi=120)
    plt.close(fig)
    return [tradeoff, accuracy]
