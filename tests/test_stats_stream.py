"""art_runtime.stats: the stats stream's schema, publisher and subscriber (loopback/ipc only).

Every wait is bounded; ports are chosen by ZMQ (``tcp://127.0.0.1:*``), ipc paths live in tmp_path.
"""

from __future__ import annotations

import time

import pytest

zmq = pytest.importorskip("zmq")

from art_runtime import BatchARTDecodeWrapper, TerminationConfig  # noqa: E402
from art_runtime.stats import (  # noqa: E402
    SCHEMA, StatsPublisher, StatsSubscriber, StepStats, check_loopback, dense_kv_bytes,
)
from attention_cases import make_case  # noqa: E402

ANY_PORT = "tcp://127.0.0.1:*"
WAIT_S = 5.0  # upper bound of every wait; normally milliseconds


def message(step: int, layer: int = 0, batch: int = 2, heads: int = 2) -> StepStats:
    return StepStats(step=step, layer=layer, request_ids=[f"r{i}" for i in range(batch)],
                     visited_pages=[[1] * heads] * batch, selected_pages=[[3] * heads] * batch,
                     visited_tokens=[[16] * heads] * batch, stable_at=[[0] * (2 * heads)] * batch,
                     kv_bytes_read=1024, dense_kv_bytes=4096)


def join(pub: StatsPublisher, sub: StatsSubscriber) -> None:
    """Beat the PUB/SUB slow joiner: publish warm-ups (step -1) until the subscriber gets one."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        pub.publish(message(-1))
        if sub.recv(0.05) is not None:
            return
    pytest.fail("subscriber never received a warm-up message")


def receive_steps(sub: StatsSubscriber, count: int) -> list[int]:
    """Steps of the next ``count`` non-warm-up messages (bounded wait)."""
    steps, deadline = [], time.monotonic() + WAIT_S
    while len(steps) < count and time.monotonic() < deadline:
        msg = sub.recv(0.1)
        if msg is not None and msg.step >= 0:
            steps.append(msg.step)
    return steps


def test_messages_arrive_in_order():
    with StatsPublisher(ANY_PORT) as pub, StatsSubscriber(pub.address) as sub:
        join(pub, sub)
        for step in range(200):
            assert pub.publish(message(step, layer=step % 4))
        assert receive_steps(sub, 200) == list(range(200))
    assert pub.dropped == 0 and pub.sent == pub.published


def test_full_queue_drops_and_counts_without_blocking():
    with StatsPublisher(ANY_PORT, queue_size=4) as pub:
        with pub._pause_sender():
            times, accepted = [], []
            for step in range(20):
                start = time.perf_counter()
                accepted.append(pub.publish(message(step)))
                times.append(time.perf_counter() - start)
            assert accepted == [True] * 4 + [False] * 16
            assert (pub.published, pub.dropped, pub.dropped_queue) == (4, 16, 16)
            assert max(times) < 0.010, times
        pub.close()
        assert pub.sent == 4  # the queued ones went out once the sender resumed


def test_slow_subscriber_causes_counted_drops_never_blocks(tmp_path):
    address = f"ipc://{tmp_path}/slow.ipc"
    with StatsPublisher(address, queue_size=64, sndhwm=1) as pub, \
            StatsSubscriber(address, rcvhwm=1) as sub:
        join(pub, sub)  # connected; from now on the subscriber never reads
        big = message(0, batch=2000)  # ~60 KB of JSON: fills socket buffers in a few sends
        times, deadline = [], time.monotonic() + WAIT_S
        while pub.dropped_hwm == 0 and time.monotonic() < deadline:
            start = time.perf_counter()
            pub.publish(big)
            times.append(time.perf_counter() - start)
            time.sleep(0.001)
        assert pub.dropped_hwm > 0, (pub.published, pub.sent)
        assert max(times) < 0.010, max(times)
        start = time.perf_counter()
        pub.close(flush_s=0.2)
        assert time.perf_counter() - start < 2.0


def wait_sent(pub: StatsPublisher) -> None:
    """Until the sender thread has handed everything queued to ZMQ (bounded)."""
    deadline = time.monotonic() + WAIT_S
    while pub.sent + pub.dropped_hwm + pub.errors < pub.published and time.monotonic() < deadline:
        time.sleep(0.005)
    assert pub.sent + pub.dropped_hwm + pub.errors == pub.published


def test_restarted_subscriber_reconnects():
    with StatsPublisher(ANY_PORT) as pub:
        with StatsSubscriber(pub.address) as first:
            join(pub, first)
            pub.publish(message(0))
            assert receive_steps(first, 1) == [0]
        for step in range(1, 5):  # nobody listens: gone, and nothing blocks
            pub.publish(message(step))
        wait_sent(pub)  # (else the queue could still hold them when the next subscriber joins)
        with StatsSubscriber(pub.address) as second:
            join(pub, second)
            for step in range(5, 15):
                pub.publish(message(step))
            assert receive_steps(second, 10) == list(range(5, 15))


def bind_again(address: str) -> StatsPublisher:
    deadline = time.monotonic() + WAIT_S
    while True:  # the old listener closes asynchronously in ZMQ's I/O thread
        try:
            return StatsPublisher(address)
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_restarted_publisher_subscriber_reconnects():
    pub = StatsPublisher(ANY_PORT)
    address = pub.address
    with StatsSubscriber(address, reconnect_ivl_ms=50) as sub:
        join(pub, sub)
        pub.publish(message(0))
        assert receive_steps(sub, 1) == [0]
        pub.close()
        with bind_again(address) as pub2:
            join(pub2, sub)  # the same subscriber socket: ZMQ reconnected it
            for step in range(1, 11):
                pub2.publish(message(step))
            assert receive_steps(sub, 10) == list(range(1, 11))


@pytest.mark.parametrize("address", [
    "tcp://0.0.0.0:5557", "tcp://*:5557", "tcp://10.1.2.3:5557", "tcp://eth0:5557", "tcp://[::]:5557",
    "tcp://example.com:5557", "udp://127.0.0.1:5557", "ws://127.0.0.1:5557",
])
def test_non_loopback_address_is_rejected(address):
    with pytest.raises(ValueError, match="address"):
        StatsPublisher(address)
    assert check_loopback(address, allow_remote=True) == address  # checked only, never bound here


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:5557", "tcp://[::1]:5557", "tcp://localhost:5557",
                                     "ipc:///tmp/x.ipc", "inproc://stats"])
def test_loopback_addresses_are_accepted(address):
    assert check_loopback(address) == address


def test_schema_round_trip_from_real_decode_stats():
    seq_lens, hqo, hkv, dim, page = [40, 17, 70], 8, 2, 64, 16
    case = make_case(seq_lens, hqo, hkv, dim, page, seed=1)
    wrapper = BatchARTDecodeWrapper(backend="torch")
    wrapper.plan(case.kv_indptr, case.kv_indices, case.kv_last_page_len, hqo, hkv, dim, page,
                 termination=TerminationConfig(mode="stability", min_pages=1, block_pages=1))
    wrapper.run(case.q, case.cache)
    stats = wrapper.last_stats
    dense = dense_kv_bytes(seq_lens, hkv, dim, case.q.element_size())
    ids = ["req-a", "req-b", 7]

    msg = StepStats.from_decode_stats(stats, step=3, layer=5, request_ids=ids, dense_kv_bytes=dense)
    assert msg.schema == SCHEMA == "art-runtime.stats/1"
    assert (msg.step, msg.layer, msg.request_ids, msg.dense_kv_bytes) == (3, 5, ids, dense)
    assert msg.visited_pages == stats.visited_pages.tolist()
    assert msg.selected_pages == stats.selected_pages.tolist() == [[3, 3], [2, 2], [5, 5]]
    assert msg.visited_tokens == stats.visited_tokens.tolist()
    assert msg.stable_at == stats.stable_at.tolist()
    assert len(msg.stable_at) == 3 and all(len(row) == hqo for row in msg.stable_at)
    assert msg.kv_bytes_read == int(stats.kv_bytes_read) <= dense
    assert msg.bytes_saved == dense - msg.kv_bytes_read
    assert all(0 < d <= 1 for row in msg.depth() for d in row)
    assert StepStats.from_json(msg.to_json()) == msg

    # Through the stream: publish_decode_stats snapshots without a sync, the sender resolves.
    with StatsPublisher(ANY_PORT) as pub, StatsSubscriber(pub.address) as sub:
        join(pub, sub)
        assert pub.publish_decode_stats(stats, step=3, layer=5, request_ids=ids, dense_kv_bytes=dense)
        deadline, got = time.monotonic() + WAIT_S, None
        while got is None and time.monotonic() < deadline:
            got = sub.recv(0.1)
            if got is not None and got.step < 0:
                got = None
        assert got is not None
        assert abs(got.time - time.time()) < 60
        got.time = msg.time
        assert got == msg

    # Dense reads read exactly the dense bytes.
    wrapper.plan(case.kv_indptr, case.kv_indices, case.kv_last_page_len, hqo, hkv, dim, page,
                 termination=TerminationConfig(mode="off"))
    wrapper.run(case.q, case.cache)
    off = StepStats.from_decode_stats(wrapper.last_stats, 0, 0, dense_kv_bytes=dense)
    assert off.kv_bytes_read == dense and off.bytes_saved == 0 and off.request_ids == [0, 1, 2]
    assert off.visited_pages == off.selected_pages and off.pages_saved == 0


def test_other_schema_is_rejected_and_unknown_keys_ignored():
    data = message(1).to_dict()
    assert StepStats.from_dict({**data, "future_field": [1, 2]}) == message(1).__class__(**data)
    with pytest.raises(ValueError, match="schema"):
        StepStats.from_dict({**data, "schema": "art-runtime.stats/2"})
    missing = dict(data)
    del missing["visited_pages"]
    with pytest.raises(ValueError, match="visited_pages"):
        StepStats.from_dict(missing)


def test_publish_after_close_does_not_raise():
    pub = StatsPublisher(ANY_PORT)
    pub.close()
    assert pub.publish(message(0)) is False and pub.dropped == 1
