"""The broker's view of its workers: who is connected, who may get work, how fast each one is.

``WorkerRegistry`` is the dict of ``WorkerState`` by identity, with the
questions the core asks of all of them at once (which models are served,
which workers may take a request now, how fast the quickest is). Nothing here
sends a message or touches a request's fate: that is the core's to decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zdepth.config import BrokerConfig
from zdepth.protocol import op_accepts_model

if TYPE_CHECKING:
    from zdepth.broker.queues import HeldRequest

UNHEALTHY_AFTER = 2  # in-flight deadlines missed in a row before a worker gets no new work
SERVICE_EWMA = 0.3  # weight of the newest dispatch-to-reply time in a worker's estimate
# What of a worker's READY info the health reply repeats (the rest is the worker's business).
HEALTH_INFO = ("name", "host", "pid", "device", "precision", "version", "max_batch", "threads", "peer")


@dataclass(slots=True)
class WorkerState:
    identity: bytes
    models: frozenset[str]
    capacity: int
    info: dict[str, Any]
    heard: float
    started: float
    in_flight: dict[int, HeldRequest] = field(default_factory=dict)
    draining: bool = False
    missed: int = 0  # in-flight deadlines missed in a row; UNHEALTHY_AFTER of them stop new work
    service_s: float | None = None  # smoothed dispatch-to-reply time
    served: int = 0
    failed: int = 0
    name: str = field(init=False)  # what logs and health call it: its own name, else its identity

    def __post_init__(self) -> None:
        self.name = str(self.info.get("name") or self.identity.hex())

    @property
    def unhealthy(self) -> bool:
        return self.missed >= UNHEALTHY_AFTER

    @property
    def load(self) -> float:
        return len(self.in_flight) / self.capacity

    def measured(self, elapsed: float) -> None:
        """A reply came ``elapsed`` seconds after its dispatch: fold it into the estimate."""
        self.service_s = elapsed if self.service_s is None else (1 - SERVICE_EWMA) * self.service_s + SERVICE_EWMA * elapsed

    def health(self, now: float, recent_s: float) -> dict[str, Any]:
        """This worker as the health reply shows it; ``state`` is one of ready, silent, unhealthy, draining."""
        if self.draining:
            state = "draining"
        elif self.unhealthy:
            state = "unhealthy"
        elif now - self.heard > recent_s:
            state = "silent"
        else:
            state = "ready"
        return {
            **{k: v for k, v in self.info.items() if k in HEALTH_INFO},
            "models": sorted(self.models),
            "capacity": self.capacity,
            "in_flight": len(self.in_flight),
            "served": self.served,
            "failed": self.failed,
            "state": state,
            "draining": self.draining,
            "unhealthy": self.unhealthy,
            "service_ms": None if self.service_s is None else round(1000 * self.service_s, 3),
            "heard_s_ago": round(now - self.heard, 3),
            "uptime_s": round(now - self.started, 3),
        }


def read_ready(header: dict[str, Any]) -> tuple[list[str], int, dict[str, Any]] | None:
    """The models, capacity and info a READY announces, or None when they are malformed."""
    models, capacity, info = header.get("models"), header.get("capacity"), header.get("info") or {}
    if (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, str) and m for m in models)
        or isinstance(capacity, bool)
        or not isinstance(capacity, int)
        or capacity < 1
        or not isinstance(info, dict)
    ):
        return None
    return models, capacity, info


class WorkerRegistry(dict[bytes, WorkerState]):
    """The connected workers by identity, and when each model was last served (for reconnect grace)."""

    def __init__(self, config: BrokerConfig, now: float) -> None:
        super().__init__()
        self.started = now
        self.recent_s = config.heartbeat.recent_s
        self.reconnect_grace_s = config.reconnect_grace_s
        self.model_last_seen: dict[str, float] = {}

    def seen(self, models, now: float) -> None:
        for model in models:
            self.model_last_seen[model] = now

    def live(self, worker: WorkerState, now: float) -> bool:
        """May get new work: heard from recently, not draining, not holding requests past their deadlines."""
        return not worker.draining and not worker.unhealthy and now - worker.heard <= self.recent_s

    def with_room(self, model: str, now: float) -> list[WorkerState]:
        """The live workers for ``model`` that have room for one more request."""
        return [w for w in self.values() if model in w.models and len(w.in_flight) < w.capacity and self.live(w, now)]

    def quickest(self, model: str, now: float) -> float:
        """The shortest time any live worker for ``model`` is measured to take per request (0 when unknown)."""
        estimates = [w.service_s for w in self.values() if model in w.models and self.live(w, now)]
        if not estimates or None in estimates:
            return 0.0
        return min(estimates)

    def served_models(self) -> list[str]:
        return sorted({m for w in self.values() if not w.draining for m in w.models})

    def default_model(self, op: str) -> str | None:
        """The server's default when a request names no model: the first served model that fits the op."""
        return next((m for m in self.served_models() if op_accepts_model(op, m)), None)

    def may_be_served(self, model: str, now: float) -> bool:
        """Served now, or recently enough (or the broker is young enough) that its workers are probably
        reconnecting: such requests wait in the queue instead of failing at once."""
        if any(model in w.models for w in self.values()):
            return True
        grace = self.reconnect_grace_s
        if now - self.started < grace:
            return True
        return now - self.model_last_seen.get(model, -grace) < grace

    def unknown_model(self, model: str | None, op: str) -> tuple[str, dict[str, Any]]:
        """The unknown_model error's message and details: what is served instead."""
        served = self.served_models()
        hint = f"served models: {', '.join(served)}" if served else "no worker is connected"
        return f"no worker serves model {model or '(default)'!r} for op {op!r}; {hint}", {"served": served}
