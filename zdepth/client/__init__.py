"""The client side: the blocking ``Client`` (``sync``), ``AsyncClient`` (``aio``) and the results they return.

A request's stages, each with its own name: a method builds a ``Call``
(``calls``: op, model, body frames); the pipeline tracks it in flight as an
``Exchange`` (``exchanges``), sending it as one or more attempts, each a
request header with its own id (``zdepth.protocol``); the broker queues it,
and a worker runs it, as a ``Job``. The reply comes back to the exchange and
``replies`` decodes it into a result.

Sans-IO modules (``calls``, ``urls``, ``replies``, ``links``, ``exchanges``,
``pipeline``, ``options``, ``base``) decide; ``sockets``, ``sync`` and ``aio``
do the socket I/O, and ``streams`` reads the frames of ``stream``. Imports only the wire (``zdepth.protocol``), never torch or the worker.
"""

from zdepth.client.aio import AsyncClient
from zdepth.client.options import ClientState
from zdepth.client.results import DepthResult, PointCloudResult
from zdepth.client.sync import DEFAULT_ADDRESS, Client, StreamItem

__all__ = ["AsyncClient", "Client", "ClientState", "DEFAULT_ADDRESS", "DepthResult", "PointCloudResult", "StreamItem"]
