"""Live stream of ART termination statistics over ZMQ (PUB/SUB).

A decode loop hands each layer's :class:`~art_runtime.decode.DecodeStats` to a
:class:`StatsPublisher`; dashboards and loggers read them with a :class:`StatsSubscriber`.

Message schema ``art-runtime.stats/1``
--------------------------------------
Every message is two ZMQ frames: the topic (``b"art-runtime.stats/1"`` by default, so a
subscriber can filter on the schema name) and a UTF-8 JSON object with these keys:

=================  ==========================  =============================================
key                type                        meaning
=================  ==========================  =============================================
``schema``         str                         ``"art-runtime.stats/1"``; the number after the
                                               slash changes when a field changes meaning or
                                               is removed (new keys may appear within ``/1``;
                                               readers must ignore keys they don't know)
``step``           int                         decode step (the caller's counter)
``layer``          int                         layer index
``request_ids``    list[str | int]             ``B`` ids, row order of the batch
``visited_pages``  list[list[int]]             ``[B][H_kv]`` pages read per (request, KV head)
``selected_pages`` list[list[int]]             ``[B][H_kv]`` pages in the selection
``visited_tokens`` list[list[int]]             ``[B][H_kv]`` tokens read
``stable_at``      list[list[int]]             ``[B][H_qo]`` visit-order block at which each
                                               query head first met the criterion (-1: never)
``kv_bytes_read``  int                         K/V (+ page metadata) bytes this layer read
``dense_kv_bytes`` int or null                 bytes a dense read of every token would take
                                               (null: the publisher did not know;
                                               see :func:`dense_kv_bytes`)
``time``           float                       ``time.time()`` when the step was published
=================  ==========================  =============================================

Termination depth of a (request, KV head) is ``visited_pages / selected_pages``
(:meth:`StepStats.depth`); pages saved is ``selected_pages - visited_pages``; bytes saved is
``dense_kv_bytes - kv_bytes_read``.

Never blocking the decode loop
------------------------------
* :meth:`StatsPublisher.publish_decode_stats` does **no host synchronization**: for CUDA
  tensors it enqueues ``non_blocking`` device-to-host copies into freshly allocated pinned
  buffers on the caller's current stream and records a CUDA event; for CPU tensors it clones
  them (they are tiny). It then puts a :class:`PendingStepStats` (references only) on a
  bounded ``queue.Queue`` with ``put_nowait``. The sender thread waits on the event and
  calls ``.tolist()``: the one place a sync happens, and it is off the hot path. Do not call
  it inside CUDA-graph capture (publish after the replay).
* Queue full (sender behind): the message is dropped and ``dropped`` / ``dropped_queue``
  count it.
* Slow subscriber: the socket is an XPUB with ``XPUB_NODROP`` and a small ``SNDHWM``, and the
  sender sends with ``NOBLOCK``; when a subscriber's pipe is at its high-water mark ZMQ
  answers ``EAGAIN`` and the message is dropped (for every subscriber) and counted in
  ``dropped`` / ``dropped_hwm``. It never waits. Nobody subscribed: ZMQ discards the message
  at once; it counts as ``sent`` (``sent`` means "handed to ZMQ", not "received").

Reconnects are ZMQ's own: a subscriber connects before or after the publisher binds and
reconnects (every ``reconnect_ivl_ms``) after either side restarts; PUB/SUB has no replay,
so messages published while nobody was connected are gone (the "slow joiner").

Servers bind to loopback only unless ``allow_remote=True``.
"""

from __future__ import annotations

import ipaddress
import json
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

SCHEMA = "art-runtime.stats/1"
SCHEMA_NAME, _, _SCHEMA_VERSION = SCHEMA.partition("/")
TOPIC = SCHEMA.encode()
DEFAULT_ADDRESS = "tcp://127.0.0.1:5557"
_LOCAL_TRANSPORTS = ("ipc://", "inproc://")


def _zmq():
    try:
        import zmq
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("art_runtime.stats needs pyzmq: pip install 'pyzmq>=25'") from exc
    return zmq


def _to_list(value) -> list:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _to_int(value) -> int:
    return int(value.item()) if hasattr(value, "item") else int(value)


def dense_kv_bytes(seq_lens, num_kv_heads: int, head_dim: int, element_size: int) -> int:
    """K and V bytes a dense read of every token of every request takes (no page metadata)."""
    return int(sum(int(n) for n in _to_list(seq_lens))) * num_kv_heads * 2 * head_dim * element_size


@dataclass
class StepStats:
    """One (step, layer) message of schema ``art-runtime.stats/1``: host-side plain lists."""

    step: int
    layer: int
    request_ids: list
    visited_pages: list[list[int]]
    selected_pages: list[list[int]]
    visited_tokens: list[list[int]]
    stable_at: list[list[int]]
    kv_bytes_read: int
    dense_kv_bytes: int | None = None
    time: float = field(default_factory=time.time)
    schema: str = SCHEMA

    @classmethod
    def from_decode_stats(cls, stats, step: int, layer: int, request_ids=None, *,
                          dense_kv_bytes: int | None = None, time: float | None = None) -> "StepStats":
        """Copy a :class:`~art_runtime.decode.DecodeStats` to host lists.

        This synchronizes with the device when the tensors are on a GPU: call it from the
        publisher's sender thread (``publish_decode_stats`` does), not from the decode loop.
        ``request_ids`` default to ``0..B-1``.
        """
        visited = _to_list(stats.visited_pages)
        if request_ids is None:
            request_ids = list(range(len(visited)))
        return cls(
            step=int(step), layer=int(layer), request_ids=list(request_ids),
            visited_pages=visited, selected_pages=_to_list(stats.selected_pages),
            visited_tokens=_to_list(stats.visited_tokens), stable_at=_to_list(stats.stable_at),
            kv_bytes_read=_to_int(stats.kv_bytes_read),
            dense_kv_bytes=None if dense_kv_bytes is None else int(dense_kv_bytes),
            time=_now() if time is None else float(time),
        )

    def depth(self) -> list[list[float]]:
        """``[B][H_kv]`` termination depth ``visited / selected`` (1.0 for an empty selection)."""
        return [[v / s if s else 1.0 for v, s in zip(vr, sr)]
                for vr, sr in zip(self.visited_pages, self.selected_pages)]

    @property
    def pages_saved(self) -> int:
        return sum(s - v for vr, sr in zip(self.visited_pages, self.selected_pages) for v, s in zip(vr, sr))

    @property
    def bytes_saved(self) -> int | None:
        return None if self.dense_kv_bytes is None else self.dense_kv_bytes - self.kv_bytes_read

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: dict) -> "StepStats":
        """Parse a message; ``ValueError`` for another schema name or major version."""
        schema = data.get("schema")
        if not isinstance(schema, str) or schema.partition("/")[0] != SCHEMA_NAME \
                or schema.partition("/")[2] != _SCHEMA_VERSION:
            raise ValueError(f"schema: expected {SCHEMA!r}, got {schema!r}")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}  # ignore unknown keys
        missing = set(cls.__dataclass_fields__) - set(known) - {"dense_kv_bytes", "time", "schema"}
        if missing:
            raise ValueError(f"message is missing {sorted(missing)}")
        return cls(**known)

    @classmethod
    def from_json(cls, payload: bytes | str) -> "StepStats":
        return cls.from_dict(json.loads(payload))


def _now() -> float:
    return time.time()


class PendingStepStats:
    """A ``DecodeStats`` snapshot still (maybe) in flight from the device; made without a sync.

    CUDA tensors: ``non_blocking`` copies into pinned host buffers on the current stream plus
    an event; CPU tensors: clones. :meth:`resolve` waits for the event and builds the
    :class:`StepStats` (run it on the sender thread).
    """

    __slots__ = ("_tensors", "_event", "step", "layer", "request_ids", "dense_kv_bytes", "time")

    def __init__(self, stats, step: int, layer: int, request_ids=None, dense_kv_bytes: int | None = None):
        import torch

        names = ("visited_pages", "selected_pages", "visited_tokens", "stable_at", "kv_bytes_read")
        tensors, event = {}, None
        for name in names:
            t = getattr(stats, name)
            if t.is_cuda:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                t = host
                if event is None:
                    event = torch.cuda.Event()
            else:
                t = t.detach().clone()
            tensors[name] = t
        if event is not None:
            event.record()  # after every copy: they are all on the current stream
        self._tensors, self._event = tensors, event
        self.step, self.layer = int(step), int(layer)
        self.request_ids = None if request_ids is None else list(request_ids)
        self.dense_kv_bytes = dense_kv_bytes
        self.time = _now()

    def resolve(self) -> StepStats:
        if self._event is not None:
            self._event.synchronize()
        return StepStats.from_decode_stats(
            _Namespace(self._tensors), self.step, self.layer, self.request_ids,
            dense_kv_bytes=self.dense_kv_bytes, time=self.time)


class _Namespace:
    def __init__(self, d):
        self.__dict__.update(d)


def check_loopback(address: str, allow_remote: bool = False) -> str:
    """``address`` unchanged if it is local (ipc, inproc, tcp on a loopback IP), else ValueError."""
    if not isinstance(address, str):
        raise ValueError(f"address must be a str, got {address!r}")
    if allow_remote or address.startswith(_LOCAL_TRANSPORTS):
        return address
    if not address.startswith("tcp://"):
        raise ValueError(f"address {address!r}: only tcp://127.0.0.1, ipc:// or inproc:// unless allow_remote=True")
    rest = address[len("tcp://"):]
    if ";" in rest:  # tcp://source;destination (connect syntax): judge the endpoint we bind
        rest = rest.rsplit(";", 1)[1]
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    host = host.strip("[]")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"address {address!r} is not loopback; pass allow_remote=True to bind {host!r}")
    return address


class StatsPublisher:
    """Publishes :class:`StepStats` on a ZMQ socket from a background thread; never blocks.

    Parameters
    ----------
    address : str
        Endpoint to bind: ``tcp://127.0.0.1:PORT`` (``PORT`` may be ``*`` for a free one; the
        bound endpoint is ``self.address``), ``ipc://PATH`` or ``inproc://NAME``.
    queue_size : int
        Messages waiting for the sender thread; beyond it ``publish`` drops and counts.
    sndhwm : int
        ZMQ high-water mark per subscriber; beyond it the sender drops and counts.
    allow_remote : bool
        Allow binding a non-loopback tcp address (or another transport).
    topic : bytes
        First frame of every message.
    context : zmq.Context, optional
        Default: the process-wide ``zmq.Context.instance()`` (needed for ``inproc://``).

    Counters (ints, read any time): ``published`` (accepted by ``publish``), ``sent`` (handed to
    ZMQ), ``dropped`` (``dropped_queue`` + ``dropped_hwm``), ``errors`` (messages the sender
    could not build or serialize; the last exception is ``last_error``).
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, queue_size: int = 1024, *, sndhwm: int = 1000,
                 allow_remote: bool = False, topic: bytes = TOPIC, context=None, linger_ms: int = 200):
        zmq = _zmq()
        check_loopback(address, allow_remote)
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be a positive int, got {queue_size!r}")
        self._zmq = zmq
        self.topic = bytes(topic)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._ctx = context or zmq.Context.instance()
        sock = self._ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, int(sndhwm))
        sock.setsockopt(zmq.XPUB_NODROP, 1)  # at HWM: EAGAIN (counted) instead of a silent drop
        sock.setsockopt(zmq.LINGER, int(linger_ms))
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise ValueError(f"address {address!r}: cannot bind ({exc})") from exc
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock
        self.published = self.sent = self.dropped_queue = self.dropped_hwm = self.errors = 0
        self.last_error: BaseException | None = None
        self._stop = threading.Event()
        self._resume = threading.Event()
        self._resume.set()
        self._paused_ack = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="art-stats-publisher", daemon=True)
        self._thread.start()  # the socket belongs to the thread from here on

    @property
    def dropped(self) -> int:
        return self.dropped_queue + self.dropped_hwm

    # -- hot path -------------------------------------------------------------------------
    def publish(self, msg: StepStats | PendingStepStats) -> bool:
        """Enqueue ``msg`` (no copy, no sync, no wait); ``False`` if it was dropped."""
        if self._closed:  # never raise into a decode loop: count it as a drop
            self.dropped_queue += 1
            return False
        try:
            self._queue.put_nowait(msg)
        except queue.Full:
            self.dropped_queue += 1
            return False
        self.published += 1
        return True

    def publish_decode_stats(self, stats, step: int, layer: int, request_ids=None, *,
                             dense_kv_bytes: int | None = None) -> bool:
        """Snapshot ``stats`` without a host sync (see :class:`PendingStepStats`) and publish it."""
        if self._queue.full():  # don't even start the copies
            self.dropped_queue += 1
            return False
        return self.publish(PendingStepStats(stats, step, layer, request_ids, dense_kv_bytes))

    # -- sender thread --------------------------------------------------------------------
    def _run(self) -> None:
        zmq = self._zmq
        try:
            while True:
                if not self._resume.is_set():
                    self._paused_ack.set()
                    self._resume.wait()
                    self._paused_ack.clear()
                    continue
                if self._stop.is_set() and (self._queue.empty() or time.monotonic() > self._flush_deadline):
                    break
                self._drain_subscriptions()
                try:
                    msg = self._queue.get(timeout=0.02)
                except queue.Empty:
                    continue
                try:
                    if isinstance(msg, PendingStepStats):
                        msg = msg.resolve()
                    payload = msg.to_json() if isinstance(msg, StepStats) else json.dumps(msg).encode()
                except Exception as exc:  # a bad message must not kill the stream
                    self.errors += 1
                    self.last_error = exc
                    continue
                try:
                    self._sock.send_multipart([self.topic, payload], flags=zmq.NOBLOCK)
                    self.sent += 1
                except zmq.Again:
                    self.dropped_hwm += 1
        finally:
            self._sock.close()

    def _drain_subscriptions(self) -> None:
        # XPUB delivers (un)subscription frames upstream; read them so they don't pile up.
        zmq = self._zmq
        try:
            while True:
                self._sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            pass

    @contextmanager
    def _pause_sender(self, timeout_s: float = 2.0):
        """Test hook: hold the sender thread idle (queue untouched) inside the ``with``."""
        self._resume.clear()
        if not self._paused_ack.wait(timeout_s):
            self._resume.set()
            raise TimeoutError("sender thread did not pause")
        try:
            yield self
        finally:
            self._resume.set()

    # -- lifetime -------------------------------------------------------------------------
    def close(self, flush_s: float = 1.0) -> None:
        """Send what is queued for up to ``flush_s`` seconds, then stop the thread and close."""
        if self._closed:
            return
        self._closed = True
        self._flush_deadline = time.monotonic() + flush_s
        self._stop.set()
        self._resume.set()
        self._thread.join(flush_s + 2.0)

    def __enter__(self) -> "StatsPublisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"StatsPublisher({self.address!r}, published={self.published}, sent={self.sent}, "
                f"dropped={self.dropped})")


class StatsSubscriber:
    """Receives :class:`StepStats` from a :class:`StatsPublisher`; reconnects on its own.

    Parameters
    ----------
    address : str
        The publisher's endpoint (``publisher.address``).
    topic : bytes
        Subscription prefix; ``b""`` receives every topic.
    rcvhwm : int
        Messages buffered here before ZMQ drops (on the publisher's side: ``dropped_hwm``).
    reconnect_ivl_ms : int
        How often ZMQ retries a lost or not-yet-bound publisher.

    Messages of another schema are skipped and counted in ``rejected``; ``received`` counts
    the good ones.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, topic: bytes = b"", *, rcvhwm: int = 1000,
                 reconnect_ivl_ms: int = 100, context=None):
        zmq = _zmq()
        self._zmq = zmq
        self.address = address
        self._ctx = context or zmq.Context.instance()
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, int(rcvhwm))
        sock.setsockopt(zmq.RECONNECT_IVL, int(reconnect_ivl_ms))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(int(reconnect_ivl_ms), 1000))
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, bytes(topic))
        sock.connect(address)
        self._sock = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self.received = self.rejected = 0
        self.closed = False

    def recv(self, timeout_s: float | None = None) -> StepStats | None:
        """The next message, or ``None`` after ``timeout_s`` (``None``: wait forever)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._poller.poll(None if wait is None else int(wait * 1000)):
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            frames = self._sock.recv_multipart(self._zmq.NOBLOCK)
            try:
                msg = StepStats.from_json(frames[-1])
            except (ValueError, TypeError):
                self.rejected += 1
                continue
            self.received += 1
            return msg

    def iter(self, timeout_s: float | None = None) -> Iterator[StepStats]:
        """Yield messages until one does not arrive within ``timeout_s`` (``None``: forever)."""
        while True:
            msg = self.recv(timeout_s)
            if msg is None:
                return
            yield msg

    __iter__ = iter

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close(0)

    def __enter__(self) -> "StatsSubscriber":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["SCHEMA", "TOPIC", "DEFAULT_ADDRESS", "StepStats", "PendingStepStats", "StatsPublisher",
           "StatsSubscriber", "check_loopback", "dense_kv_bytes"]
