"""The broker: requests routed by model from clients to workers, every promise kept in a sans-IO core.

``core`` makes every decision (no sockets), over the state kept in ``queues``
(the requests held), ``workers`` (the registry) and ``outbox`` (what to send);
``loop`` binds the two ROUTER sockets and feeds the core; ``stats`` makes the
periodic summary.
"""

from zdepth.broker.core import BrokerCore, Outgoing
from zdepth.broker.loop import Broker, run_broker

__all__ = ["Broker", "BrokerCore", "Outgoing", "run_broker"]
