"""When ART stops reading a head's pages: the termination criteria and their settings.

Both criteria are evaluated per (request, KV head) after every visited *block* (``block_pages``
consecutive entries of the visit order), for the whole GQA group at once: the query heads
that share a KV head share one traversal, so the group stops only when all of them agree.

``stability`` (the ART paper's rule, no guarantee)
    For every query head, ``| |o_t| - |o_{t-1}| | / |o_t| < tau_mag`` and
    ``1 - cos(o_t, o_{t-1}) < tau_dir``; stop once this held for ``patience`` consecutive
    blocks.

``bound`` (certified)
    For one query head after the visited blocks, with ``s_i`` the scaled logits, ``L`` the
    read mass ``sum_{i read} e^{s_i}``, ``o_t`` the running output, ``U`` the unread tokens
    of the selection and ``W = sum_{i in U} e^{s_i}``, exact attention over the selection is
    ``o = (L o_t + sum_U e^{s_i} v_i) / (L + W)``, so exactly::

        o - o_t = sum_{i in U} e^{s_i} (v_i - o_t) / (L + W)                          (1)

    *Mass bounds.* The key sketch (``PageMetadata``) holds every token's key as an 8-bit cell
    per dimension, ``k_td in [lo_td, lo_td + s_jd]`` (power-of-two grid per page, head and
    dim; the cells contain the keys as the cache stores them). Hence every unread logit
    lies in ``[lb_t, ub_t]``, ``ub_t = scale sum_d max(q_d lo_td, q_d (lo_td + s_jd))`` and
    ``lb_t`` the same with ``min``, each widened by a relative rounding margin that covers
    the fp32 arithmetic of this bound and of the decode kernel's own ``q.k``. Summing over a
    page's tokens: ``W_j^lo <= W_j <= W_j^hi``; over the unread pages ``W^lo <= W <= W^hi``.

    *Two error bounds* follow from (1); ``V_j`` is page ``j``'s largest value norm (metadata,
    rounded up) and ``Vrest`` the largest over the unread pages:

    (a) ``(1) = W / (L + W) (vbar - o_t)`` with ``vbar`` the unread tokens' softmax-weighted
        mean value, ``|vbar| <= Vrest``; ``W / (L + W)`` grows with ``W``, so
        ``|o - o_t| <= W^hi / (L + W^hi) (Vrest + |o_t|)``.
    (b) The triangle inequality on (1)'s numerator, page by page, and ``L + W >= L + W^lo``:
        ``|o - o_t| <= (sum_{j unread} W_j^hi V_j + W^hi |o_t|) / (L + W^lo)``. Tighter than
        (a) when the unread mass sits on pages whose values are smaller than the largest.

    The check takes the smaller of the two and stops when it is ``<= eps * |o_t|``
    (``relative_to="output"``) or ``<= eps * Vscale`` with ``Vscale`` the largest value norm
    over the selected pages (``relative_to="values"``). The returned output is then within
    that error of exact attention over the selected pages, for every input, up to the
    floating-point error that mode ``off`` has too. Split rows (values only): a chunk ``k``
    that stops with (a) or (b), ``|o_t|`` replaced by ``Vscale >= |o|``, has
    ``|numerator_k of (1)| <= eps Vscale (L_k + W_k)``; the merged output is exactly
    attention over the union of the tokens read, whose (1) numerator is the sum of the
    chunks', so summing gives the row's guarantee. Rows relative to the output are never split.

    *Pre-computed* (``page_bounds`` pre-pass, ``reference.bound_terms_torch``): per visit
    position, base-2 logs of the suffix sums of ``W_j^hi``, ``W_j^lo`` and ``W_j^hi V_j``
    (exact log-sum-exp scans, a ``2^-9`` slack for their fp32 rounding) and the suffix max
    of ``V_j``; the in-kernel check is a few scalar operations per block.

    *The cut.* The sketch is 30% of a page's fp16 K+V (a byte a key dimension plus 3 bytes
    a dimension of grid), and the bound at position ``p`` needs the sketch of every page
    from ``p`` on. Early positions cannot stop anyway, so the pre-pass first runs mode
    ``mass``'s estimate from the key boxes (3% of a page) and reads sketches only from the
    first position at which every head's *estimated* unread share is at most
    ``SKETCH_CUT_SHARE * eps`` (``reference.SKETCH_CUT_SHARE``, 1); before it ``W^hi`` is
    infinite (only the trivial ``W / (L + W) <= 1`` of (a) remains). The estimate only
    moves the cut, never the guarantee: a
    cut too late reads pages the bound could have skipped, one too early reads sketches for
    nothing. Bytes (``kv_bytes_read``): every selected page's key box and value norm, and
    the sketch of the pages from the cut on (``DecodeStats.sketch_pages``). Per-page key boxes, by contrast, overshoot the true largest logit by
    11-15 nats on real attention and never stop (issue 8); measured numbers for the sketch:
    ``benchmarks/results/bound_sketch_2026-11-26/README.md``.

    *Visit order of the tail.* The pre-pass bounds the mass of exactly the pages after the
    cut, so it visits them in the order of those bounds instead of the policy's: largest
    ``log2 sum_g W_jg^hi + log2 V_j`` first (the page's bound of its term in (b);
    ``reference.tail_key``, ``tail_visit_order``), ties in the policy's order, pages before the
    cut and the row's first ``min_pages`` in place. Any order keeps the guarantee (the terms
    are suffix sums over the order visited); this one makes the unread bound fall fastest at
    no extra bytes: on the shared captures (mass order, values eps 0.05, 8 queries a layer)
    Qwen2.5's bytes 77.3 -> 75.7% and 73.4 -> 70.5%, SmolLM2's 51.7 -> 50.8% and 41.4 -> 41.0%,
    zero violations; ordering by the mass bound alone, or by shares of each head's estimated
    total, came within half a point (``benchmarks/results/tail_order_2026-11-27/``).
    ``DecodeStats.selection`` holds the order visited.

``mass`` (estimated, no guarantee)
    Estimates the error that stopping now leaves, ``|o - o_t|``, from (1): the unread pages'
    share of the softmax mass times how far their values pull ``o_t``.

    *Share.* The per-page key boxes give an *estimate* of each unread page's softmax mass:
    the box centre ``c_j = (kmin_j + kmax_j) / 2`` and half-width ``r_j`` model the page's
    keys as spread around ``c_j`` with per-dimension deviation ``r_j / 2``, so that
    (lognormal moment) the page's mass is about
    ``n_j exp(s q.c_j + s^2 / 2 sum_d q_d^2 (r_jd / 2)^2 - m)`` (``s`` the softmax scale).
    ``West`` sums that over the unread pages (pre-computed suffix sums over each chunk's
    blocks, ``page_bounds``).

    *Pull.* (1) is ``W / (L + W) (vbar - o_t)`` with ``vbar`` the unread tokens' weighted mean
    value. Pages are visited most-mass first, so the unread ones are most like the pages read
    last: ``vbar`` is estimated by the plain mean ``vblk`` of the values of the block just read
    (tokens of a low-mass page weigh about alike).

    Stop when ``West / (L + West) * |vblk - o_t| <= eps * |o_t|`` for every query head of the
    group, and ``West / (L + West) <= MASS_MAX_SHARE`` (1/4: never binding on real attention,
    it lets the kernel skip the vector work of early checks). The pull ``|vblk - o_t| / |o_t|``
    is measured at every ``MASS_PULL_CHECKS``-th check (4; the last measurement holds in
    between, the share is current at every check). The kernel gets ``vblk`` from a query row
    of zeros, whose softmax is uniform. It reads the key boxes (3% of a page at D = 64) and
    nothing else beyond the pages.
    Estimating the share alone (the former rule, replaced on 2026-11-26) misjudged the
    error by a factor that differs per model: on real attention at eps 0.02 and 0.05 its p99
    per-head error was 0.8-4x eps (SmolLM2-135M high, Qwen2.5-0.5B low), so no one eps fitted
    both; with the pull it is 0.85-2.0x eps on the same layers (``../shared/data/captures``,
    mass order, 32 queries a layer; ``benchmarks/results/mass_pull_2026-11-26/README.md``). The
    estimate of a page's log-mass has median error -0.2..+0.3 nats and p10..p90 within about
    -1.5..+1.9 nats, where the box bound's overshoot is 11-15 nats. No guarantee: a page whose
    keys form far-apart clusters can hold much more mass than the estimate says, and the
    unread values can sit farther from ``o_t`` than the last block's. When a row is split into
    chunks, each chunk judges its own share and output, and the row's blocks are dealt to its
    chunks in turn (``plan.interleaved_slots``) so that each holds a like share of its mass:
    in contiguous chunks the last ones hold the lightest pages and must still meet eps
    relative to themselves (Qwen2.5-0.5B at batch 64 on an H100: 75% of the pages read,
    against 54-58% dealt; ``benchmarks/results/dealt_chunks_2026-11-28/``).

``off``
    Visit every selected page: exact attention over the selection.

``min_pages`` applies to every mode: visit-order positions ``< min_pages`` are always read
(the sink page and the current page come first in every built-in order).

Defaults (``TerminationConfig()``), calibrated at task level on SmolLM2-135M and checked on
Qwen2.5-Coder-0.5B (``benchmarks/results/calibration_smollm2_2026-11-26/README.md``) by the
rule: every passkey and needle answer scored as dense scores it, perplexity within 1% of
dense, as few pages read as possible. ``mass`` at eps 0.02 meets it at 65% of the pages at
2K tokens (eps 0.05: 51%, but perplexity +1.4% at 1K context in an earlier run; eps 0.1:
+1.4% at 2K); the paper's ``stability`` thresholds with ``patience`` 2 lost a pass key at 2K
that patience 4 keeps (91% of the pages); ``bound`` with the former min/max key boxes read
99-100% of the pages at every eps measured (up to 0.5 relative to the values), so its
default eps stays the certified level of the termination issue's target (0.05). With the
key sketches, a first 2K run (4 prompts) read 77% of the pages relative to the output and
53% relative to the values at eps 0.05, every answer as dense: not yet enough prompts to
change the default mode or ``relative_to``. Those runs checked every 64 tokens in every mode;
``mass`` and ``bound`` now check every 128 (``DEFAULT_BLOCK_TOKENS``), rechecked at 2K: the rule
still met, 66.7% of the pages against 65.2%, perplexity +0.37% against +0.49%
(``benchmarks/results/calibration_smollm2_2026-11-26/block128_2k/README.md``).

``mass``'s rule then changed from the unread share to the estimated error (above), and its eps
was recalibrated by the same rule (``benchmarks/results/mass_pull_2026-11-26/README.md``): eps
0.05 meets it on SmolLM2 at 1K, 2K, 4K and 8K (65.0% / 59.1% / 52.6% / 41.2% of the pages,
perplexity +0.47% / +0.50%, every answer as dense) and on Qwen at 4K and 8K (76.6% / 72.7%),
fewer pages than the share rule's eps 0.02 read at every length it was run (2K-8K: 66.7%,
57.6%, 46.2%; Qwen 80.8%, 77.7%); eps 0.1 stays within the rule too but at its edge
(perplexity +0.97% at 2K, one generated answer of nine differing from dense's), as the share
rule's eps 0.05 was. On the captures the error rule at 0.05 errs about as the share rule at
0.02 did on SmolLM2 (p99 per head 6.6-7.9% against 4.4-8.1%); on Qwen, where the share rule
kept p99 at 2-3% by reading 68-72% of the pages, it reads 49-53% at p99 4.3-7.8%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MODES = ("off", "stability", "bound", "mass")
RELATIVE_TO = ("output", "values")

# Kernel-side integer codes (constexpr in the Triton kernel, branches in the torch backend).
MODE_CODE = {"off": 0, "stability": 1, "bound": 2, "mass": 3}

# Tokens per termination check (one kernel block) when ``block_pages`` is None. The paper's
# stability rule (patience counted in blocks, calibrated at 64 tokens) is checked every 64
# tokens; mass and bound every 128: bound's criterion only eases as pages are read (mass's
# share does too, its pull nearly so), so a coarser check stops about one block later, and the kernel's
# time per block is mostly latency: on real attention at batch 64 (H100, benchmarks/NOTES.md
# v10) 128-token checks took mass's decode kernel from 224 to 146 µs (SmolLM2 layer 25) and
# from 326 to 230 µs (Qwen2.5 layer 12) for +0.4 points of pages read.
DEFAULT_BLOCK_TOKENS = {"off": 64, "stability": 64, "mass": 128, "bound": 128}

# Mode mass never stops while a head's estimated unread share is above this. On real attention
# it never binds (stopping at share 1/4 would need the unread values within 4 eps of o_t), and
# the kernel skips the check's vector work until some head is under it.
MASS_MAX_SHARE = 0.25
# ... and measures the pull |o_t - mean| / |o_t| at every this many-th check of a work item
# (its first included), using the last measurement in between: on the shared captures every
# 4th check read the same pages within 0.3 points at the same p99 error as every check, and
# the measurement (two reductions across the kernel's warps) made the decode kernel ~8% slower
# when run at every check (H200, benchmarks/NOTES.md v19).
MASS_PULL_CHECKS = 4

# eps of each mode that reads one, when TerminationConfig gets eps=None (its default); see
# the module docstring and benchmarks/results/calibration_smollm2_2026-11-26/README.md.
DEFAULT_EPS = {"bound": 0.05, "mass": 0.05}


@dataclass(frozen=True)
class TerminationConfig:
    """Termination criterion and thresholds of ART decode.

    Parameters
    ----------
    mode : {"off", "stability", "bound", "mass"}
        ``off`` reads every selected page; ``stability`` is the ART paper's output-stability
        rule; ``bound`` stops only when a certified error bound (from the key sketch) is
        below ``eps``; ``mass`` (the default: fewest pages under the calibration rule) stops
        when the estimated error of stopping (the unread share of the softmax mass times the
        pull of the unread values) is below ``eps * |o|``.
    tau_mag : float
        Stability: largest relative change of ``|o|`` between consecutive blocks.
    tau_dir : float
        Stability: largest ``1 - cos`` between consecutive block outputs (the paper uses
        ``tau_mag ** 2``).
    patience : int
        Stability: consecutive stable blocks needed to stop (the paper: 2, which lost a pass
        key at 2K tokens on SmolLM2; 4 keeps it).
    eps : float or None
        Bound: the certified error, relative to ``|o|`` or to the value scale. Mass: the
        estimated share of the softmax mass left unread. ``None`` (the default): the mode's
        calibrated default, ``DEFAULT_EPS[mode]``; ``off`` and ``stability`` read no eps and
        resolve it to 0. Resolved at construction: ``dataclasses.replace(config, mode=...)``
        keeps a resolved eps (pass ``eps=None`` to take the new mode's default).
    min_pages : int
        Visit-order positions below this are always read.
    relative_to : {"output", "values"}
        What ``eps`` is relative to in bound mode.
    block_pages : int or None
        Pages per termination check (one kernel tile). ``None``: as many pages as make the
        mode's ``DEFAULT_BLOCK_TOKENS`` (64 tokens for stability, 128 for mass and bound;
        at least one page, and for head_dim 256 at most 64 tokens).
    """

    mode: str = "mass"
    tau_mag: float = 1e-3
    tau_dir: float = 1e-6
    patience: int = 4
    eps: float | None = None
    min_pages: int = 2
    relative_to: str = "output"
    block_pages: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.relative_to not in RELATIVE_TO:
            raise ValueError(f"relative_to must be one of {RELATIVE_TO}, got {self.relative_to!r}")
        if self.eps is None:
            object.__setattr__(self, "eps", DEFAULT_EPS.get(self.mode, 0.0))
        for name in ("tau_mag", "tau_dir", "eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("patience", "min_pages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.block_pages is not None and (
            not isinstance(self.block_pages, int) or not 1 <= self.block_pages <= 1024
        ):
            raise ValueError(f"block_pages must be None or an int in 1..1024, got {self.block_pages!r}")

    @property
    def mode_code(self) -> int:
        return MODE_CODE[self.mode]

    @property
    def reads_page_metadata(self) -> bool:
        """Whether the criterion reads every selected page's metadata (``bound``, ``mass``)."""
        return self.mode in ("bound", "mass")

    @property
    def reads_key_sketch(self) -> bool:
        """Whether the criterion also reads the key sketch of some pages (``bound``): page
        metadata for it must be allocated with the sketch (``PageMetadata.allocate``)."""
        return self.mode == "bound"

    def pages_per_block(self, page_size: int, max_block_tokens: int | None = None) -> int:
        """Pages per block: ``block_pages`` if set, else the mode's ``DEFAULT_BLOCK_TOKENS``
        worth, at most ``max_block_tokens`` (at least one page)."""
        if self.block_pages is not None:
            return self.block_pages
        tokens = DEFAULT_BLOCK_TOKENS[self.mode]
        if max_block_tokens is not None:
            tokens = min(tokens, max_block_tokens)
        return max(1, tokens // page_size)
