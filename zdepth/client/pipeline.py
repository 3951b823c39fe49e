"""The pipeline: every call in flight on the client's sockets, one per broker, and which broker gets what.

Sans-IO: the drivers (``sync.Client``, ``aio.AsyncClient``) do the socket I/O
and feed the pipeline what happened (replies, monitor events, the time); the
pipeline decides everything else: attempt ids and deadlines, retries within
the time bound, matching replies, failing over between brokers.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any, Sequence

import zmq

from zdepth.client.calls import Call
from zdepth.client.exchanges import Exchange, new_attempt_id
from zdepth.client.links import FIRST_CHOICE_GRACE_S, REFUSED_RETRY_S, UNREACHABLE_AFTER_S, Link
from zdepth.client.replies import MAX_REPLY_HEADER_BYTES, from_broker
from zdepth.errors import BadRequest, BrokerUnreachable, DeadlineExceeded, InternalError, ServiceError, error_from_code
from zdepth.protocol import MAX_TIMEOUT_MS, OP_HEALTH, STATUS_OK, VERSION, request_header, unpack_map
from zdepth.protocol.codec import decode_arrays
from zdepth.protocol.curve import CurveClient

__all__ = ["Pipeline", "SEND_RETRY_S"]

log = logging.getLogger(__name__)

SEND_RETRY_S = 0.01  # a send that would block on an open connection is tried again this soon


class Pipeline:
    """Calls in flight on one socket per broker, in the order they were opened, and the state of each connection.

    Sans-IO. The driver keeps one socket per address, in order. It sends, in
    order, ``message(ex)`` for each exchange in ``unsent()`` on the socket of
    ``route(ex)`` (None: none to send it on yet) and calls ``sent(ex, i)`` for
    each the socket took (one that would block stays, and ``send_blocked``
    says when to try again); it feeds every reply to ``receive`` and every
    monitor event to ``link_event``, each with the index of its socket, and
    calls ``expire`` whenever ``next_deadline`` passes. Order matters: before
    ``expire(now)`` it feeds every reply and event that came in before ``now``,
    and every waiting reply before the waiting events; otherwise a reply that
    came in time, or a drop before the deadline, reads as a timeout, and a
    drop read before the reply that preceded it fails (or resends) a request
    that had its answer. Any of these calls may
    move ``next_deadline`` earlier (a blocked send to try again, a grace
    period), so the driver reads it again after each, whichever task made it.

    The time bound: a request opened at ``t`` is settled by
    ``t + timeout * (retries + 1)``, whatever happens. Each attempt waits at
    most ``timeout`` (less when the bound is nearer) and tells the broker so
    in ``timeout_ms``. Only an attempt that expired, or whose connection
    dropped under it, is resent, and each resend spends a retry. A resend goes
    out with a new id: a late reply to an earlier attempt still counts if it
    is a result, and is dropped if it is an error (the current attempt
    decides), so a broker's "timeout" for an attempt the client has already
    replaced cannot fail the call.

    Several brokers: requests go to one, the *active* broker. It stays active
    while its connection is up and it is not silent; otherwise the first broker
    in the list that is connected (and not silent) becomes active, and every
    send from then on, resends included, goes there. So a connection that
    drops moves what it held to the next broker at once (each such resend
    spends a retry, as above), and an attempt that expires while nothing at
    all was heard from its broker marks that broker silent, so the retry goes
    to another. The client does not move back to an earlier broker when it
    returns (workers serve every broker, and one that just restarted may have
    none yet); it moves only when the active one fails. At the start, an
    earlier broker gets ``FIRST_CHOICE_GRACE_S`` to connect before a later
    one is used.
    """

    def __init__(
        self, *, addresses: Sequence[str] | str, key: str | None, timeout: float, retries: int, curve: CurveClient | None = None
    ) -> None:
        self.addresses = (addresses,) if isinstance(addresses, str) else tuple(addresses)
        if not self.addresses:
            raise ValueError("a pipeline needs at least one broker address")
        self.address = ",".join(self.addresses)
        self.key = key
        self.timeout = timeout
        self.retries = retries
        self.unreachable_after = min(timeout, UNREACHABLE_AFTER_S)
        now = time.monotonic()
        self.links = [Link(address, key=key, curve=curve, now=now) for address in self.addresses]
        self.active = 0  # the broker new attempts go to
        self._exchanges: dict[int, Exchange] = {}  # by id(exchange), in the order opened
        self._by_wire_id: dict[str, Exchange] = {}
        self._outbox: deque[Exchange] = deque()
        self._retry_sends_at = math.inf
        self._grace_until = math.inf

    def __len__(self) -> int:
        return len(self._exchanges)

    @property
    def several(self) -> bool:
        return len(self.links) > 1

    # -- choosing a broker

    def route(self, exchange: Exchange, now: float) -> int | None:
        """The socket (index) to send the exchange's current attempt on now; None: wait for a connection."""
        if exchange.pin is not None:
            return exchange.pin
        return self.choose(now)

    def choose(self, now: float) -> int | None:
        """The active broker: the current one while usable, else the first usable in the list (see the class)."""
        self._grace_until = math.inf
        if not self.several or self.links[self.active].usable:
            return self.active
        candidates = [i for i, link in enumerate(self.links) if link.usable] or [i for i, link in enumerate(self.links) if link.up]
        if not candidates:
            return self.active  # none connected: the send waits in ZeroMQ's place (IMMEDIATE), until one is
        best = candidates[0]
        waiting = [link.opened_at + FIRST_CHOICE_GRACE_S for link in self.links[:best] if not link.ever_up and link.failure is None]
        if waiting and max(waiting) > now:
            self._grace_until = max(waiting)
            return None
        if best != self.active:
            old = self.links[self.active]
            why = "was silent while a request to it waited" if old.up else "has no connection"
            if old.failure is not None:
                why = "refused the handshake"
            (log.warning if old.ever_up else log.info)("the broker at %s %s; sending to the broker at %s", old.address, why, self.links[best].address)
            self.active = best
        return best

    def refused(self, now: float) -> list[int]:
        """Brokers whose refused handshake a new request should try again, on a fresh socket: a lone broker
        always (the caller may have fixed the key), one of several when no other is connected or every
        ``REFUSED_RETRY_S``."""
        others_up = any(link.up for link in self.links)
        return [
            i for i, link in enumerate(self.links)
            if link.failure is not None and (not self.several or not others_up or now - link.failed_at >= REFUSED_RETRY_S)
        ]  # fmt: skip

    # -- opening and sending

    def open(self, call: Call, now: float, *, index: int | None = None, pin: int | None = None, until: float = math.inf) -> Exchange:
        """Track a new call; its first attempt waits in ``unsent()``. The bound counts from ``call.created``.
        ``pin``: the broker it must go to (no failover), by index; ``until``: an earlier bound (``wait_ready``'s)."""
        opened = min(call.created, now)
        exchange = Exchange(call, self.retries, index, opened, min(opened + self.timeout * (self.retries + 1), until), pin)
        self._exchanges[id(exchange)] = exchange
        self._start_attempt(exchange, now)
        return exchange

    def _start_attempt(self, exchange: Exchange, now: float) -> None:
        if exchange.id and exchange.unsent:  # the previous attempt never left: forget its id
            self._by_wire_id.pop(exchange.id, None)
            exchange.ids.pop(exchange.id, None)
        exchange.id = new_attempt_id()
        exchange.ids[exchange.id] = None
        exchange.via = None
        self._by_wire_id[exchange.id] = exchange
        exchange.attempts += 1
        exchange.deadline = min(now + self.timeout, exchange.final)
        if exchange not in self._outbox:
            self._outbox.append(exchange)

    def unsent(self) -> list[Exchange]:
        """Exchanges whose current attempt still has to be handed to a socket, in order. The driver is about
        to try them all, so an earlier ``send_blocked`` is forgotten."""
        self._retry_sends_at = math.inf
        return [ex for ex in self._outbox if not ex.done]

    def message(self, exchange: Exchange, now: float) -> list[Any]:
        """The frames of the current attempt. ``timeout_ms`` is what is left of it, rounded up, so the broker
        never gives up on an attempt before the client does."""
        call = exchange.call
        timeout_ms = None
        if call.op != OP_HEALTH:
            timeout_ms = max(1, min(MAX_TIMEOUT_MS, math.ceil((exchange.deadline - now) * 1000)))
        header = request_header(id=exchange.id, key=self.key, op=call.op, model=call.model, timeout_ms=timeout_ms)
        return [header, *call.body]

    def sent(self, exchange: Exchange, now: float, link: int = 0) -> None:
        """The socket of broker ``link`` took the current attempt."""
        exchange.ids[exchange.id] = now
        exchange.sent_at = now
        exchange.via = link
        try:
            self._outbox.remove(exchange)
        except ValueError:
            pass
        if not self._outbox:
            self._retry_sends_at = math.inf

    def send_blocked(self, now: float, link: int = 0) -> None:
        """A socket would not take a message: try again soon if its connection is up (a full queue), else
        when a connection comes up."""
        if self.links[link].up:
            self._retry_sends_at = min(self._retry_sends_at, now + SEND_RETRY_S)

    def requeue(self, link: int = 0) -> None:
        """Broker ``link``'s socket was replaced: what went out on it goes out again (same id, same deadline)."""
        for exchange in self.pending():
            if exchange.via == link and exchange not in self._outbox:
                exchange.ids[exchange.id] = None
                exchange.via = None
                self._outbox.append(exchange)

    def forget(self, exchange: Exchange) -> None:
        """Stop tracking a request (its result was taken, or its caller gave up); a late reply is dropped."""
        self._exchanges.pop(id(exchange), None)
        for wire_id in exchange.ids:
            if self._by_wire_id.get(wire_id) is exchange:
                del self._by_wire_id[wire_id]
        try:
            self._outbox.remove(exchange)
        except ValueError:
            pass

    def pending(self) -> list[Exchange]:
        return [ex for ex in self._exchanges.values() if not ex.done]

    def _down_since(self, links: Sequence[Link] | None = None) -> float | None:
        """Since when none of ``links`` (all brokers) has had a working connection (None: one has)."""
        links = self.links if links is None else links
        if any(link.up for link in links):
            return None
        return max(link.down_since for link in links if link.down_since is not None)

    def _down_for(self, exchange: Exchange, every: float | None) -> float | None:
        """``_down_since`` of the brokers the exchange may go to, given ``every``, that of all brokers."""
        return every if exchange.pin is None else self._down_since([self.links[exchange.pin]])

    def next_deadline(self) -> float:
        """When ``expire`` next has something to do (or a blocked send is due another try)."""
        when = min(self._retry_sends_at, self._grace_until)
        every = self._down_since()
        for exchange in self._exchanges.values():
            if exchange.done:
                continue
            when = min(when, exchange.deadline)
            down = self._down_for(exchange, every)
            if down is not None:
                when = min(when, max(down, exchange.opened) + self.unreachable_after)
        return when

    # -- replies, events and deadlines

    def receive(self, frames: Sequence[Any], now: float, link: int = 0) -> Exchange | None:
        """Match a reply from broker ``link`` to its request and settle it; returns the exchange, or None if the
        reply was dropped."""
        address = self.links[link].address
        self.links[link].heard(now)
        try:
            header = unpack_map(memoryview(frames[0]), what="reply header", limit=MAX_REPLY_HEADER_BYTES)
        except BadRequest as exc:
            log.warning("dropping a malformed reply from %s: %s", address, exc)
            return None
        request_id, status = header.get("id"), header.get("status")
        exchange = self._by_wire_id.get(request_id) if isinstance(request_id, str) else None
        if exchange is None and request_id is None and status != STATUS_OK:
            # an error the server could not pin on an id: unambiguous only if one request is out there
            out = [ex for ex in self.pending() if ex.via == link and not ex.unsent]
            if len(out) == 1:
                exchange, request_id = out[0], out[0].id
        if exchange is None or exchange.done:
            log.debug("dropping a reply for an unknown or settled request %r from %s", request_id, address)
            return None
        if status != STATUS_OK and header.get("v") == VERSION:
            if request_id != exchange.id:
                log.debug("dropping a %s reply to an earlier attempt of %s; the current one decides", status, exchange.id)
                return None
            if status == "timeout" and now >= exchange.deadline:
                return None  # the attempt's own deadline passed as well: expire() retries it, or fails it
        self._settle(exchange, header, frames, now, request_id, address)
        return exchange

    def _settle(self, exchange: Exchange, header: dict[str, Any], frames: Sequence[Any], now: float, request_id: Any, address: str) -> None:
        exchange.done = True
        status = header.get("status")
        if header.get("v") != VERSION:
            exchange.error = InternalError(
                f"{address} speaks protocol version {header.get('v')!r}; this client speaks {VERSION}: "
                "upgrade the older side"
            )
        elif status != STATUS_OK:
            details = header.get("details")
            exchange.error = error_from_code(
                str(status), str(header.get("message") or "the server gave no message"), details if isinstance(details, dict) else None
            )
        else:
            sent_at = exchange.ids.get(request_id) or exchange.sent_at
            round_trip_ms = (now - sent_at) * 1000.0
            try:
                arrays = decode_arrays(header.get("arrays", []), [memoryview(f) for f in frames[1:]])
                exchange.value = from_broker(exchange.call.finish(header, arrays, round_trip_ms, exchange.index), address)
            except Exception as exc:
                error = InternalError(f"could not decode the {exchange.call.op} reply from {address}: {exc}")
                error.__cause__ = exc
                exchange.error = error
        try:
            self._outbox.remove(exchange)
        except ValueError:
            pass

    def _fail(self, exchange: Exchange, failure: tuple[type[ServiceError], str, dict[str, Any]]) -> None:
        cls, message, details = failure
        exchange.done = True
        exchange.error = cls(message, details={**details, "attempts": exchange.attempts, "op": exchange.call.op})
        try:
            self._outbox.remove(exchange)
        except ValueError:
            pass

    def link_event(self, link: int, event: int, value: int, now: float) -> tuple[str | None, list[Exchange]]:
        """Take a monitor event of broker ``link``'s socket: (REOPEN or None, exchanges it settled).

        A connection that drops takes its replies with it (the broker routes
        each reply to the connection its request came on), so what went out on
        it is resent at once, spending a retry, and goes out to the broker
        chosen next (the same one when it is the only one, once it is back); a
        request with no retry left fails now rather than at its deadline. A
        refused handshake or a CurveZMQ mismatch fails, with a message that
        says what to change, everything pending when no other broker can take
        it, and otherwise only what was for that broker alone. Drivers read
        every waiting event before they send, so a request sent on a new
        connection is never taken for one lost with the old.
        """
        state = self.links[link]
        refused_before = state.failure is not None
        action = state.event(event, value, now)
        failed: list[Exchange] = []
        if state.failure is not None:
            everything = all(other.failure is not None for other in self.links)
            for exchange in self.pending():
                if everything or exchange.pin == link:
                    self._fail(exchange, state.failure)
                    failed.append(exchange)
            if not everything and not refused_before:
                log.warning("%s; using the other brokers meanwhile", state.failure[1])
        elif event == zmq.EVENT_DISCONNECTED:
            for exchange in self.pending():
                if exchange.via != link or exchange.unsent:
                    continue
                if exchange.retries_left > 0 and exchange.final > now:
                    exchange.retries_left -= 1
                    log.info("the connection to %s dropped while %s %s was out; resending it", state.address, exchange.call.op, exchange.id)
                    self._start_attempt(exchange, now)
                else:
                    self._fail(exchange, (
                        DeadlineExceeded,
                        f"the connection to {state.address} dropped while this request was out (the broker stopped, or "
                        f"the network failed) and no retry was left ({exchange.attempts} attempt(s)); raise retries=",
                        {"address": state.address, "reason": "connection_lost"},
                    ))  # fmt: skip
                    failed.append(exchange)
        return action, failed

    def unreachable(self, waited: float, pin: int | None = None) -> tuple[type[ServiceError], str, dict[str, Any]]:
        """The error for a request that found no working connection for ``waited`` seconds (to broker ``pin``, or any)."""
        if pin is not None:
            return self.links[pin].unreachable(waited)
        if not self.several:
            return self.links[0].unreachable(waited)
        each = "; ".join(f"{link.address}: {link.what_failed(waited)}" for link in self.links)
        return BrokerUnreachable, (
            f"cannot reach any of the {len(self.links)} brokers ({each}); check that a broker runs at each "
            f"(zdepth health --server {self.address}), the addresses and ports, and any firewall between"
        ), {"address": self.address, "addresses": list(self.addresses), "waited_s": waited, "reason": "unreachable"}

    def expire(self, now: float) -> list[Exchange]:
        """Settle what is past its deadline, and what found no connection for too long; returns what failed."""
        failed = []
        every = self._down_since()
        for exchange in self.pending():
            down = self._down_for(exchange, every)
            if down is not None:
                waited = now - max(down, exchange.opened)
                if waited >= self.unreachable_after:
                    self._fail(exchange, self.unreachable(waited, exchange.pin))
                    failed.append(exchange)
                    continue
            if exchange.deadline > now:
                continue
            address = self.address if exchange.via is None else self.links[exchange.via].address
            if exchange.via is not None and exchange.pin is None and self.several and not exchange.unsent:
                link = self.links[exchange.via]
                if not link.silent and link.heard_at < (exchange.ids.get(exchange.id) or exchange.opened):
                    link.silent = True
                    log.warning(
                        "nothing heard from the broker at %s while %s %s waited %.3g s; sending to another broker",
                        address, exchange.call.op, exchange.id, now - (exchange.ids.get(exchange.id) or exchange.opened),
                    )  # fmt: skip
            if exchange.retries_left > 0 and exchange.final > now:
                exchange.retries_left -= 1
                log.info(
                    "no reply from %s to %s %s in %.3g s; retrying (attempt %d of %d)",
                    address, exchange.call.op, exchange.id, now - (exchange.ids.get(exchange.id) or exchange.opened),
                    exchange.attempts + 1, self.retries + 1,
                )  # fmt: skip
                self._start_attempt(exchange, now)
                continue
            waited = now - exchange.opened
            self._fail(exchange, (
                DeadlineExceeded,
                f"no reply from {address} after {waited:.1f} s ({exchange.attempts} attempt(s) of {self.timeout:g} s); "
                "check that the broker runs there (zdepth health) and the address, or raise timeout=",
                {"address": address, "waited_s": waited},
            ))  # fmt: skip
            failed.append(exchange)
        return failed
