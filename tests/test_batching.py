"""collect_batch on a plain queue.Queue: size, deadline, key grouping, order, no starvation."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from zdepth.engine.batching import collect_batch

pytestmark = pytest.mark.timeout(10)


def filled(*items):
    q = queue.Queue()
    for item in items:
        q.put(item)
    return q


def first_letter(item: str) -> str:
    return item[0]


def test_takes_up_to_max_batch_in_order():
    q = filled(*range(10))
    assert collect_batch(q, max_batch=4, max_wait_s=1.0) == [0, 1, 2, 3]
    assert collect_batch(q, max_batch=4, max_wait_s=1.0) == [4, 5, 6, 7]
    assert q.qsize() == 2


def test_full_batch_returns_without_waiting():
    q = filled(1, 2)
    start = time.monotonic()
    assert collect_batch(q, max_batch=2, max_wait_s=5.0) == [1, 2]
    assert time.monotonic() - start < 0.5


def test_partial_batch_waits_at_most_max_wait():
    q = filled("a")
    start = time.monotonic()
    assert collect_batch(q, max_batch=8, max_wait_s=0.1) == ["a"]
    assert 0.09 <= time.monotonic() - start < 1.0


def test_zero_wait_takes_only_what_is_queued():
    q = filled(1, 2, 3)
    assert collect_batch(q, max_batch=8, max_wait_s=0.0) == [1, 2, 3]


def test_items_arriving_within_the_wait_join_the_batch():
    q = filled("x")
    timer = threading.Timer(0.05, q.put, args=("y",))
    timer.start()
    try:
        assert collect_batch(q, max_batch=2, max_wait_s=2.0) == ["x", "y"]
    finally:
        timer.cancel()


def test_items_after_the_deadline_wait_for_the_next_batch():
    q = filled("x")
    timer = threading.Timer(0.4, q.put, args=("late",))
    timer.start()
    try:
        start = time.monotonic()
        assert collect_batch(q, max_batch=8, max_wait_s=0.05) == ["x"]
        assert time.monotonic() - start < 0.3
        assert collect_batch(q, max_batch=8, max_wait_s=0.0, timeout_s=2.0) == ["late"]
    finally:
        timer.cancel()


def test_items_already_queued_are_taken_even_past_the_deadline():
    """A slow consumer loses no batching: what is queued costs no waiting."""
    now = [0.0]

    def clock():
        now[0] += 10.0  # every reading is far past any deadline
        return now[0]

    assert collect_batch(filled(1, 2, 3), max_batch=8, max_wait_s=0.5, clock=clock) == [1, 2, 3]


def test_blocks_for_the_first_item():
    q = queue.Queue()
    threading.Timer(0.1, q.put, args=(7,)).start()
    start = time.monotonic()
    assert collect_batch(q, max_batch=4, max_wait_s=0.0) == [7]
    assert time.monotonic() - start >= 0.09


def test_timeout_on_an_empty_queue_returns_empty():
    start = time.monotonic()
    assert collect_batch(queue.Queue(), max_batch=4, max_wait_s=0.0, timeout_s=0.05) == []
    assert time.monotonic() - start < 1.0


def test_groups_by_key_and_keeps_others_pending_in_order():
    q = filled("a1", "b1", "a2", "c1", "b2", "a3")
    pending: list[str] = []
    batch = collect_batch(q, max_batch=8, max_wait_s=0.01, key=first_letter, pending=pending)
    assert batch == ["a1", "a2", "a3"]
    assert pending == ["b1", "c1", "b2"]
    assert collect_batch(q, max_batch=8, max_wait_s=0.01, key=first_letter, pending=pending) == ["b1", "b2"]
    assert pending == ["c1"]
    assert collect_batch(q, max_batch=8, max_wait_s=0.01, key=first_letter, pending=pending) == ["c1"]
    assert pending == []


def test_pending_items_come_before_newer_queue_items():
    q = filled("a2", "a3")
    pending = ["b1", "a1", "b2"]
    assert collect_batch(q, max_batch=8, max_wait_s=0.01, key=first_letter, pending=pending) == ["b1", "b2"]
    # a1 arrived before a2 and a3 and is still first of its key.
    assert collect_batch(q, max_batch=8, max_wait_s=0.01, key=first_letter, pending=pending) == ["a1", "a2", "a3"]


def test_max_batch_applies_to_pending_too():
    pending = ["a1", "a2", "b1", "a3"]
    q = filled("a4")
    assert collect_batch(q, max_batch=2, max_wait_s=0.01, key=first_letter, pending=pending) == ["a1", "a2"]
    assert pending == ["b1", "a3"]
    assert q.qsize() == 1  # a full batch from pending never touches the queue


def test_a_busy_key_does_not_starve_another():
    """While 'a' items keep arriving, the one 'b' item is served as soon as it is the oldest."""
    q = filled("a", "b", *["a"] * 20)
    pending: list[str] = []
    served = []
    for _ in range(4):
        served.append(collect_batch(q, max_batch=4, max_wait_s=0.0, key=first_letter, pending=pending))
        for _ in range(4):
            q.put("a")  # a steady stream of the busy key
    assert served[0] == ["a"] * 4
    assert served[1] == ["b"]


def test_every_item_is_returned_exactly_once():
    items = [f"{k}{i}" for i in range(30) for k in "abc"]
    q = filled(*items)
    pending: list[str] = []
    out = []
    while len(out) < len(items):
        batch = collect_batch(q, max_batch=4, max_wait_s=0.0, key=first_letter, pending=pending, timeout_s=0.1)
        assert batch and len(batch) <= 4 and len({first_letter(x) for x in batch}) == 1
        out.extend(batch)
    assert sorted(out) == sorted(items)
    for k in "abc":
        assert [x for x in out if x[0] == k] == [x for x in items if x[0] == k]  # per-key arrival order


def test_rejects_a_bad_max_batch():
    with pytest.raises(ValueError, match="max_batch"):
        collect_batch(filled(1), max_batch=0, max_wait_s=0.0)
