"""The broker's promises, proved on its sans-IO core by a hypothesis state machine with a fake clock.

Clients send good and bad requests (right and wrong keys); workers join,
reply, reply late, reply twice, freeze, die, drain and come back; time
advances; the broker may stop. After every step the invariants of PROTOCOL.md
are checked from the outside (what the fake network carried), not from the
core's own bookkeeping. tests/test_broker.py and tests/test_broker_faults.py
prove the same rules over real sockets.
"""

from __future__ import annotations

import collections
import os

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from zdepth.broker.core import CLIENT, IN_FLIGHT_GRACE_S, MAX_DISPATCHES, BrokerCore
from zdepth.config import BrokerConfig, Heartbeat
from zdepth.protocol import VERSION, command, request_header

KEY = "k3y"
CONFIG = BrokerConfig(
    key=KEY,
    heartbeat=Heartbeat(interval_s=1.0, liveness=3),
    max_queue=8,
    max_queue_bytes=400,
    max_client_bytes=150,
    default_timeout_s=6.0,
    drain_timeout_s=2.0,
    reconnect_grace_s=4.0,
)
MODELS = ("vits", "vits-hypersim")
CLIENTS = (b"c0", b"c1", b"c2")
SLOTS = ("w0", "w1", "w2")
STEP_S = 0.25  # time advances in steps this long, heartbeats and ticks at each


class FakeWorker:
    def __init__(self, identity: bytes, models: tuple[str, ...], capacity: int, keyed: bool) -> None:
        self.identity = identity
        self.models = models
        self.capacity = capacity
        self.keyed = keyed
        self.alive = True  # False: its process is gone, sends to it fail
        self.frozen = False  # True: suspended, messages queue up unread and it says nothing
        self.held: dict[int, dict] = {}  # rid -> REQUEST header
        self.answered: list[dict] = []  # headers already replied to, for duplicate replies
        self.told_unknown = False
        self.last_said = 0.0  # when it last sent anything
        self.missed = 0  # requests held past their deadline plus grace, in a row, since its last reply
        self.overdue: set[int] = set()  # rids already counted in missed


class BrokerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.core = BrokerCore(CONFIG, self.now)
        self.workers: dict[str, FakeWorker] = {}
        self.incarnation = 0
        self.sends: collections.Counter[tuple[bytes, str | None]] = collections.Counter()
        self.replies: collections.Counter[tuple[bytes, str | None]] = collections.Counter()
        self.deadline: dict[tuple[bytes, str], float] = {}  # the latest deadline per id
        self.delivered: collections.Counter[tuple[bytes, str]] = collections.Counter()  # REQUESTs that reached a worker
        self.deliveries: dict[tuple[bytes, str], list[tuple[FakeWorker, float]]] = collections.defaultdict(list)
        self.codes: dict[tuple[bytes, str], list[str]] = collections.defaultdict(list)
        self.keyless_ids: set[str] = set()
        self.next_id = 0
        self.stopped = False

    # ------------------------------------------------------------------ the fake network

    def deliver(self, out) -> None:
        """Carry the core's messages as the socket loop does, reporting sends to vanished workers."""
        out = list(out)
        i = 0
        while i < len(out):
            message = out[i]
            i += 1
            if message.to == CLIENT:
                header = msgpack.unpackb(message.frames[0], raw=False)
                key = (message.identity, header.get("id"))
                self.replies[key] += 1
                self.codes[key].append(header["status"])
                if header["status"] == "worker_lost":
                    # Lost for real only with workers that said something after they got it (else the send may
                    # never have arrived), twice; or after MAX_DISPATCHES sends in all.
                    confirmed = sum(1 for w, at in self.deliveries[key] if w.last_said > at + CONFIG.heartbeat.interval_s / 2)
                    assert confirmed >= 2 or self.delivered[key] >= MAX_DISPATCHES, (
                        f"{key} failed worker_lost after {confirmed} confirmed of {self.delivered[key]} deliveries"
                    )
                continue
            worker = self._by_identity(message.identity)
            if worker is None or not worker.alive:
                unsent = [m.rid for m in out[i - 1:] if m.to != CLIENT and m.identity == message.identity and m.rid is not None]
                rest = [m for m in out[i:] if not (m.to != CLIENT and m.identity == message.identity)]
                out, i = rest + self.core.worker_unreachable(message.identity, unsent, self.now), 0
                continue
            header = msgpack.unpackb(message.frames[0], raw=False)
            if header["cmd"] == "request":
                assert worker.keyed, "a worker without the key got a request"
                assert self.now - worker.last_said <= CONFIG.heartbeat.recent_s, "work went to a worker not heard from recently"
                assert worker.missed < 2, "work went to a worker that keeps holding requests past their deadlines"
                assert header["id"] not in self.keyless_ids, "a request without the key reached a worker"
                assert header["model"] in worker.models
                client = self._client_of(header["id"])
                self.delivered[(client, header["id"])] += 1
                self.deliveries[(client, header["id"])].append((worker, self.now))
                worker.held[header["rid"]] = {**header, "client": client, "due": self.now + header["timeout_ms"] / 1000 + IN_FLIGHT_GRACE_S}
            elif header["cmd"] == "disconnect" and header["reason"] == "unknown_worker":
                worker.told_unknown = True

    def _by_identity(self, identity: bytes) -> FakeWorker | None:
        return next((w for w in self.workers.values() if w.identity == identity), None)

    def _client_of(self, request_id: str) -> bytes:
        return CLIENTS[int(request_id.split("-")[0])]

    def from_worker(self, worker: FakeWorker, frames) -> None:
        worker.last_said = self.now
        self.deliver(self.core.worker_message(worker.identity, frames, self.now, peer="test"))

    # ------------------------------------------------------------------ clients

    @rule(
        client=st.integers(0, len(CLIENTS) - 1),
        model=st.sampled_from(MODELS * 4 + ("vitl", None)),
        timeout=st.sampled_from([None, 0.5, 2.0, 5.0]),
        size=st.integers(1, 120),
        mistake=st.sampled_from([None] * 24 + ["key", "body", "op", "model_id", "unreadable", "health", "duplicate"]),
    )
    def client_sends(self, client, model, timeout, size, mistake):
        identity = CLIENTS[client]
        request_id = f"{client}-{self.next_id}"
        self.next_id += 1
        op = "metric_depth" if model and "-" in model else "relative_depth"
        key = KEY
        body = [b"p", b"x" * size]
        if mistake == "duplicate":
            pending = [rid for (c, rid), n in self.sends.items() if c == identity and rid and self.replies[(c, rid)] < n]
            if pending:
                request_id = pending[0]
        elif mistake == "key":
            key = "wrong"
            self.keyless_ids.add(request_id)
        elif mistake == "body":
            body = body[:1]
        elif mistake == "op":
            op = "explode"
        elif mistake == "model_id":
            model = "Vits--x"
        elif mistake == "health":
            op, body = "health", []
        head = request_header(id=request_id, key=key, op=op, model=model, timeout_ms=None if timeout is None else 1000 * timeout)
        if mistake == "unreadable":
            head, request_id = b"\xc1not msgpack", None
        self.sends[(identity, request_id)] += 1
        if request_id is not None:
            deadline = self.now + (timeout or CONFIG.default_timeout_s)
            self.deadline[(identity, request_id)] = max(deadline, self.deadline.get((identity, request_id), deadline))
        self.deliver(self.core.client_message(identity, [head, *body], self.now, peer="test"))

    # ------------------------------------------------------------------ workers

    @initialize(capacities=st.lists(st.integers(1, 2), min_size=1, max_size=2))
    def workers_start(self, capacities):
        for slot, capacity in zip(SLOTS, capacities):
            self.worker_joins(slot, MODELS, capacity, True)

    @rule(
        slot=st.sampled_from(SLOTS),
        models=st.sampled_from([MODELS[:1], MODELS[1:], MODELS]),
        capacity=st.integers(1, 3),
        keyed=st.sampled_from([True] * 5 + [False]),
    )
    def worker_joins(self, slot, models, capacity, keyed):
        """A worker process starts (or restarts) in this slot, with a new connection identity."""
        old = self.workers.get(slot)
        if old is not None and old.alive:
            old.alive = False  # the old process is replaced
        self.incarnation += 1
        worker = self.workers[slot] = FakeWorker(f"{slot}#{self.incarnation}".encode(), models, capacity, keyed or not CONFIG.key)
        self.from_worker(worker, [command("ready", key=KEY if keyed else "nope", models=list(models), capacity=capacity, info={"name": slot})])

    def _pick(self, slot, *, frozen=False):
        worker = self.workers.get(slot)
        return worker if worker is not None and worker.alive and worker.frozen == frozen else None

    @rule(slot=st.sampled_from(SLOTS), pick=st.integers(0, 5), ok=st.booleans())
    def worker_replies(self, slot, pick, ok):
        worker = self._pick(slot)
        if worker is None or not worker.held:
            return
        rid = sorted(worker.held)[pick % len(worker.held)]
        header = worker.held.pop(rid)
        worker.answered.append(header)
        worker.missed = 0
        status = "ok" if ok else "bad_request"
        reply = msgpack.packb({"v": VERSION, "id": header["id"], "status": status}, use_bin_type=True)
        self.from_worker(worker, [command("reply", rid=rid, status=status), reply, b"depth"])

    @rule(slot=st.sampled_from(SLOTS))
    def worker_replies_twice(self, slot):
        worker = self._pick(slot)
        if worker is None or not worker.answered:
            return
        header = worker.answered[-1]
        worker.missed = 0
        reply = msgpack.packb({"v": VERSION, "id": header["id"], "status": "ok"}, use_bin_type=True)
        self.from_worker(worker, [command("reply", rid=header["rid"], status="ok"), reply, b"depth"])

    @rule(slot=st.sampled_from(SLOTS))
    def worker_freezes_or_thaws(self, slot):
        worker = self.workers.get(slot)
        if worker is not None and worker.alive:
            worker.frozen = not worker.frozen

    @rule(slots=st.lists(st.sampled_from(SLOTS), min_size=1, max_size=3, unique=True))
    def workers_die(self, slots):
        """Processes killed together (a host with several GPUs goes down)."""
        for slot in slots:
            worker = self.workers.get(slot)
            if worker is not None:
                worker.alive = False
                worker.held.clear()

    @rule(slot=st.sampled_from(SLOTS))
    def worker_drains(self, slot):
        worker = self._pick(slot)
        if worker is not None:
            self.from_worker(worker, [command("disconnect", reason="draining")])

    @rule(slot=st.sampled_from(SLOTS))
    def worker_reannounces_when_asked(self, slot):
        worker = self._pick(slot)
        if worker is not None and worker.told_unknown:
            worker.told_unknown = False
            worker.held.clear()
            worker.missed = 0
            key = KEY if worker.keyed else "nope"
            self.from_worker(worker, [command("ready", key=key, models=list(worker.models), capacity=worker.capacity, info={})])

    # ------------------------------------------------------------------ time and shutdown

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0]))
    def time_passes(self, seconds):
        for _ in range(round(seconds / STEP_S)):
            self.now += STEP_S
            for worker in self.workers.values():
                if worker.alive and not worker.frozen:
                    self.from_worker(worker, [command("heartbeat")])
            for worker in self.workers.values():
                for rid, held in worker.held.items():
                    if held["due"] <= self.now and rid not in worker.overdue:
                        worker.overdue.add(rid)
                        worker.missed += 1
            self.deliver(self.core.tick(self.now))

    @precondition(lambda self: not self.stopped)
    @rule()
    def broker_stops(self):
        self.stopped = True
        self.deliver(self.core.stop(self.now))

    # ------------------------------------------------------------------ invariants

    @invariant()
    def at_most_one_reply_each(self):
        for key, n in self.replies.items():
            assert n <= self.sends[key], f"{key}: {n} replies to {self.sends[key]} sends ({self.codes[key]})"

    @invariant()
    def every_request_answered_by_its_deadline_plus_grace(self):
        for key, deadline in self.deadline.items():
            if self.now > deadline + IN_FLIGHT_GRACE_S + STEP_S:
                assert self.replies[key] == self.sends[key], f"{key} unanswered {self.now - deadline:.2f} s past its deadline"
        assert self.replies[(CLIENTS[0], None)] + self.replies[(CLIENTS[1], None)] + self.replies[(CLIENTS[2], None)] == sum(
            n for (c, rid), n in self.sends.items() if rid is None
        )
        if self.core.finished:
            assert self.replies == self.sends

    @invariant()
    def nothing_waits_while_a_live_worker_has_room(self):
        core = self.core
        for model, queue in core.held.queues.items():
            if not queue:
                continue
            for w in core.workers.values():
                has_room = len(w.in_flight) < w.capacity
                recent = self.now - w.heard <= CONFIG.heartbeat.recent_s
                assert not (model in w.models and has_room and recent and not w.draining and not w.unhealthy), (
                    f"{len(queue)} requests for {model} wait while worker {w.name} has room"
                )

    @invariant()
    def requeued_at_most_once_and_only_for_a_real_loss(self):
        for key, n in self.delivered.items():
            assert n <= MAX_DISPATCHES, f"{key} reached workers {n} times"

    @invariant()
    def what_is_held_stays_bounded(self):
        held = self.core.held
        assert held.queued + len(held.dispatched) <= CONFIG.max_queue
        assert held.total_bytes <= CONFIG.max_queue_bytes + 122  # one request is always admitted into an empty broker
        for client, size in held.client_bytes.items():
            assert size <= max(CONFIG.max_client_bytes, 122)
        assert held.total_bytes == sum(held.client_bytes.values())
        assert held.queued == sum(len(q) for q in held.queues.values())


TestBrokerCore = BrokerMachine.TestCase
TestBrokerCore.settings = settings(
    max_examples=int(os.environ.get("ZDEPTH_STATEFUL_EXAMPLES", "1000")),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
