"""Paged KV cache helpers in FlashInfer's exact format.

Everything is vectorized torch, except that appends to CUDA caches go through FlashInfer's
kernel when it is installed (the torch path stays callable for comparison).

The cache is either one tensor holding keys and values, or a tuple of two tensors
(``H`` = KV heads, ``D`` = head dim, ``P`` = physical pages, ``S`` = page size):

* NHD: ``[P, 2, S, H, D]``, or ``(k_cache, v_cache)`` each ``[P, S, H, D]``;
* HND: ``[P, 2, H, S, D]``, or ``(k_cache, v_cache)`` each ``[P, H, S, D]``.

Requests address pages through a CSR page table, all int32: ``kv_indptr [B+1]``,
``kv_indices [>= kv_indptr[-1]]`` (physical page ids, in logical page order) and
``kv_last_page_len [B]`` (1..S tokens in each request's last page). Token ``t`` of request
``b`` lives in physical page ``kv_indices[kv_indptr[b] + t // S]``, slot ``t % S``.

Argument errors raise ``ValueError`` naming the argument. Functions used on the decode hot
path (:func:`get_seq_lens`, :func:`get_batch_indices_positions`,
:func:`append_paged_kv_cache`) check only shapes, dtypes and devices, never values, so they
do not synchronize with the device; check the page table's values once with
:func:`validate_page_table` when planning.
"""

import torch

__all__ = [
    "allocate_paged_kv_cache",
    "unpack_paged_kv_cache",
    "cache_geometry",
    "validate_page_table",
    "get_seq_lens",
    "get_batch_indices_positions",
    "append_paged_kv_cache",
    "gather_request_kv",
]

_KV_LAYOUTS = ("NHD", "HND")
_INDEX_DTYPES = (torch.int32, torch.int64)
_FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)
_FLASHINFER_HEAD_DIMS = (64, 128, 256)


def _check_kv_layout(kv_layout):
    if kv_layout not in _KV_LAYOUTS:
        raise ValueError(f"kv_layout must be 'NHD' or 'HND', got {kv_layout!r}")


def _check_positive_int(name, value):
    # bool is an int subclass, but a bool passed as a size is a caller bug.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_vector(name, tensor, dtypes=(torch.int32,)):
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        allowed = " or ".join(str(dtype) for dtype in dtypes)
        raise ValueError(f"{name} must have dtype {allowed}, got {tensor.dtype}")
    if tensor.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")


def _check_device(device, **tensors):
    for name, tensor in tensors.items():
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device}, expected {device}")


def _check_indptr_length(indptr_name, indptr, batch_size, per_request_name):
    if indptr.numel() != batch_size + 1:
        raise ValueError(
            f"{indptr_name} must have len({per_request_name}) + 1 = {batch_size + 1} "
            f"entries, got {indptr.numel()}"
        )


def _as_nhd(cache, kv_layout):
    """View a 4-D page tensor as ``[P, S, H, D]`` (a transposed view for HND, no copy)."""
    return cache.transpose(1, 2) if kv_layout == "HND" else cache


def allocate_paged_kv_cache(
    max_pages,
    page_size,
    num_kv_heads,
    head_dim,
    *,
    dtype=torch.float16,
    device="cpu",
    kv_layout="NHD",
    separate_kv=False,
):
    """Allocate an uninitialized paged KV cache.

    The memory comes from ``torch.empty``: its contents are garbage until written, exactly
    like an engine's KV pool. Attention only reads the first ``seq_len`` slots of each
    request, so nothing has to be zeroed.

    Parameters
    ----------
    max_pages, page_size, num_kv_heads, head_dim : int
        Positive sizes ``P``, ``S``, ``H``, ``D``.
    dtype : torch.dtype, optional
        Element type of keys and values.
    device : str or torch.device, optional
        Where to allocate.
    kv_layout : {"NHD", "HND"}, optional
        Order of the page-slot and head dimensions inside a page.
    separate_kv : bool, optional
        Return a ``(k_cache, v_cache)`` tuple instead of one tensor.

    Returns
    -------
    torch.Tensor or tuple of torch.Tensor
        One tensor ``[P, 2, S, H, D]`` (NHD) / ``[P, 2, H, S, D]`` (HND), or, with
        ``separate_kv``, two tensors each ``[P, S, H, D]`` (NHD) / ``[P, H, S, D]`` (HND).
    """
    for name, value in (
        ("max_pages", max_pages),
        ("page_size", page_size),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
    ):
        _check_positive_int(name, value)
    _check_kv_layout(kv_layout)
    if kv_layout == "NHD":
        page_shape = (page_size, num_kv_heads, head_dim)
    else:
        page_shape = (num_kv_heads, page_size, head_dim)
    if separate_kv:
        return tuple(
            torch.empty((max_pages, *page_shape), dtype=dtype, device=device) for _ in range(2)
        )
    return torch.empty((max_pages, 2, *page_shape), dtype=dtype, device=device)


def unpack_paged_kv_cache(paged_kv_cache, kv_layout="NHD"):
    """Split a paged KV cache into key and value page tensors.

    Parameters
    ----------
    paged_kv_cache : torch.Tensor or tuple of torch.Tensor
        One tensor ``[P, 2, S, H, D]`` (NHD) / ``[P, 2, H, S, D]`` (HND), or a tuple
        ``(k_cache, v_cache)`` of two tensors with the same 4-D shape, dtype and device.
    kv_layout : {"NHD", "HND"}, optional
        Layout of the cache.

    Returns
    -------
    k_cache, v_cache : torch.Tensor
        Views (no copy; writes go to the cache), each ``[P, S, H, D]`` (NHD) or
        ``[P, H, S, D]`` (HND).
    """
    _check_kv_layout(kv_layout)
    if isinstance(paged_kv_cache, torch.Tensor):
        if paged_kv_cache.ndim != 5 or paged_kv_cache.shape[1] != 2:
            raise ValueError(
                "paged_kv_cache as one tensor must be 5-D with size 2 in dim 1 "
                f"([P, 2, S, H, D] or [P, 2, H, S, D]), got shape {tuple(paged_kv_cache.shape)}"
            )
        return paged_kv_cache[:, 0], paged_kv_cache[:, 1]
    if not isinstance(paged_kv_cache, (tuple, list)) or len(paged_kv_cache) != 2:
        raise ValueError(
            "paged_kv_cache must be a 5-D tensor or a (k_cache, v_cache) tuple, "
            f"got {type(paged_kv_cache).__name__}"
        )
    k_cache, v_cache = paged_kv_cache
    if not isinstance(k_cache, torch.Tensor) or not isinstance(v_cache, torch.Tensor):
        raise ValueError("paged_kv_cache tuple members must be torch.Tensor")
    if k_cache.ndim != 4:
        raise ValueError(
            f"paged_kv_cache tuple members must be 4-D, got shape {tuple(k_cache.shape)}"
        )
    if (k_cache.shape, k_cache.dtype, k_cache.device) != (
        v_cache.shape,
        v_cache.dtype,
        v_cache.device,
    ):
        raise ValueError(
            "paged_kv_cache key and value tensors differ: "
            f"{tuple(k_cache.shape)} {k_cache.dtype} {k_cache.device} vs "
            f"{tuple(v_cache.shape)} {v_cache.dtype} {v_cache.device}"
        )
    return k_cache, v_cache


def cache_geometry(paged_kv_cache, kv_layout="NHD"):
    """Sizes of a paged KV cache.

    Parameters
    ----------
    paged_kv_cache : torch.Tensor or tuple of torch.Tensor
        A cache as accepted by :func:`unpack_paged_kv_cache`.
    kv_layout : {"NHD", "HND"}, optional
        Layout of the cache.

    Returns
    -------
    tuple of int
        ``(max_pages, page_size, num_kv_heads, head_dim)``.
    """
    k_cache, _ = unpack_paged_kv_cache(paged_kv_cache, kv_layout)
    max_pages, page_size, num_kv_heads, head_dim = _as_nhd(k_cache, kv_layout).shape
    return max_pages, page_size, num_kv_heads, head_dim


def validate_page_table(kv_indptr, kv_indices, kv_last_page_len, page_size, max_pages=None):
    """Check a CSR page table; reads its values, so it synchronizes with the device.

    Meant for ``plan()``, not for every decode step. Pages shared between requests (prefix
    sharing) are allowed, as in FlashInfer.

    Parameters
    ----------
    kv_indptr : torch.Tensor
        int32 ``[B+1]``: ``kv_indptr[0] == 0``, strictly increasing (every request owns at
        least one page), ``kv_indptr[-1] <= len(kv_indices)``.
    kv_indices : torch.Tensor
        int32 ``[N]``, ``N >= kv_indptr[-1]``: physical page ids. Like FlashInfer, a longer
        buffer is accepted and only its first ``kv_indptr[-1]`` entries are read (and
        checked); they must be in ``[0, max_pages)``.
    kv_last_page_len : torch.Tensor
        int32 ``[B]``, each in ``1..page_size``.
    page_size : int
        Tokens per page.
    max_pages : int, optional
        Pages in the cache; when given, page ids are checked against it.

    Returns
    -------
    int
        The batch size ``B`` (0 is allowed: ``kv_indptr == [0]``).
    """
    _check_vector("kv_indptr", kv_indptr)
    _check_vector("kv_indices", kv_indices)
    _check_vector("kv_last_page_len", kv_last_page_len)
    _check_device(kv_indptr.device, kv_indices=kv_indices, kv_last_page_len=kv_last_page_len)
    _check_positive_int("page_size", page_size)
    if max_pages is not None:
        _check_positive_int("max_pages", max_pages)
    batch_size = kv_last_page_len.numel()
    _check_indptr_length("kv_indptr", kv_indptr, batch_size, "kv_last_page_len")
    if int(kv_indptr[0]) != 0:
        raise ValueError(f"kv_indptr[0] must be 0, got {int(kv_indptr[0])}")
    if batch_size and not bool((kv_indptr[1:] > kv_indptr[:-1]).all()):
        raise ValueError("kv_indptr must be strictly increasing (every request needs a page)")
    num_pages = int(kv_indptr[-1])
    if num_pages > kv_indices.numel():
        raise ValueError(
            f"kv_indptr[-1] = {num_pages} exceeds len(kv_indices) = {kv_indices.numel()}"
        )
    if num_pages:
        lowest, highest = (int(x) for x in torch.aminmax(kv_indices[:num_pages]))
        if lowest < 0 or (max_pages is not None and highest >= max_pages):
            raise ValueError(
                f"kv_indices out of range: page ids span [{lowest}, {highest}], "
                f"allowed [0, {max_pages if max_pages is not None else 'inf'})"
            )
    if batch_size:
        lowest, highest = (int(x) for x in torch.aminmax(kv_last_page_len))
        if lowest < 1 or highest > page_size:
            raise ValueError(
                f"kv_last_page_len must be in 1..{page_size}, got values in [{lowest}, {highest}]"
            )
    return batch_size


def get_seq_lens(kv_indptr, kv_last_page_len, page_size):
    """Sequence lengths from a page table, like ``flashinfer.page.get_seq_lens``.

    Parameters
    ----------
    kv_indptr : torch.Tensor
        int32 ``[B+1]``.
    kv_last_page_len : torch.Tensor
        int32 ``[B]``.
    page_size : int
        Tokens per page.

    Returns
    -------
    torch.Tensor
        int32 ``[B]``: ``(pages - 1) * page_size + kv_last_page_len`` (pages clamped to at
        least 1, as FlashInfer does), on the input device.
    """
    _check_vector("kv_indptr", kv_indptr)
    _check_vector("kv_last_page_len", kv_last_page_len)
    _check_device(kv_indptr.device, kv_last_page_len=kv_last_page_len)
    _check_positive_int("page_size", page_size)
    _check_indptr_length("kv_indptr", kv_indptr, kv_last_page_len.numel(), "kv_last_page_len")
    full_pages = torch.clamp(kv_indptr[1:] - kv_indptr[:-1] - 1, min=0)
    return (full_pages * page_size + kv_last_page_len).to(torch.int32)


def get_batch_indices_positions(append_indptr, seq_lens, nnz):
    """Request index and absolute position of every appended token.

    Same semantics as ``flashinfer.page.get_batch_indices_positions``; runs on the input
    device without a host synchronization.

    Parameters
    ----------
    append_indptr : torch.Tensor
        int32 or int64 ``[B+1]``: request ``b`` appends tokens
        ``append_indptr[b] .. append_indptr[b+1]-1`` of the ragged append batch (a request
        may append none).
    seq_lens : torch.Tensor
        int32 or int64 ``[B]``: request lengths *after* the append, so request ``b``'s
        ``n_b`` new tokens take positions ``seq_lens[b] - n_b .. seq_lens[b] - 1``.
    nnz : int
        Number of appended tokens; must equal ``append_indptr[-1]`` (not checked, that would
        synchronize).

    Returns
    -------
    batch_indices : torch.Tensor
        int32 ``[nnz]``: request of each appended token.
    positions : torch.Tensor
        int32 ``[nnz]``: position of each appended token in its request.
    """
    _check_vector("append_indptr", append_indptr, _INDEX_DTYPES)
    _check_vector("seq_lens", seq_lens, _INDEX_DTYPES)
    _check_device(append_indptr.device, seq_lens=seq_lens)
    _check_indptr_length("append_indptr", append_indptr, seq_lens.numel(), "seq_lens")
    if isinstance(nnz, bool) or not isinstance(nnz, int) or nnz < 0:
        raise ValueError(f"nnz must be a non-negative int, got {nnz!r}")
    token_ids = torch.arange(nnz, dtype=torch.int64, device=append_indptr.device)
    ends = append_indptr[1:].to(torch.int64)
    # Token i belongs to the request whose end is the first one past i; empty requests
    # (equal consecutive ends) are skipped because right=True counts every end <= i.
    batch_indices = torch.searchsorted(ends, token_ids, right=True)
    positions = token_ids + seq_lens.to(torch.int64)[batch_indices] - ends[batch_indices]
    return batch_indices.to(torch.int32), positions.to(torch.int32)


def _flashinfer_page(k_cache):
    """``flashinfer.page`` when its append kernel can write this cache, else None.

    The kernel exists only for CUDA, fp16/bf16 caches and head dims 64/128/256; other caches
    (CPU, fp32 references, toy head dims) take the torch path.
    """
    if not k_cache.is_cuda or k_cache.dtype not in _FLASHINFER_DTYPES:
        return None
    if k_cache.shape[-1] not in _FLASHINFER_HEAD_DIMS:
        return None
    try:
        # Imported lazily: it imports on CPU-only machines too, but every op fails there.
        import flashinfer.page
    except ImportError:
        return None
    return flashinfer.page


def _append_paged_kv_cache_torch(
    append_key,
    append_value,
    batch_indices,
    positions,
    paged_kv_cache,
    kv_indices,
    kv_indptr,
    kv_layout="NHD",
):
    """Torch implementation of :func:`append_paged_kv_cache` (arguments unchecked)."""
    k_cache, v_cache = (
        _as_nhd(cache, kv_layout) for cache in unpack_paged_kv_cache(paged_kv_cache, kv_layout)
    )
    page_size = k_cache.shape[1]
    batch_indices = batch_indices.long()
    positions = positions.long()
    logical_pages = kv_indptr.long()[batch_indices] + positions // page_size
    page_ids = kv_indices.long()[logical_pages]
    slots = positions % page_size
    # index_put_ on the (possibly transposed) views writes straight into the cache.
    k_cache.index_put_((page_ids, slots), append_key)
    v_cache.index_put_((page_ids, slots), append_value)


def append_paged_kv_cache(
    append_key,
    append_value,
    batch_indices,
    positions,
    paged_kv_cache,
    kv_indices,
    kv_indptr,
    kv_last_page_len,
    kv_layout="NHD",
    page_meta=None,
):
    """Write appended keys and values into their pages, in place.

    Same semantics as ``flashinfer.page.append_paged_kv_cache``: token ``i`` goes to physical
    page ``kv_indices[kv_indptr[batch_indices[i]] + positions[i] // page_size]``, slot
    ``positions[i] % page_size``. The page table must already include the appended tokens.
    On CUDA fp16/bf16 caches with head dim 64/128/256, FlashInfer's kernel is used when
    ``flashinfer`` imports; otherwise a vectorized torch scatter. Only shapes, dtypes and
    devices are checked (no device synchronization); the table's values are trusted, see
    :func:`validate_page_table`.

    Parameters
    ----------
    append_key, append_value : torch.Tensor
        ``[nnz, H, D]``, the cache's dtype and device. Keys already rotated (RoPE applied).
    batch_indices, positions : torch.Tensor
        int32 or int64 ``[nnz]``, e.g. from :func:`get_batch_indices_positions`.
    paged_kv_cache : torch.Tensor or tuple of torch.Tensor
        A cache as accepted by :func:`unpack_paged_kv_cache`; modified in place.
    kv_indices : torch.Tensor
        int32 ``[N]``: physical page ids.
    kv_indptr : torch.Tensor
        int32 ``[B+1]``.
    kv_last_page_len : torch.Tensor
        int32 ``[B]``; only FlashInfer's kernel takes it, the torch path does not need it.
    kv_layout : {"NHD", "HND"}, optional
        Layout of the cache.
    page_meta : object, optional
        Page metadata (``art_runtime.PageMetadata``) kept current: after the write its
        ``update(append_key, append_value, batch_indices, positions, kv_indices, kv_indptr)``
        is called.
    """
    k_cache, v_cache = unpack_paged_kv_cache(paged_kv_cache, kv_layout)
    _, _, num_kv_heads, head_dim = cache_geometry(paged_kv_cache, kv_layout)
    for name, tensor in (("append_key", append_key), ("append_value", append_value)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.ndim != 3 or tuple(tensor.shape[1:]) != (num_kv_heads, head_dim):
            raise ValueError(
                f"{name} must have shape [nnz, {num_kv_heads}, {head_dim}], "
                f"got {tuple(tensor.shape)}"
            )
        if tensor.dtype != k_cache.dtype:
            raise ValueError(
                f"{name} dtype {tensor.dtype} differs from the cache dtype {k_cache.dtype}"
            )
    nnz = append_key.shape[0]
    if append_value.shape[0] != nnz:
        raise ValueError(f"append_value has {append_value.shape[0]} tokens, append_key {nnz}")
    for name, tensor in (("batch_indices", batch_indices), ("positions", positions)):
        _check_vector(name, tensor, _INDEX_DTYPES)
        if tensor.numel() != nnz:
            raise ValueError(f"{name} must have nnz = {nnz} entries, got {tensor.numel()}")
    _check_vector("kv_indices", kv_indices)
    _check_vector("kv_indptr", kv_indptr)
    _check_vector("kv_last_page_len", kv_last_page_len)
    _check_indptr_length("kv_indptr", kv_indptr, kv_last_page_len.numel(), "kv_last_page_len")
    _check_device(
        k_cache.device,
        append_key=append_key,
        append_value=append_value,
        batch_indices=batch_indices,
        positions=positions,
        kv_indices=kv_indices,
        kv_indptr=kv_indptr,
        kv_last_page_len=kv_last_page_len,
    )

    flashinfer_page = _flashinfer_page(k_cache)
    if flashinfer_page is not None:
        flashinfer_page.append_paged_kv_cache(
            append_key,
            append_value,
            batch_indices,
            positions,
            (k_cache, v_cache),
            kv_indices,
            kv_indptr,
            kv_last_page_len,
            kv_layout=kv_layout,
        )
    else:
        _append_paged_kv_cache_torch(
            append_key,
            append_value,
            batch_indices,
            positions,
            paged_kv_cache,
            kv_indices,
            kv_indptr,
            kv_layout,
        )
    if page_meta is not None:
        page_meta.update(append_key, append_value, batch_indices, positions, kv_indices, kv_indptr)


def gather_request_kv(
    paged_kv_cache, kv_indptr, kv_indices, kv_last_page_len, request, kv_layout="NHD"
):
    """Copy one request's keys and values out of the cache, in position order.

    For references and tests: validates the page table (synchronizing with the device).

    Parameters
    ----------
    paged_kv_cache : torch.Tensor or tuple of torch.Tensor
        A cache as accepted by :func:`unpack_paged_kv_cache`.
    kv_indptr : torch.Tensor
        int32 ``[B+1]``.
    kv_indices : torch.Tensor
        int32 ``[N]``: physical page ids.
    kv_last_page_len : torch.Tensor
        int32 ``[B]``.
    request : int
        Request index in ``0..B-1``.
    kv_layout : {"NHD", "HND"}, optional
        Layout of the cache.

    Returns
    -------
    keys, values : torch.Tensor
        Each ``[seq_len, H, D]``, new tensors (not views of the cache).
    """
    max_pages, page_size, num_kv_heads, head_dim = cache_geometry(paged_kv_cache, kv_layout)
    batch_size = validate_page_table(kv_indptr, kv_indices, kv_last_page_len, page_size, max_pages)
    if isinstance(request, bool) or not isinstance(request, int) or not 0 <= request < batch_size:
        raise ValueError(f"request must be an int in [0, {batch_size}), got {request!r}")
    first, end = int(kv_indptr[request]), int(kv_indptr[request + 1])
    seq_len = (end - first - 1) * page_size + int(kv_last_page_len[request])
    page_ids = kv_indices[first:end].long()
    return tuple(
        _as_nhd(cache, kv_layout)[page_ids].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        for cache in unpack_paged_kv_cache(paged_kv_cache, kv_layout)
    )
