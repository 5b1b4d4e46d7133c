"""Termination analysis on a real attention capture: what each visit order and criterion reads
and how far its output lands from exact attention (``art-runtime analyze``).

A capture (``data/captures/README.md`` format: per layer ``L{L}.k``/``L{L}.v``
``[H_kv, n_tokens, D]`` and the queries of the last positions ``L{L}.q_last`` ``[H_q, Q, D]``)
becomes one decode batch per layer: each chosen query is a request over its causal prefix,
paged in FlashInfer's format (full pages shared by every request, as with prefix caching;
each request's last, partial page private). Then, per layer:

* **Criteria** -- for every visit order and every termination setting, the batch runs through
  ``BatchARTDecodeWrapper(backend="torch")`` (the semantic oracle of the Triton kernel, in
  fp32 on the CPU): the numbers are what the kernel does, block by block, GQA group sharing
  one traversal. Reported: pages read, K+V bytes read in the capture's dtype (plus
  page-metadata bytes where the kernel counts them, i.e. ``bound``), per query head output error against exact float64
  attention over the same pages, relative to ``|o|`` and to the value scale ``max|v|`` (mean,
  p99, max, and the mean of each group's worst head), and the depth of every (query, KV head).
* **Hindsight optimum** -- plain float64 torch on the capture: for each (query, KV head) and
  each order, the fewest pages read in that order after which every query head of the group
  is within an error target (page by page and without ``min_pages``: no criterion can do
  better in that order). The ``best`` order visits pages by their true softmax mass for the
  group (summed over its query heads), most first; it is not optimal for every row by
  construction (an order can leave pages whose values average out), so the report counts the
  rows where it needs more pages than another order.
* **Bound overshoot** -- per (query head, page): the page's key-box logit bound
  ``scale * sum_d max(q_d kmax_d, q_d kmin_d)`` (``PageMetadata``, what Quest reads) minus
  the true largest logit of the page's tokens, in nats; and the key sketch's bound of the
  page's softmax mass (what ``bound`` reads, ``reference.sketch_page_log2_mass``) over the
  true mass, in nats.
* **Violations** -- for ``bound`` settings, the query heads whose error exceeds the
  guarantee (``eps |o|`` or ``eps max|v|``, up to fp32 rounding); it must be 0.

Visit orders: ``recency`` (sink, current page, newest to oldest), ``quest`` (sink, current
page, then by the Quest bound) and ``mass`` (sink, current page, then by the estimated mass of
termination mode ``mass``) are ``DensePolicy`` orders, run through the policy exactly as a
user would; ``best`` is the hindsight order above, passed as an explicit ``PageSelection``.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm import tqdm

from .decode import BatchARTDecodeWrapper
from .page_metadata import PageMetadata
from .policies import DensePolicy
from .policies.base import PolicyContext
from .selection import PageSelection
from .termination import MODES, TerminationConfig

PAGE_SIZE = 16
DEFAULT_QUERIES = 32
ORDERS = ("recency", "quest", "mass", "best")
TARGETS = (0.01, 0.1)
# Error targets of the hindsight frontier (the plots' dashed curves and the JSON).
FRONTIER_TARGETS = tuple(float(t) for t in torch.logspace(-4, 0, 33).tolist())
DEFAULT_SETTINGS = (
    "off",
    "stability:tau=1e-3,patience=2",  # the paper's thresholds, checked once per kernel block (64 tokens)
    "stability:tau=1e-3,patience=2,block_pages=1",  # ... checked after every page (issue 8's numbers)
    "stability:tau=1e-4,patience=2",
    "bound:eps=0.05,relative_to=output",
    "bound:eps=0.05,relative_to=values",
    "bound:eps=0.1,relative_to=values",
)
_CONFIG_DEFAULTS = TerminationConfig()
_ALIASES = {"rel": "relative_to", "block": "block_pages", "p": "patience", "min": "min_pages"}
_SHORT = {"tau_mag": "tau", "patience": "p", "min_pages": "min", "block_pages": "block"}
_MODE_FIELDS = {"stability": ("tau_mag", "tau_dir", "patience"), "bound": ("eps", "relative_to"), "mass": ("eps",)}


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Setting:
    """A named termination setting."""

    name: str
    config: TerminationConfig


def setting_label(config: TerminationConfig) -> str:
    """A short name: the mode and the parameters that matter for it (and any non-default rest)."""
    names = _MODE_FIELDS.get(config.mode)
    if names is None:  # a mode this module does not know: every field that is not the default
        names = tuple(f.name for f in fields(config) if f.name not in ("mode", "min_pages", "block_pages")
                      and getattr(config, f.name) != getattr(_CONFIG_DEFAULTS, f.name))
    if config.mode == "off":
        names = ()
    parts = [config.mode]
    paper_tau_dir = config.mode == "stability" and math.isclose(config.tau_dir, config.tau_mag ** 2, rel_tol=1e-9)
    for name in names:
        value = getattr(config, name)
        if name == "relative_to":
            parts.append(value)
        elif name == "tau_dir" and paper_tau_dir:
            continue  # the paper's tau_dir = tau**2, implied by "tau="
        else:
            parts.append(f"{_SHORT.get(name, name)}={_fmt(value)}")
    for name in ("min_pages", "block_pages"):
        if getattr(config, name) != getattr(_CONFIG_DEFAULTS, name):
            parts.append(f"{_SHORT[name]}={getattr(config, name)}")
    return " ".join(parts)


def _fmt(value) -> str:
    """Compact numbers: ``1e-3`` rather than ``0.001``."""
    if isinstance(value, float) and value != 0 and (abs(value) < 0.01 or abs(value) >= 1e4):
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_setting(spec: str, block_pages: int | None = None) -> Setting:
    """A ``Setting`` from ``MODE[:key=value,...]``, e.g. ``bound:eps=0.05,relative_to=values``.

    Keys are ``TerminationConfig`` fields (``tau_mag``, ``tau_dir``, ``patience``, ``eps``,
    ``min_pages``, ``relative_to``, ``block_pages``) or the aliases ``tau`` (sets ``tau_mag``
    and, unless given, ``tau_dir = tau**2`` as the paper does), ``rel``, ``block``, ``p``,
    ``min``. ``block_pages`` applies where the spec does not set it. ``ValueError`` if wrong.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"setting must be a non-empty string MODE[:key=value,...], got {spec!r}")
    mode, _, rest = spec.strip().partition(":")
    kwargs: dict = {"mode": mode.strip()}
    if kwargs["mode"] not in MODES:
        raise ValueError(f"setting {spec!r}: mode must be one of {MODES}")
    known = {f.name: f for f in fields(TerminationConfig)}
    tau = None
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = (text.strip() for text in item.partition("="))
        if not sep or not value:
            raise ValueError(f"setting {spec!r}: expected key=value, got {item!r}")
        key = _ALIASES.get(key, key)
        try:
            if key == "tau":
                tau = float(value)
                kwargs["tau_mag"] = tau
                continue
            if key not in known or key == "mode":
                raise ValueError(f"setting {spec!r}: unknown key {key!r} (keys: tau, "
                                 f"{', '.join(n for n in known if n != 'mode')})")
            kind = str(known[key].type)
            if key == "relative_to" or kind == "str":
                kwargs[key] = value
            elif "int" in kind:
                kwargs[key] = None if value.lower() == "none" else int(value)
            else:
                kwargs[key] = float(value)
        except ValueError as error:
            if "setting" in str(error):
                raise
            raise ValueError(f"setting {spec!r}: bad value for {key}: {value!r}") from error
    if tau is not None:
        kwargs.setdefault("tau_dir", tau * tau)
    if block_pages is not None:
        kwargs.setdefault("block_pages", block_pages)
    config = TerminationConfig(**kwargs)
    return Setting(setting_label(config), config)


def _settings(settings, block_pages: int | None) -> list[Setting]:
    if settings is None:
        settings = DEFAULT_SETTINGS
    out = []
    for item in settings:
        if isinstance(item, Setting):
            out.append(item)
        elif isinstance(item, TerminationConfig):
            out.append(Setting(setting_label(item), item))
        else:
            out.append(parse_setting(item, block_pages))
    unique = {}
    for setting in out:  # the same config twice (e.g. --block-pages 1 and a block=1 setting): once
        if setting.name in unique and unique[setting.name].config != setting.config:
            raise ValueError(f"settings: two different settings are named {setting.name!r}")
        if all(other.config != setting.config for other in unique.values()):
            unique.setdefault(setting.name, setting)
    out = list(unique.values())
    if not out:
        raise ValueError("settings: at least one setting is needed")
    return out


# --------------------------------------------------------------------------------------------
# Captures and batches (also used by benchmarks/visit_order.py)


@dataclass
class CaptureLayer:
    """One layer of a capture, upcast to float32 (the file holds float16).

    ``keys``/``values`` ``[H_kv, n_tokens, D]``; ``queries`` ``[H_q, Q, D]``: query ``i`` sits at
    position ``n_tokens - Q + i`` and attends keys ``0 .. n_tokens - Q + i``.
    """

    layer: int
    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    n_tokens: int
    scaling: float
    dtype: torch.dtype  # the stored dtype


def capture_info(path) -> dict:
    """The capture's metadata (``model``, ``text``, ``n_tokens``, ``scaling``, ...) and ``layers``."""
    try:
        from safetensors import safe_open
    except ImportError as error:
        raise ValueError("reading a capture needs safetensors: pip install 'art-runtime[eval]'") from error
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"capture file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            layers = sorted(int(m.group(1)) for name in f.keys() if (m := re.fullmatch(r"L(\d+)\.k", name)))
    except Exception as error:  # safetensors raises its own types for a file it cannot parse
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    if not layers:
        raise ValueError(f"{path} holds no L{{layer}}.k tensor: not an attention capture")
    meta["layers"] = layers
    return meta


def load_capture_layers(path, layers: Sequence[int] | None = None) -> Iterator[CaptureLayer]:
    """Yield the capture's layers (all, or ``layers`` in the given order) as ``CaptureLayer``."""
    from safetensors import safe_open

    info = capture_info(path)
    wanted = info["layers"] if layers is None else list(layers)
    missing = [layer for layer in wanted if layer not in info["layers"]]
    if missing:
        raise ValueError(f"layers {missing} are not in {Path(path).name}; it holds {info['layers']}")
    with safe_open(str(path), framework="pt") as f:
        for layer in wanted:
            keys, values, queries = (f.get_tensor(f"L{layer}.{part}") for part in ("k", "v", "q_last"))
            n_tokens = keys.shape[1]
            if "n_tokens" in info and int(info["n_tokens"]) != n_tokens:
                raise ValueError(f"{path}: L{layer}.k holds {n_tokens} tokens, the metadata says {info['n_tokens']}")
            if values.shape != keys.shape or queries.shape[-1] != keys.shape[-1] or queries.shape[0] % keys.shape[0]:
                raise ValueError(f"{path}: layer {layer} has inconsistent shapes k {list(keys.shape)}, "
                                 f"v {list(values.shape)}, q_last {list(queries.shape)}")
            scaling = float(info.get("scaling", 1.0 / math.sqrt(keys.shape[-1])))
            yield CaptureLayer(layer, keys.float(), values.float(), queries.float(), n_tokens, scaling, keys.dtype)


def query_picks(num_queries: int, num_requests: int | None) -> list[int]:
    """``num_requests`` evenly spaced indices into ``num_queries`` captured queries (None: all)."""
    if num_requests is None or num_requests >= num_queries:
        return list(range(num_queries))
    if num_requests < 1:
        raise ValueError(f"queries must be >= 1, got {num_requests}")
    return torch.linspace(0, num_queries - 1, num_requests).round().long().tolist()


@dataclass
class CaptureBatch:
    """A decode batch over a capture: one request per chosen query, over its causal prefix.

    ``cache`` is FlashInfer NHD ``[pages, 2, page_size, H_kv, D]`` float32. Physical pages
    ``0 .. n_tokens // page_size - 1`` hold the capture's full pages, shared by every request
    whose prefix covers them; each request's last page is a private copy holding its own
    tokens only (so the page metadata built from the cache is each request's own).
    """

    cache: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor
    q: torch.Tensor  # [B, H_q, D] float32
    lengths: list[int]
    picks: list[int]
    page_size: int

    @property
    def page_table(self):
        return self.kv_indptr, self.kv_indices, self.kv_last_page_len


def build_batch(keys, values, queries, n_tokens: int, num_requests: int | None, page_size: int = PAGE_SIZE) -> CaptureBatch:
    """The ``CaptureBatch`` of ``num_requests`` evenly spaced captured queries (None: all)."""
    num_kv_heads, _, head_dim = keys.shape
    picks = query_picks(queries.shape[1], num_requests)
    last = queries.shape[1]
    lengths = [n_tokens - last + i + 1 for i in picks]
    counts = [math.ceil(n / page_size) for n in lengths]
    full = n_tokens // page_size
    cache = torch.zeros(full + len(picks), 2, page_size, num_kv_heads, head_dim)
    for part, tensor in ((0, keys), (1, values)):
        cache[:full, part] = tensor[:, : full * page_size].reshape(num_kv_heads, full, page_size, head_dim).permute(1, 2, 0, 3)
    indices = []
    for b, (n, c) in enumerate(zip(lengths, counts)):
        first = (c - 1) * page_size
        for part, tensor in ((0, keys), (1, values)):
            cache[full + b, part, : n - first] = tensor[:, first:n].transpose(0, 1)
        indices.append(torch.cat([torch.arange(c - 1), torch.tensor([full + b])]))
    kv_indptr = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    kv_last = torch.tensor([n - (c - 1) * page_size for n, c in zip(lengths, counts)], dtype=torch.int32)
    q = queries[:, picks].transpose(0, 1).contiguous().float()
    return CaptureBatch(cache, kv_indptr, torch.cat(indices).int(), kv_last, q, lengths, picks, page_size)


def exact_attention(keys, values, q, lengths, scaling):
    """float64 attention of ``q [B, H_q, D]`` over each request's prefix, and the value scale.

    Returns ``out [B, H_q, D]`` float64 and ``vscale [B, H_q]``: ``max |v|`` over the prefix
    of the query head's KV head.
    """
    group = q.shape[1] // keys.shape[0]
    out, vscale = [], []
    for b, n in enumerate(lengths):
        k = keys[:, :n].double().repeat_interleave(group, 0)
        v = values[:, :n].double().repeat_interleave(group, 0)
        p = torch.softmax(torch.einsum("hd,htd->ht", q[b].double(), k) * scaling, -1)
        out.append(torch.einsum("ht,htd->hd", p, v))
        vscale.append(v.norm(dim=-1).amax(-1))
    return torch.stack(out), torch.stack(vscale)


# --------------------------------------------------------------------------------------------
# Report


def _summary(values: torch.Tensor) -> dict:
    values = values.double().flatten()
    return {"mean": float(values.mean()), "p99": float(values.quantile(0.99)), "max": float(values.max())}


@dataclass
class CriterionResult:
    """One (layer, order, setting) run of the torch backend.

    ``err_output``/``err_values``: ``|o - o_exact|`` per (query, query head) over ``|o_exact|``
    and over ``max|v|`` of the head's selected pages; summaries hold ``mean``, ``p99``,
    ``max`` and ``group_max_mean`` (the mean over (query, KV head) of the group's worst head).
    ``depth``: ``[queries][H_kv]`` pages read / selected; ``visited_pages`` the pages read.
    """

    layer: int
    order: str
    setting: str
    config: dict
    pages_read: int
    pages_selected: int
    kv_bytes: int  # K+V bytes read, in the capture's dtype
    metadata_bytes: int  # page metadata read, as the kernel counts it: bound, every selected page's; Quest order, every key box
    dense_bytes: int  # K+V bytes of a dense read
    err_output: dict
    err_values: dict
    depth: list
    visited_pages: list  # [queries][H_kv] pages read
    head_err_output: list  # [queries][H_q]
    head_err_values: list
    seconds: float
    violations: int | None = None  # bound: query heads beyond the guarantee (None: no guarantee)
    sketch_pages: int = 0  # bound: pages whose key sketch was read (after the cut)

    @property
    def pages_fraction(self) -> float:
        return self.pages_read / self.pages_selected

    @property
    def bytes_fraction(self) -> float:
        return (self.kv_bytes + self.metadata_bytes) / self.dense_bytes


@dataclass
class HindsightResult:
    """The hindsight optimum of one (layer, order).

    ``pages[rel][target]``: ``[queries][H_kv]`` fewest pages, in this order, after which every
    query head of the group is within ``target`` (``rel``: ``output`` = relative to
    ``|o_exact|``, ``values`` = relative to ``max|v|``). ``head_pages`` is the same per query
    head alone (``[queries][H_q]``), to show what sharing one traversal costs.
    ``frontier[rel]``: pages fraction (group) at each of ``FRONTIER_TARGETS``.
    ``worse_than_best[target]``: (query, KV head) rows where the ``best`` order needs more
    pages than this order (output-relative).
    """

    layer: int
    order: str
    pages_selected: list  # [queries] pages per row
    pages: dict
    head_pages: dict
    frontier: dict
    worse_than_best: dict = field(default_factory=dict)

    def fraction(self, target: float, rel: str = "output", per_head: bool = False) -> float:
        table = (self.head_pages if per_head else self.pages)[rel][_key(target)]
        read = sum(sum(row) for row in table)
        width = len(table[0]) if table else 0
        return read / (sum(self.pages_selected) * width) if width else float("nan")


@dataclass
class OvershootResult:
    """Key-box logit bound minus the true largest logit, per (query, query head, page), in nats."""

    layer: int
    median: float
    p90: float
    min: float
    max: float
    count: int


def _key(target: float) -> str:
    return f"{target:g}"


@dataclass
class AnalysisReport:
    """Everything ``analyze_capture`` measured on one capture (see the module docstring)."""

    capture: str
    model: str
    text: str
    n_tokens: int
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    bytes_dtype: str
    queries: list  # indices into the capture's last queries
    num_captured_queries: int
    layers: list
    orders: list
    settings: dict  # name -> TerminationConfig fields
    targets: list
    criteria: list = field(default_factory=list)  # CriterionResult
    hindsight: list = field(default_factory=list)  # HindsightResult
    overshoot: list = field(default_factory=list)  # OvershootResult
    sketch_overshoot: list = field(default_factory=list)  # OvershootResult: page mass bound / true, nats
    seconds: float = 0.0

    def result(self, layer: int, order: str, setting: str) -> CriterionResult:
        for r in self.criteria:
            if (r.layer, r.order, r.setting) == (layer, order, setting):
                return r
        raise KeyError((layer, order, setting))

    def hindsight_of(self, layer: int, order: str) -> HindsightResult:
        for h in self.hindsight:
            if (h.layer, h.order) == (layer, order):
                return h
        raise KeyError((layer, order))

    def to_dict(self) -> dict:
        out = asdict(self)
        for r, d in zip(self.criteria, out["criteria"]):
            d["pages_fraction"], d["bytes_fraction"] = r.pages_fraction, r.bytes_fraction
        for h, d in zip(self.hindsight, out["hindsight"]):
            d["fraction"] = {rel: {_key(t): h.fraction(t, rel) for t in self.targets} for rel in ("output", "values")}
            d["head_fraction"] = {rel: {_key(t): h.fraction(t, rel, True) for t in self.targets}
                                  for rel in ("output", "values")}
        out["frontier_targets"] = list(FRONTIER_TARGETS)
        return out

    def write_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def plot(self, out_dir) -> list[Path]:
        """``plot_report(self, out_dir)``."""
        return plot_report(self, out_dir)

    def format_table(self) -> str:
        """The printed report: criteria, hindsight optimum and bound overshoot, per layer."""
        lines = [
            f"== {self.capture}: {self.model} on {self.text}, {self.n_tokens} tokens, "
            f"{self.num_qo_heads} q / {self.num_kv_heads} kv heads, head_dim {self.head_dim}",
            f"   {len(self.queries)} of {self.num_captured_queries} last queries as requests, page size "
            f"{self.page_size}, layers {self.layers}; torch backend fp32 on CPU, {self.seconds:.0f} s",
            "   pages/bytes: read / dense over all (query, KV head) (bytes in "
            f"{self.bytes_dtype}, page metadata included: bound, and key boxes in Quest order); err: |o - o_exact| per query head, "
            "relative to |o_exact| and to max|v|; depth: pages read / selected per (query, KV head)",
            "",
        ]
        width = max(len("setting"), *(len(r.setting) for r in self.criteria))
        header = (f"{'layer':>5} {'order':<7} {'setting':<{width}} {'pages':>6} {'bytes':>6} | "
                  f"{'err/|o| mean':>12} {'p99':>8} {'max':>8} {'grp max':>8} | "
                  f"{'err/max|v| mean':>15} {'p99':>8} {'max':>8} | {'depth min':>9} {'med':>5} {'max':>5} | "
                  "viol sketch")
        lines += [header, "-" * len(header)]
        for r in self.criteria:
            depth = torch.tensor(r.depth).flatten()
            lines.append(
                f"{r.layer:>5} {r.order:<7} {r.setting:<{width}} {100 * r.pages_fraction:5.1f}% "
                f"{100 * r.bytes_fraction:5.1f}% | {r.err_output['mean']:12.2e} {r.err_output['p99']:8.2e} "
                f"{r.err_output['max']:8.2e} {r.err_output['group_max_mean']:8.2e} | "
                f"{r.err_values['mean']:15.2e} {r.err_values['p99']:8.2e} {r.err_values['max']:8.2e} | "
                f"{float(depth.min()):9.2f} {float(depth.median()):5.2f} {float(depth.max()):5.2f} | "
                f"{'-' if r.violations is None else r.violations:>4} "
                f"{100 * r.sketch_pages / r.pages_selected if r.sketch_pages else 0:5.1f}%")
        lines.append("   (grp max: mean over (query, KV head) of the group's worst query head; viol: bound only, "
                     "query heads whose error exceeds the guarantee; sketch: pages whose key sketch bound read)")
        lines += ["", "hindsight optimum: fewest pages in the order after which every query head of the group is "
                  "within the target (relative to |o_exact|): % of pages for the group (for each head alone)"]
        head = f"{'layer':>5} {'order':<7} " + " ".join(f"{'err <= ' + _key(t):>18}" for t in self.targets)
        head += "   (query, KV head) rows where best needs more"
        lines += [head, "-" * len(head)]
        for h in self.hindsight:
            cells = " ".join(f"{100 * h.fraction(t):7.1f}% ({100 * h.fraction(t, per_head=True):5.1f}%)"
                             for t in self.targets)
            rows = len(h.pages_selected) * self.num_kv_heads
            worse = ", ".join(f"{n}/{rows}" for n in h.worse_than_best.values()) if h.order != "best" else "-"
            lines.append(f"{h.layer:>5} {h.order:<7} {cells}   {worse}")
        lines += ["", "bound overshoot: key-box logit bound - true max logit, per (query, query head, page), nats",
                  f"{'layer':>5} {'median':>7} {'p90':>7} {'min':>7} {'max':>7}"]
        lines += [f"{o.layer:>5} {o.median:7.2f} {o.p90:7.2f} {o.min:7.2f} {o.max:7.2f}" for o in self.overshoot]
        if self.sketch_overshoot:
            lines += ["", "sketch overshoot: key-sketch bound of a page's softmax mass over its true mass, per (query, "
                      "query head, page), nats", f"{'layer':>5} {'median':>7} {'p90':>7} {'min':>7} {'max':>7}"]
            lines += [f"{o.layer:>5} {o.median:7.2f} {o.p90:7.2f} {o.min:7.2f} {o.max:7.2f}"
                      for o in self.sketch_overshoot]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The analysis


def _order_selection(order, ctx: PolicyContext, q, meta) -> PageSelection:
    """The visit order of a ``DensePolicy`` order, exactly as the wrapper computes it."""
    policy = DensePolicy(order=order)
    layout = policy.layout(ctx)
    return PageSelection(layout.indptr, policy.select(ctx, layout, 0, q, meta))


def _row_pages(selection: PageSelection, row: int) -> torch.Tensor:
    return selection.pages[int(selection.indptr[row]): int(selection.indptr[row + 1])].long()


def _request_pages(data: CaptureLayer, batch: CaptureBatch, b: int):
    """Per-page float64 sums of request ``b``, per query head.

    Returns ``Z [H_q, c]`` (sum of ``exp(s - M)`` over the page's tokens, ``M`` the head's
    largest logit), ``S [H_q, c, D]`` (the same weights times the values), the page's
    largest logit ``[H_q, c]`` (natural units), ``o_exact [H_q, D]`` and ``vscale [H_q]``.
    """
    n, page_size = batch.lengths[b], batch.page_size
    num_qo = batch.q.shape[1]
    group = num_qo // data.keys.shape[0]
    pages = math.ceil(n / page_size)
    pad = pages * page_size - n
    k = data.keys[:, :n].double().repeat_interleave(group, 0)  # [H_q, n, D]
    v = data.values[:, :n].double().repeat_interleave(group, 0)
    s = torch.einsum("hd,htd->ht", batch.q[b].double(), k) * data.scaling
    s_pad = torch.nn.functional.pad(s, (0, pad), value=float("-inf")).view(num_qo, pages, page_size)
    page_max = s_pad.amax(-1)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    e_pad = torch.nn.functional.pad(e, (0, pad)).view(num_qo, pages, page_size)
    v_pad = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(num_qo, pages, page_size, -1)
    z = e_pad.sum(-1)
    sv = torch.einsum("hct,hctd->hcd", e_pad, v_pad)
    o_exact = sv.sum(1) / z.sum(1, keepdim=True)
    return z, sv, page_max, o_exact, v.norm(dim=-1).amax(-1)


def _sketch_log_mass(meta: PageMetadata, batch: CaptureBatch, b: int, scaling: float) -> torch.Tensor:
    """``[H_q, c]`` the key sketch's bound of each page's ``log sum_t exp(s_t)`` for request ``b``, in nats."""
    from .reference import LOG2E, sketch_page_log2_mass

    num_kv = meta.key_codes.shape[1]
    phys = batch.kv_indices[int(batch.kv_indptr[b]): int(batch.kv_indptr[b + 1])].long()
    pages = phys.numel()
    tokens = torch.full((pages,), batch.page_size, dtype=torch.long)
    tokens[-1] = int(batch.kv_last_page_len[b])
    q = batch.q[b].view(num_kv, -1, batch.q.shape[-1])  # [H_kv, G, D]
    out = []
    for h in range(num_kv):
        upper, _ = sketch_page_log2_mass(q[h].expand(pages, -1, -1), meta.key_codes[phys, h],
                                         *meta.sketch_grid(phys, h), tokens, scaling * LOG2E)
        out.append(upper.T.double() / LOG2E)  # [G, c], nats
    return torch.cat(out)  # [H_q, c]


def _first_within(err: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[..., T]`` fewest pages (1-based prefix length) with ``err[..., k-1] <= target``."""
    ok = err[..., None, :] <= targets[:, None]  # [..., T, c]
    first = ok.to(torch.int8).argmax(-1) + 1
    return torch.where(ok.any(-1), first, err.shape[-1])


def analyze_capture(
    path,
    *,
    layers: Sequence[int] | None = None,
    queries: int | None = DEFAULT_QUERIES,
    page_size: int = PAGE_SIZE,
    orders: Sequence[str] = ORDERS,
    settings=None,
    block_pages: int | None = None,
    targets: Sequence[float] = TARGETS,
    progress: bool = True,
) -> AnalysisReport:
    """Simulate visit orders and termination criteria on a capture, against exact attention.

    Parameters
    ----------
    path : str or Path
        A capture (``data/captures/README.md`` format).
    layers : sequence of int, optional
        Layers to analyze; default every layer in the file.
    queries : int or None
        Requests per layer: this many evenly spaced queries of the captured last ones
        (``None``: all of them, 64 in the shared captures).
    page_size : int
        Tokens per KV page.
    orders : sequence of {"recency", "quest", "mass", "best"}
        Visit orders (``best``: by the true softmax mass of the GQA group, most first).
    settings : sequence, optional
        Termination settings: ``TerminationConfig``, ``Setting`` or ``MODE[:key=value,...]``
        strings (``parse_setting``). Default ``DEFAULT_SETTINGS``.
    block_pages : int, optional
        Pages per termination check where a setting does not say (default: the kernel's,
        64 tokens' worth); 1 checks after every page.
    targets : sequence of float
        Error targets (relative to ``|o|`` and to ``max|v|``) of the hindsight optimum.
    progress : bool
        Show a tqdm progress bar (on stderr).

    Returns
    -------
    AnalysisReport
    """
    start = time.perf_counter()
    path = Path(path)
    info = capture_info(path)
    layers = info["layers"] if layers is None else list(layers)
    orders = list(orders)
    bad = [o for o in orders if o not in ORDERS]
    if bad or not orders or len(set(orders)) != len(orders):
        raise ValueError(f"orders must be distinct values of {ORDERS}, got {orders}")
    if not isinstance(page_size, int) or not 1 <= page_size <= 256:
        raise ValueError(f"page_size must be an int in 1..256, got {page_size!r}")
    if queries is not None and (not isinstance(queries, int) or queries < 1):
        raise ValueError(f"queries must be an int >= 1 or None, got {queries!r}")
    targets = sorted({float(t) for t in targets})
    if not targets or any(not 0 < t for t in targets):
        raise ValueError(f"targets must be positive numbers, got {targets}")
    settings = _settings(settings, block_pages)
    all_targets = torch.tensor(sorted(set(targets) | set(FRONTIER_TARGETS)), dtype=torch.float64)
    target_index = {_key(t): int((all_targets - t).abs().argmin()) for t in targets}
    frontier_index = [int((all_targets - t).abs().argmin()) for t in FRONTIER_TARGETS]

    report = None
    bar = tqdm(total=len(layers) * (1 + len(orders) * len(settings)), desc=f"analyze {path.name}",
               unit="run", disable=not progress, leave=False)
    for data in load_capture_layers(path, layers):
        num_kv, n_tokens, dim = data.keys.shape
        num_qo = data.queries.shape[0]
        group = num_qo // num_kv
        batch = build_batch(data.keys, data.values, data.queries, n_tokens, queries, page_size)
        if report is None:
            esize = torch.empty(0, dtype=data.dtype).element_size()
            report = AnalysisReport(
                capture=path.name, model=info.get("model", "unknown model"), text=info.get("text", "unknown text"),
                n_tokens=n_tokens, num_qo_heads=num_qo, num_kv_heads=num_kv, head_dim=dim, page_size=page_size,
                bytes_dtype=str(data.dtype).replace("torch.", ""), queries=batch.picks,
                num_captured_queries=data.queries.shape[1], layers=layers, orders=orders,
                settings={s.name: asdict(s.config) for s in settings}, targets=targets)
        num_req = len(batch.lengths)
        meta = PageMetadata.from_cache(batch.cache, *batch.page_table)
        ctx = PolicyContext(*batch.page_table, num_qo, num_kv, page_size, sm_scale=data.scaling)
        selections = {o: _order_selection(o, ctx, batch.q, meta) for o in orders if o != "best"}

        # Exact attention, the best order, the hindsight optimum and the overshoot: float64, per request.
        o_exact = torch.empty(num_req, num_qo, dim, dtype=torch.float64)
        vscale = torch.empty(num_req, num_qo, dtype=torch.float64)
        best_pages, overshoot, sketch_overshoot = [], [], []
        hind = {o: {"group": [], "head": []} for o in orders}  # per request: [T, H_kv, rel] / [T, H_q, rel]
        for b in range(num_req):
            z, sv, page_max, o_exact[b], vscale[b] = _request_pages(data, batch, b)
            pages = z.shape[1]
            phys = batch.kv_indices[int(batch.kv_indptr[b]): int(batch.kv_indptr[b + 1])].long()
            kmin, kmax = (b.double().transpose(0, 1).repeat_interleave(group, 0)  # [H_q, c, D]
                          for b in meta.key_bounds(phys[:, None], torch.arange(num_kv)))
            qb = batch.q[b].double()[:, None, :]
            ub = (torch.maximum(qb * kmax, qb * kmin)).sum(-1) * data.scaling
            overshoot.append((ub - page_max).flatten())
            true_log_mass = z.log() + page_max.amax(1, keepdim=True)  # z is relative to the head's largest logit
            sketch_overshoot.append((_sketch_log_mass(meta, batch, b, data.scaling) - true_log_mass).flatten())
            mass = (z / z.sum(1, keepdim=True)).view(num_kv, group, pages).sum(1)  # [H_kv, c]
            order_of = {"best": torch.sort(mass, dim=1, descending=True, stable=True).indices}
            best_pages.append(order_of["best"])
            for o in orders:
                if o != "best":
                    order_of[o] = torch.stack([_row_pages(selections[o], b * num_kv + h) for h in range(num_kv)])
                idx = order_of[o].repeat_interleave(group, 0)  # [H_q, c]
                cum_z = z.gather(1, idx).cumsum(1)
                cum_s = sv.gather(1, idx[..., None].expand(-1, -1, dim)).cumsum(1)
                err = (cum_s / cum_z[..., None] - o_exact[b][:, None]).norm(dim=-1)  # [H_q, c]
                rel = torch.stack([err / o_exact[b].norm(dim=-1, keepdim=True), err / vscale[b][:, None]])
                hind[o]["head"].append(_first_within(rel, all_targets))  # [2, H_q, T]
                hind[o]["group"].append(_first_within(rel.view(2, num_kv, group, pages).amax(2), all_targets))
        if "best" in orders:
            counts = batch.kv_indptr.diff().long().repeat_interleave(num_kv)
            indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int()
            selections["best"] = PageSelection(indptr, torch.cat([p.flatten() for p in best_pages]).int())
        for results, values in ((report.overshoot, overshoot), (report.sketch_overshoot, sketch_overshoot)):
            over = torch.cat(values)
            results.append(OvershootResult(data.layer, float(over.median()), float(over.quantile(0.9)),
                                           float(over.min()), float(over.max()), over.numel()))
        pages_per_request = batch.kv_indptr.diff().tolist()
        layer_hind, group_ks = {}, {}
        for o in orders:
            group_k = group_ks[o] = torch.stack(hind[o]["group"])  # [B, 2, H_kv, T]
            head_k = torch.stack(hind[o]["head"])  # [B, 2, H_q, T]
            total = sum(pages_per_request) * num_kv
            rels = ("output", "values")
            layer_hind[o] = HindsightResult(
                data.layer, o, pages_per_request,
                pages={rel: {t: group_k[:, i, :, j].tolist() for t, j in target_index.items()} for i, rel in enumerate(rels)},
                head_pages={rel: {t: head_k[:, i, :, j].tolist() for t, j in target_index.items()}
                            for i, rel in enumerate(rels)},
                frontier={rel: [float(group_k[:, i, :, j].sum()) / total for j in frontier_index]
                          for i, rel in enumerate(rels)},
            )
        for o in orders:
            if "best" in orders and o != "best":
                worse = group_ks["best"][:, 0] > group_ks[o][:, 0]  # [B, H_kv, T]
                layer_hind[o].worse_than_best = {t: int(worse[..., j].sum()) for t, j in target_index.items()}
            report.hindsight.append(layer_hind[o])
        bar.update()

        # The criteria, through the reference backend.
        for o in orders:
            for setting in settings:
                t0 = time.perf_counter()
                wrapper = BatchARTDecodeWrapper(backend="torch")
                policy = DensePolicy(order=o) if o != "best" else None
                wrapper.plan(*batch.page_table, num_qo, num_kv, dim, page_size, termination=setting.config,
                             sm_scale=data.scaling, policy=policy, selection=selections["best"] if o == "best" else None)
                out = wrapper.run(batch.q, batch.cache, page_meta=meta).double()
                stats = wrapper.last_stats
                # Mode off reads every page whatever the order (the wrapper plans a dense policy
                # without it); every other mode must have walked the analysis's order (bound:
                # the same pages, its tails in the order of their mass bounds).
                if setting.config.mode != "off" and not _same_visits(stats.selection, selections[o],
                                                                     setting.config.mode == "bound"):
                    raise RuntimeError(f"the wrapper visited another order than the analysis for {o}")
                report.criteria.append(_criterion_result(
                    data.layer, o, setting, out, stats, o_exact, vscale, batch, meta, esize,
                    time.perf_counter() - t0))
                bar.update()
    bar.close()
    report.seconds = time.perf_counter() - start
    return report


def _same_visits(visited: PageSelection, planned: PageSelection, reordered_tails: bool) -> bool:
    """Whether ``visited`` walked ``planned``'s rows: in its order, or in any order of the same
    pages per row where the tails may be reordered."""
    if not reordered_tails:
        return torch.equal(visited.pages.long(), planned.pages.long())
    rows = torch.repeat_interleave(torch.diff(planned.indptr.long()))
    width = int(max(visited.pages.max(), planned.pages.max())) + 1 if planned.pages.numel() else 1
    return torch.equal(torch.sort(rows * width + visited.pages.long()).values,
                       torch.sort(rows * width + planned.pages.long()).values)


def _criterion_result(layer, order, setting, out, stats, o_exact, vscale, batch, meta, esize,
                      seconds) -> CriterionResult:
    num_req, num_qo, dim = out.shape
    num_kv = stats.visited_pages.shape[1]
    err = (out - o_exact).norm(dim=-1)  # [B, H_q]
    rel_o = err / o_exact.norm(dim=-1)
    rel_v = err / vscale
    summaries = []
    for rel in (rel_o, rel_v):
        summary = _summary(rel)
        summary["group_max_mean"] = float(rel.view(num_req, num_kv, -1).amax(-1).mean())
        summaries.append(summary)
    tokens_read = int(stats.visited_tokens.long().sum())
    # The kernel's count: K+V in the simulated dtype (fp32, re-expressed in the capture dtype),
    # the metadata of every selected page in modes mass and bound, and every page's key box when
    # the Quest or mass order scores them (dense selections: selected pages = every page; mode
    # off plans without the order, so it scores nothing). Checked.
    selected = int(stats.selected_pages.sum())
    scored = order in ("quest", "mass") and setting.config.mode != "off"
    meta32 = int(stats.kv_bytes_read) - tokens_read * 2 * dim * batch.cache.element_size()
    expected32 = selected * (meta.nbytes_per_page(setting.config.mode) + meta.key_box_bytes_per_page() * scored)
    sketch_pages = int(stats.sketch_pages.long().sum()) if stats.sketch_pages is not None else 0
    expected32 += sketch_pages * meta.key_sketch_bytes_per_page()
    if meta32 != expected32:
        raise RuntimeError(f"kv_bytes_read holds {meta32} bytes of metadata, expected {expected32}")
    violations = None
    if setting.config.mode == "bound":
        allowed = setting.config.eps * (out.norm(dim=-1) if setting.config.relative_to == "output" else vscale)
        # fp32 rounding, as mode off has too (the same slack as the tests')
        slack = 1e-5 * o_exact.norm(dim=-1) + 1e-6 * vscale
        violations = int((err > allowed + slack).sum())
    dense_tokens = sum(batch.lengths) * num_kv
    return CriterionResult(
        layer=layer, order=order, setting=setting.name, config=asdict(setting.config),
        pages_read=int(stats.visited_pages.sum()), pages_selected=int(stats.selected_pages.sum()),
        kv_bytes=tokens_read * 2 * dim * esize,
        metadata_bytes=meta32,
        dense_bytes=dense_tokens * 2 * dim * esize,
        err_output=summaries[0], err_values=summaries[1],
        depth=(stats.visited_pages.double() / stats.selected_pages.double()).tolist(),
        visited_pages=stats.visited_pages.tolist(),
        head_err_output=rel_o.tolist(), head_err_values=rel_v.tolist(), seconds=seconds, violations=violations,
        sketch_pages=sketch_pages,
    )


# --------------------------------------------------------------------------------------------
# Plots


def plot_report(report: AnalysisReport, out_dir) -> list[Path]:
    """Write ``<capture>_pages_vs_error.png`` and ``<capture>_depth.png``; return their paths.

    Pages vs error: one point per (order, setting), layers pooled: filled = max over query
    heads, hollow = p99; dashed: the order's hindsight frontier (fewest pages for which every
    head of each group is within the error on the y axis). Depth: per (order, setting) a
    heatmap of pages read / selected, queries down, (layer, KV head) across, with the
    hindsight optimum at each target beside them.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ValueError("plots need matplotlib: pip install 'art-runtime[eval]'") from error
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(report.capture).stem
    colors = {"recency": "tab:blue", "quest": "tab:orange", "mass": "tab:purple", "best": "tab:green"}
    markers = "osD^v<>phX*"
    setting_names = list(report.settings)
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, rel, title in ((axes[0], "output", "relative to |o_exact|"), (axes[1], "values", "relative to max|v|")):
        for order in report.orders:
            hs = [h for h in report.hindsight if h.order == order]
            weights = [sum(h.pages_selected) for h in hs]
            frontier = [sum(w * h.frontier[rel][i] for w, h in zip(weights, hs)) / sum(weights)
                        for i in range(len(FRONTIER_TARGETS))]
            ax.plot([100 * f for f in frontier], FRONTIER_TARGETS, "--", color=colors[order], lw=1.2)
            for i, name in enumerate(setting_names):
                rows = [r for r in report.criteria if r.order == order and r.setting == name]
                pages = 100 * sum(r.pages_read for r in rows) / sum(r.pages_selected for r in rows)
                errs = torch.tensor([e for r in rows for e in (r.head_err_output if rel == "output" else r.head_err_values)]
                                    ).flatten().double().clamp(min=1e-8)
                marker = markers[i % len(markers)]
                ax.scatter([pages], [float(errs.max())], marker=marker, color=colors[order])
                ax.scatter([pages], [float(errs.quantile(0.99))], marker=marker, facecolors="none",
                           edgecolors=colors[order])
        ax.set_yscale("log")
        ax.set_xlim(0, 102)
        ax.set_xlabel("pages read, % of selected")
        ax.set_ylabel(f"per-head output error, {title}")
        ax.set_title(f"{title}: filled max, hollow p99 over heads")
        ax.grid(True, which="both", alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[o], ls="--", label=f"{o} order (dashed: hindsight optimum)")
               for o in report.orders]
    handles += [Line2D([], [], color="gray", ls="", marker=markers[i % len(markers)], label=name)
                for i, name in enumerate(setting_names)]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(f"{report.capture} ({report.model}), layers {report.layers}, {len(report.queries)} queries, "
                 f"page size {report.page_size}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.8, 0.95))
    path = out_dir / f"{stem}_pages_vs_error.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    panels = [name for name in setting_names if report.settings[name]["mode"] != "off"]
    columns = [("setting", name) for name in panels] + [("hindsight", t) for t in report.targets]
    fig, axes = plt.subplots(len(report.orders), len(columns), squeeze=False, layout="constrained",
                             figsize=(1.9 * len(columns) + 1.5, 2.4 * len(report.orders) + 1.0))
    image = None
    xlabels = [f"L{layer}h{h}" for layer in report.layers for h in range(report.num_kv_heads)]
    for row, order in enumerate(report.orders):
        for col, (kind, what) in enumerate(columns):
            ax = axes[row][col]
            if kind == "setting":
                blocks = [torch.tensor(report.result(layer, order, what).depth) for layer in report.layers]
                title = what
            else:
                blocks = []
                for layer in report.layers:
                    h = report.hindsight_of(layer, order)
                    k = torch.tensor(h.pages["output"][_key(what)], dtype=torch.float64)
                    blocks.append(k / torch.tensor(h.pages_selected, dtype=torch.float64)[:, None])
                title = f"hindsight err<={what:g}"
            image = ax.imshow(torch.cat(blocks, 1).numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis",
                              interpolation="nearest")
            ax.set_title(title.replace(" ", "\n", 1) if row == 0 else "", fontsize=7)
            ax.set_xticks(range(len(xlabels)))
            ax.set_xticklabels(xlabels if row == len(report.orders) - 1 else [], fontsize=6, rotation=90)
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f"{order}\nqueries", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="pages read / selected")
    fig.suptitle(f"{report.capture}: depth per (query, KV head)", fontsize=10)
    path = out_dir / f"{stem}_depth.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def write_json(reports: Sequence[AnalysisReport], path, **extra) -> Path:
    """All reports in one JSON file (``{**extra, "reports": [...]}``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**extra, "reports": [r.to_dict() for r in reports]}, indent=1))
    return path
