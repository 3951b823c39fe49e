"""The client side: requests built and answered without sockets (``pipeline``), the blocking
``Client`` (``sync``), ``AsyncClient`` (``aio``) and the results they return.

Imports only the wire (``zdepth.protocol``), never torch or the worker.
"""

from zdepth.client.aio import AsyncClient
from zdepth.client.pipeline import ClientState
from zdepth.client.results import DepthResult, PointCloudResult
from zdepth.client.sync import DEFAULT_ADDRESS, Client, StreamItem

__all__ = ["AsyncClient", "Client", "ClientState", "DEFAULT_ADDRESS", "DepthResult", "PointCloudResult", "StreamItem"]
