"""Per-page summaries of the paged KV cache: key boxes, key sketches and value norms.

For every physical page and KV head: the per-dimension minimum and maximum of the page's keys
(Quest's metadata), an 8-bit sketch of every token's key, and the largest value-vector norm.
Quest scoring and the ``mass`` estimate read the boxes, the certified ``bound`` reads the
sketch; none of them reads K/V. They are kept current on append (a Triton kernel on the GPU,
scatter reductions on the CPU), from the appended tokens alone.

Key boxes are stored in fp8 (e4m3) with one power-of-two scale per (page, KV head), rounded
*outward* (the minimum down, the maximum up), so a box still contains every key of its page
and every bound computed from it stays a bound. Why fp8: scoring reads every page's box each
step, and in 16-bit a box is 2 x D values against 2 x page_size x D for the page's K and V,
6.25% of a dense decode's bytes at page size 16; in fp8 it is 3.1% (Quest's target is 5% of
dense decode time). The scale puts the page's largest |key| in [128, 256) of e4m3's range,
so every box value keeps e4m3's 4 significant bits (at most 1/8 looser than exact) and small
dimensions reach down to 2^-16 of the largest. Scales only grow as tokens arrive, and the
grids of larger power-of-two scales are subsets of smaller ones, so folding tokens in one at
a time gives exactly the box a one-shot build gives.

Key sketch (``build_key_sketch``): per (page, head, dim) a grid of 256 cells of a power-of-two
step ``s`` from the base ``b = floor(box_min / s) s`` (the box minimum rounded down onto the
grid), and per token the 8-bit index of the cell holding its key, so every key lies in
``[b + c s, b + (c + 1) s]``: the certified per-token intervals the bound needs (logit upper
and lower bounds, ``art_runtime.termination``). Only the step's exponent is stored per
dimension; the base comes from the key box, which the bound's pre-pass reads anyway. All of it
is exact in fp32 (integers times powers of two; the quantization corrects its own division),
the cells contain the keys as the cache stores them, and because coarser power-of-two grids
are subsets of finer ones and the box only grows, folding tokens in as they arrive gives the
sketch of a one-shot build. Why 8 bits (``benchmarks/sketch_design.py`` on the shared
captures, ``benchmarks/results/bound_sketch_2026-11-26/README.md``): a token's logit bound
overshoots by 7-8 nats (median) at 2 bits, 3.1-3.3 at 3, 1.4-1.6 at 4, 0.7 at 5, 0.34 at 6
and 0.09 at 8; in bytes read (sketch included) at eps 0.05 on Qwen2.5 8 bits beat 4 (81-89%
against 92-93% before the cut, ``art_runtime.termination``), and 6 bits, slightly better
still, would need a packing across bytes. A free affine step would overshoot a third less
but cannot be refined on append without re-reading the page's keys. Why the box's base
(``benchmarks/results/box_grid_2026-11-27``): an int16 base per dimension was 2 of the 3 grid
bytes, and the box minimum rounded down onto the grid costs the bound at most 0.2 points of
pages on the shared captures. Bytes per (page, head): ``page_size * D`` of codes plus ``D`` of
step exponents, 1088 at page size 16 and D 64 (27% of the page's fp16 K+V), read, with the
box minimum and scale again for the base, only for the pages after the bound's cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backend import triton_runs_on
from .paged_cache import cache_geometry, unpack_paged_kv_cache, validate_page_table
from .plan import next_power_of_two

KEY_BOX_DTYPE = torch.float8_e4m3fn
# A page's largest |key| lands in [2^BOX_TOP_EXPONENT, 2^(BOX_TOP_EXPONENT + 1)) after scaling:
# rounding up reaches at most 256, inside e4m3's finite range (448).
BOX_TOP_EXPONENT = 7
_E4M3_MIN_EXPONENT = -6  # smallest normal exponent; below it the grid step stays 2^-9
_E4M3_MANTISSA_BITS = 3
SKETCH_BITS = 8
SKETCH_LEVELS = 2**SKETCH_BITS
SKETCH_FLOOR_SHIFT = -6  # smallest sketch cell: key_scale * 2^-6 = 2^-13 of the page's top power of two


def key_box_scale(max_abs: torch.Tensor) -> torch.Tensor:
    """The power-of-two scale of a box whose largest |key| is ``max_abs`` (0 for empty pages)."""
    exponent = torch.frexp(max_abs.float()).exponent - 1  # floor(log2 max_abs) for max_abs > 0
    scale = torch.ldexp(torch.ones_like(max_abs, dtype=torch.float32), (exponent - BOX_TOP_EXPONENT).clamp(min=-126))
    return torch.where(max_abs > 0, scale, 0.0)


def quantize_key_box(lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor):
    """Round a box outward onto the fp8 grid of ``scale`` (``[...]``; ``lo``, ``hi``: ``[..., D]``).

    Every step is exact in fp32 (power-of-two scales and grid steps), so this equals the
    Triton kernel's rounding bit for bit. Returns ``(lo8, hi8)`` in ``KEY_BOX_DTYPE``.
    """
    inv = torch.where(scale > 0, 1.0 / scale, 0.0)[..., None]

    def grid_step(x):  # e4m3's spacing at x: 2^(floor(log2|x|) - 3), at least 2^-9
        exponent = (torch.frexp(x).exponent - 1).clamp(min=_E4M3_MIN_EXPONENT)
        return torch.ldexp(torch.ones_like(x), exponent - _E4M3_MANTISSA_BITS)

    x_lo, x_hi = lo.float() * inv, hi.float() * inv
    step_lo, step_hi = grid_step(x_lo), grid_step(x_hi)
    return ((torch.floor(x_lo / step_lo) * step_lo).to(KEY_BOX_DTYPE),
            (torch.ceil(x_hi / step_hi) * step_hi).to(KEY_BOX_DTYPE))


# --------------------------------------------------------------------------------------------
# Key sketch: every token's key as an 8-bit cell of a per-(page, head, dim) power-of-two grid


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent.to(torch.int32))


def _floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2 x) for x > 0 (float32), exactly."""
    return torch.frexp(x).exponent - 1


def sketch_step_floor(key_scale: torch.Tensor) -> torch.Tensor:
    """The smallest sketch cell of a (page, head) whose box scale is ``key_scale``: 2^-13 of the
    power of two below the page's largest |key| (``key_scale * 2^-6``), at least 2^-126."""
    return torch.clamp(key_scale * 2.0**SKETCH_FLOOR_SHIFT, min=2.0**-126)


def sketch_base(box_min: torch.Tensor, key_scale: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """The grid base of (page, head, dim)s in cells, ``floor(box minimum / step)``, exactly.

    ``box_min`` ``[..., D]`` float32 is the stored fp8 box minimum (in units of ``key_scale``
    ``[...]``, a power of two), ``exponent`` ``[..., D]`` the step's (``2^exponent``); the
    quotient is the box value times a power of two, so it never rounds.
    """
    return torch.floor(box_min * _power_of_two(_floor_log2(key_scale)[..., None] - exponent.to(torch.int32)))


def sketch_cells(points: torch.Tensor, base: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``floor((points - base) / step)``, exactly, as int32 (``base``/``step`` broadcast).

    ``base`` is a multiple of the power of two ``step``, so ``base + c * step`` is exact in
    fp32; the division may round, and one correction step each way makes the result exact.
    """
    codes = torch.floor((points - base) * (1.0 / step))
    codes = torch.where(base + codes * step > points, codes - 1, codes)
    codes = torch.where(base + (codes + 1) * step <= points, codes + 1, codes)
    return codes.to(torch.int32)


def build_key_sketch(points, is_key, valid, box_min, key_scale, old_step):
    """The grid steps and the cells of one or more (page, head)s, from keys and already-coded cells.

    Parameters
    ----------
    points : torch.Tensor
        ``[n, P, H, D]`` float32: a key (``is_key``) or the lower end of a token's old cell
        (whose upper end is ``points + old_step``); anything where not ``valid``.
    is_key, valid : torch.Tensor
        ``[n, P]`` bool.
    box_min : torch.Tensor
        ``[n, H, D]`` float32: the pages' stored key box minimum (``key_min``, in units of the scale).
    key_scale : torch.Tensor
        ``[n, H]`` float32: the box scale.
    old_step : torch.Tensor
        ``[n, H, D]`` float32: the grid the old cells are on (anything where none is old).

    Returns
    -------
    tuple
        ``(codes [n, P, H, D] uint8, exponent [n, H, D] int8)``: the step is ``2^exponent``,
        the base ``sketch_base(box_min, key_scale, exponent)`` cells; token ``t``'s key lies
        in ``[(base + code) * step, (base + code + 1) * step]``.

    The grid is the smallest power-of-two step ``s >= sketch_step_floor(key_scale)`` (and
    ``>= old_step``) whose base ``b = floor(box_min / s) * s`` puts every key strictly below
    ``b + 256 s``. The base is the box's, so only the step is stored. The condition is
    monotone in ``s`` and (the box only grows) in the tokens, and on a grid of step
    ``s >= old_step`` an old cell's lower end decides it exactly as the key inside it would
    (both grids are multiples of ``old_step``), so folding tokens in at any time gives the
    grid and cells of a one-shot build: the sketch depends on the page's keys only, never on
    how they were appended.
    """
    valid4 = valid[:, :, None, None]
    key4 = (valid & is_key)[:, :, None, None]
    old4 = (valid & ~is_key)[:, :, None, None]
    top_key = torch.where(key4, points, float("-inf")).amax(1)  # keys must lie below b + 256 s
    top_cell = torch.where(old4, points + old_step[:, None], float("-inf")).amax(1)  # cells must fit
    has_old = old4.any(1)
    least = torch.maximum(sketch_step_floor(key_scale)[..., None].expand_as(box_min),
                          torch.where(has_old, old_step, 0.0))
    top = torch.maximum(top_key, top_cell)
    span = torch.where(torch.isfinite(top), top - box_min * key_scale[..., None], 0.0).clamp(min=0.0)
    # A power of two >= span / (levels - 1) always fits (b > low - s); the smallest fitting one is >= wide / 4.
    wide = torch.maximum(_power_of_two(_floor_log2(torch.clamp(span * (1.0 / (SKETCH_LEVELS - 1)), min=2.0**-126)) + 1),
                         least)
    step = wide * 2  # fits even if the division rounded down
    for shrink in (1.0, 0.5, 0.25):
        candidate = wide * shrink
        top_of = (sketch_base(box_min, key_scale, _floor_log2(candidate)) + SKETCH_LEVELS) * candidate
        fits = (candidate >= least) & (top_key < top_of) & (top_cell <= top_of)
        step = torch.where(fits, candidate, step)
    exponent = _floor_log2(step)
    base = sketch_base(box_min, key_scale, exponent) * step
    codes = sketch_cells(points, base[:, None], step[:, None])
    codes = torch.where(valid4, codes, 0).clamp(0, SKETCH_LEVELS - 1)
    return codes.to(torch.uint8), exponent.to(torch.int8)


@dataclass
class PageMetadata:
    """Key boxes and value norms of every physical page.

    Attributes
    ----------
    key_min, key_max : torch.Tensor
        ``[max_pages, H_kv, D]`` ``float8_e4m3fn``: the page's per-dimension key minimum and
        maximum divided by ``key_scale``, rounded outward (see the module docstring); views
        of one ``[max_pages, H_kv, 2, D]`` tensor, so a (page, head)'s box is contiguous.
    key_scale : torch.Tensor
        ``[max_pages, H_kv]`` float32 power of two; 0 for a page that holds no token.
    value_norm_max : torch.Tensor
        ``[max_pages, H_kv]`` float32: the largest ``|v|`` of the page's tokens (0: no token).
    key_codes : torch.Tensor or None
        ``[max_pages, H_kv, page_size, D]`` uint8: each token's key sketch, a cell index per
        dimension; ``None`` in metadata allocated without the sketch (``allocate(sketch=False)``).
    key_grid_exponent : torch.Tensor or None
        ``[max_pages, H_kv, D]`` int8: the sketch grid's step ``s = 2^exponent`` of each (page,
        head, dim); its base is the box's, ``b = sketch_base(key_min, key_scale, exponent)``
        cells: a token with code ``c`` has its key in ``[(b + c) s, (b + c + 1) s]``
        (``build_key_sketch``; ``key_cells`` decodes). ``None`` with ``key_codes``.
    page_size : int
        Tokens per page of the cache these pages belong to.

    Only termination mode ``bound`` reads the sketch, and it is most of the metadata's memory
    (``stored_bytes_per_page``: 1088 of 1224 bytes a page and KV head at page size 16 and
    D 64; all of it is 30% on top of the page's fp16 K and V, 3.3% without the sketch), so a
    server that runs another mode allocates none.
    """

    key_min: torch.Tensor
    key_max: torch.Tensor
    key_scale: torch.Tensor
    value_norm_max: torch.Tensor
    key_codes: torch.Tensor | None
    key_grid_exponent: torch.Tensor | None
    page_size: int

    @classmethod
    def allocate(cls, max_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *, device,
                 sketch: bool = True) -> "PageMetadata":
        """Empty metadata for a cache of ``max_pages`` pages of ``page_size`` tokens; the key
        sketch (what termination mode ``bound`` reads) only if ``sketch``."""
        # min and max of a (page, head) side by side: scoring reads 2 * D contiguous bytes.
        boxes = torch.zeros(max_pages, num_kv_heads, 2, head_dim, dtype=KEY_BOX_DTYPE, device=device)
        return cls(
            page_size=page_size,
            key_min=boxes[:, :, 0],
            key_max=boxes[:, :, 1],
            key_scale=torch.zeros(max_pages, num_kv_heads, dtype=torch.float32, device=device),
            value_norm_max=torch.zeros(max_pages, num_kv_heads, dtype=torch.float32, device=device),
            key_codes=torch.zeros(max_pages, num_kv_heads, page_size, head_dim, dtype=torch.uint8, device=device)
            if sketch else None,
            key_grid_exponent=torch.zeros(max_pages, num_kv_heads, head_dim, dtype=torch.int8, device=device)
            if sketch else None,
        )

    @staticmethod
    def stored_bytes_per_page(page_size: int, head_dim: int, sketch: bool = True) -> int:
        """Memory of one (page, KV head)'s summaries, as ``allocate`` lays them out: the fp8 key
        box, its scale and the value norm, plus the sketch's codes and grid steps if ``sketch``."""
        summaries = 2 * head_dim * KEY_BOX_DTYPE.itemsize + 4 + 4
        return summaries + ((page_size + 1) * head_dim if sketch else 0)

    @property
    def has_sketch(self) -> bool:
        """Whether the key sketch is stored (``allocate(sketch=True)``)."""
        return self.key_codes is not None

    def clone(self) -> "PageMetadata":
        """A copy, with the same layout."""
        copy = PageMetadata.allocate(*self.key_scale.shape[:1], self.page_size, *self.key_min.shape[1:],
                                     device=self.key_scale.device, sketch=self.has_sketch)
        copy.copy_pages_from(self)
        return copy

    def copy_pages_from(self, other: "PageMetadata") -> None:
        """Copy ``other``'s summaries into this metadata's first pages (e.g. after growing a pool)."""
        if self.has_sketch and not other.has_sketch:
            raise ValueError("other has no key sketch to copy into this metadata's (allocate it with sketch=True)")
        count = other.key_scale.shape[0]
        names = ("key_min", "key_max", "key_scale", "value_norm_max")
        for name in names + (("key_codes", "key_grid_exponent") if self.has_sketch else ()):
            getattr(self, name)[:count] = getattr(other, name)

    def key_bounds(self, pages: torch.Tensor, heads) -> tuple[torch.Tensor, torch.Tensor]:
        """The boxes of ``(pages, heads)`` (broadcast together) as float32 ``(lo, hi)``, ``[..., D]``."""
        scale = self.key_scale[pages, heads][..., None]
        return self.key_min[pages, heads].float() * scale, self.key_max[pages, heads].float() * scale

    def sketch_grid(self, pages: torch.Tensor, heads) -> tuple[torch.Tensor, torch.Tensor]:
        """The sketch grid ``(base, step)`` of ``(pages, heads)`` (broadcast), float32 ``[..., D]``:
        a key with code ``c`` lies in ``[(base + c) step, (base + c + 1) step]``."""
        exponent = self.key_grid_exponent[pages, heads]
        return (sketch_base(self.key_min[pages, heads].float(), self.key_scale[pages, heads], exponent),
                _power_of_two(exponent))

    def key_cells(self, pages: torch.Tensor, heads) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's sketch cell of ``(pages, heads)`` (broadcast): float32 ``(lo, hi)``,
        ``[..., page_size, D]`` (slots past a page's tokens hold meaningless cells)."""
        base, step = self.sketch_grid(pages, heads)
        lo = (base[..., None, :] + self.key_codes[pages, heads].float()) * step[..., None, :]
        return lo, lo + step[..., None, :]

    def _store_sketch(self, pages, points, is_key, valid, old_step) -> None:
        """Build and store the sketch of ``pages`` (``build_key_sketch``; boxes stored first)."""
        codes, exponent = build_key_sketch(points, is_key, valid, self.key_min[pages].float(), self.key_scale[pages],
                                           old_step)
        self.key_codes[pages] = codes.transpose(1, 2)
        self.key_grid_exponent[pages] = exponent

    @classmethod
    def from_cache(cls, paged_kv_cache, kv_indptr, kv_indices, kv_last_page_len, kv_layout="NHD", *,
                   sketch: bool = True) -> "PageMetadata":
        """Build metadata by reading every page of the page table once (the slow path).

        Parameters
        ----------
        paged_kv_cache : torch.Tensor or tuple of torch.Tensor
            FlashInfer-format cache (see ``art_runtime.paged_cache``).
        kv_indptr : torch.Tensor
            ``[B + 1]`` int32.
        kv_indices : torch.Tensor
            ``[nnz_pages]`` int32 physical page ids.
        kv_last_page_len : torch.Tensor
            ``[B]`` int32, 1..page_size.
        kv_layout : {"NHD", "HND"}
        sketch : bool
            Build the key sketch too (what termination mode ``bound`` reads).
        """
        k_cache, v_cache = unpack_paged_kv_cache(paged_kv_cache, kv_layout)
        max_pages, page_size, num_kv_heads, head_dim = cache_geometry(paged_kv_cache, kv_layout)
        validate_page_table(kv_indptr, kv_indices, kv_last_page_len, page_size, max_pages)
        meta = cls.allocate(max_pages, page_size, num_kv_heads, head_dim, device=k_cache.device, sketch=sketch)
        num_pages = int(kv_indptr[-1])
        listed = kv_indices[:num_pages].long()
        if kv_layout == "HND":
            k_cache, v_cache = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
        # Tokens per listed page: full, except each request's last page. A page listed by
        # several requests (a shared prefix) is summarized over the most tokens any of them
        # reads, so that its box bounds every reader's keys.
        listed_tokens = torch.full((num_pages,), page_size, dtype=torch.long, device=listed.device)
        listed_tokens[kv_indptr[1:].long() - 1] = kv_last_page_len.long()
        pages = torch.unique(listed)
        tokens = torch.zeros(max_pages, dtype=torch.long, device=listed.device)
        tokens = tokens.scatter_reduce(0, listed, listed_tokens, "amax")[pages]
        keys = k_cache[pages].float()  # [n, P, H, D]
        values = v_cache[pages].float()
        valid = (torch.arange(page_size, device=pages.device)[None, :] < tokens[:, None])[:, :, None, None]
        lo = keys.masked_fill(~valid, float("inf")).amin(1)  # [n, H, D]
        hi = keys.masked_fill(~valid, float("-inf")).amax(1)
        meta._store_boxes(pages, lo, hi, key_box_scale(torch.maximum(lo.abs(), hi.abs()).amax(-1)))
        meta.value_norm_max[pages] = values.norm(dim=-1).masked_fill(~valid[..., 0], 0.0).amax(1)
        token_ok = valid[:, :, 0, 0]
        if sketch:
            meta._store_sketch(pages, keys, torch.ones_like(token_ok), token_ok, torch.zeros_like(lo))
        return meta

    def _store_boxes(self, pages, lo, hi, scale) -> None:
        self.key_min[pages], self.key_max[pages] = quantize_key_box(lo, hi, scale)
        self.key_scale[pages] = scale

    def update(self, append_key, append_value, batch_indices, positions, kv_indices, kv_indptr) -> None:
        """Fold freshly appended tokens into the summaries of the pages they went to.

        Parameters
        ----------
        append_key, append_value : torch.Tensor
            ``[nnz, H_kv, D]``, the tokens just written into the cache.
        batch_indices, positions : torch.Tensor
            ``[nnz]`` int32: request of each token (non-decreasing) and its position in it.
        kv_indices, kv_indptr : torch.Tensor
            The page table the tokens were appended through.

        A token in slot 0 starts its page afresh (pages are reused across requests); other
        tokens merge with the page's current summary. No host synchronization.
        """
        nnz = append_key.shape[0]
        if nnz == 0:
            return
        num_requests = kv_indptr.shape[0] - 1
        # First appended token of each request; batch_indices is sorted by construction.
        append_indptr = torch.searchsorted(
            batch_indices.contiguous(),
            torch.arange(num_requests + 1, dtype=batch_indices.dtype, device=batch_indices.device),
        ).to(torch.int32)
        page_size = self.page_size
        if triton_runs_on(append_key.device):
            from .kernels.page_metadata import page_metadata_update_kernel

            # Without a sketch the kernel's sketch arguments are never read (SKETCH is off).
            codes, exponent = (self.key_codes, self.key_grid_exponent) if self.has_sketch else (self.key_scale,) * 2
            page_metadata_update_kernel[(nnz, append_key.shape[1])](
                append_key, append_value, batch_indices, positions, append_indptr,
                kv_indices, kv_indptr, self.key_min, self.key_max, self.key_scale, self.value_norm_max,
                codes, exponent, nnz,
                append_key.stride(0), append_key.stride(1), append_value.stride(0), append_value.stride(1),
                self.key_min.stride(0), self.key_min.stride(1), self.key_scale.stride(0),
                codes.stride(0), codes.stride(1), exponent.stride(0), exponent.stride(1),
                PAGE_SIZE=page_size, PAGE_SIZE_POW2=next_power_of_two(page_size), HEAD_DIM=append_key.shape[2],
                SKETCH=self.has_sketch,
            )
        else:
            self._update_torch(append_key, append_value, batch_indices, positions, kv_indices, kv_indptr, page_size)

    def _update_torch(self, append_key, append_value, batch_indices, positions, kv_indices, kv_indptr, page_size):
        """The CPU path of ``update``: reductions over the touched pages."""
        pages = kv_indices[kv_indptr[batch_indices.long()].long() + positions.long() // page_size].long()
        touched, inverse = torch.unique(pages, return_inverse=True)
        # A page that receives a token in slot 0 starts afresh; the others merge.
        fresh = torch.zeros(touched.numel(), dtype=torch.bool).scatter_reduce(
            0, inverse.cpu(), (positions % page_size == 0).cpu(), "amax").to(pages.device)
        keys = append_key.float()
        heads, dim = keys.shape[1:]
        index = inverse[:, None, None].expand(-1, heads, dim)
        new_lo = torch.full((touched.numel(), heads, dim), float("inf"), device=keys.device).scatter_reduce(
            0, index, keys, "amin")
        new_hi = torch.full_like(new_lo, float("-inf")).scatter_reduce(0, index, keys, "amax")
        old_lo, old_hi = self.key_bounds(touched[:, None], torch.arange(heads, device=keys.device))
        # The old tokens' cells, on the old grid (its base is the old box's: read before the box is replaced).
        old_cells = self.key_cells(touched[:, None], torch.arange(heads, device=keys.device))[0] \
            if self.has_sketch else None  # [n, H, P, D]
        keep = ~fresh[:, None, None]
        lo = torch.where(keep, torch.minimum(old_lo, new_lo), new_lo)
        hi = torch.where(keep, torch.maximum(old_hi, new_hi), new_hi)
        # Scales only grow: the old scale stands for the old keys' largest |key|.
        new_scale = key_box_scale(torch.maximum(new_lo.abs(), new_hi.abs()).amax(-1))
        scale = torch.where(keep[..., 0], torch.maximum(self.key_scale[touched], new_scale), new_scale)
        self._store_boxes(touched, lo, hi, scale)
        norms = torch.zeros(touched.numel(), heads, device=keys.device).scatter_reduce(
            0, inverse[:, None].expand(-1, heads), append_value.float().norm(dim=-1), "amax")
        self.value_norm_max[touched] = torch.where(keep[..., 0], torch.maximum(self.value_norm_max[touched], norms), norms)
        if not self.has_sketch:
            return
        # The sketch: the page's old tokens (slots before its first new one) as their cells, the new as keys.
        slots = (positions % page_size).long()
        first_new = torch.full((touched.numel(),), page_size, dtype=torch.long, device=keys.device).scatter_reduce(
            0, inverse, slots, "amin")
        points = old_cells.transpose(1, 2).clone()
        points[inverse, slots] = keys
        slot_ids = torch.arange(page_size, device=keys.device)[None, :]
        is_old = (slot_ids < first_new[:, None]) & ~fresh[:, None]
        is_new = torch.zeros_like(is_old)
        is_new[inverse, slots] = True
        old_step = _power_of_two(self.key_grid_exponent[touched])
        self._store_sketch(touched, points, is_new, is_old | is_new, old_step)

    def key_box_bytes_per_page(self) -> int:
        """Bytes of key box per (page, KV head) that Quest scoring reads: min, max and scale."""
        return 2 * self.key_min.shape[-1] * self.key_min.element_size() + self.key_scale.element_size()

    def key_sketch_bytes_per_page(self) -> int:
        """Bytes the bound's pre-pass reads per sketched (page, KV head): the codes, the grid
        steps, and the box minimum and scale again for the grid base (0 without a sketch)."""
        if not self.has_sketch:
            return 0
        dim = self.key_grid_exponent.shape[-1]
        return (self.key_codes[0, 0].numel() * self.key_codes.element_size()
                + dim * (self.key_grid_exponent.element_size() + self.key_min.element_size())
                + self.key_scale.element_size())

    def nbytes_per_page(self, mode: str) -> int:
        """Bytes of metadata per (page, KV head) that termination ``mode`` reads for every
        selected page: the key box (``mass``, ``bound``) and the value norm (``bound``);
        ``bound`` reads the key sketch of some pages too (``key_sketch_bytes_per_page``,
        counted by the wrapper). Modes ``off`` and ``stability`` read none."""
        if mode not in ("mass", "bound"):
            return 0
        return self.key_box_bytes_per_page() + (self.value_norm_max.element_size() if mode == "bound" else 0)
