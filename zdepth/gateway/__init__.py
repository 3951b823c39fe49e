"""The old HTTP API in front of a broker: ``zdepth gateway --broker tcp://gpu-box:5555 --port 8000``.

Scripts written for the HTTP + JSON + base64 depth server keep working
unchanged: ``POST /pc``, ``/metric_depth`` and ``/rel_depth`` take the same
JSON fields and answer the same fields (float32 arrays as base64), ``GET
/health`` answers without a key, and ``Authorization: Bearer <key>`` is
checked (in constant time) before a request body is read. Every request is
forwarded through one ``zdepth.AsyncClient``; the gateway holds no model.

- The key: the gateway's bearer key is the broker key it uses (``--key-file``,
  ``ZDEPTH_KEY``, ``ZDEPTH_KEY_FILE``, or a profile's), so one secret serves
  both kinds of client. Without a key, anyone may call, as with the old server.
- ``/rel_depth`` keeps the old server's meaning: the METRIC model with
  ``max_depth`` 1 (``AsyncClient.legacy_relative_depth``), not the relative model.
- ``max_depth`` left out of ``/pc`` or ``/metric_depth`` is 1.0, as in the old
  server and its client; send 20 (hypersim) or 80 (vkitti) for metres.
- Images come as base64 of JPEG/PNG bytes (a ``data:`` URI too), or as an
  ``http(s)://`` URL in ``image`` (or ``image_url``). URLs are fetched only with
  ``--allow-url-fetch``: at most ``--url-max-bytes``, within ``--url-timeout``,
  following at most 5 redirects, and only to public addresses; every hop's
  host is resolved, checked, and connected to at the address that was checked
  (no second lookup a DNS answer could change). ``--allow-url-network CIDR``
  lets image hosts on a private network through (the lab's camera host; or
  127.0.0.0/8 to try the gateway on one machine).
- Errors keep FastAPI's ``{"detail": ...}`` body, plus the zdepth ``code``:
  401 unauthorized, 400 bad_request, 404 unknown_model (the model named by
  ``encoder`` and ``dataset`` is not served; ``served`` lists what is), 413 a
  body over the limit, 422 a body whose fields do not parse, 503 overloaded or
  worker_lost or no broker (with ``Retry-After``), 504 timeout, 500 internal.

FastAPI and uvicorn come with the ``gateway`` extra; importing this package
needs neither (the command imports them when it runs).
"""

from zdepth.gateway.answers import _blob, error_body, http_status, json_bytes, json_parts, legacy_health
from zdepth.gateway.app import DEFAULT_BROKER, MAX_BODY_BYTES, GatewaySettings, create_app
from zdepth.gateway.auth import key_digest, key_matches, token_matches
from zdepth.gateway.command import DEFAULT_HOST, DEFAULT_PORT, gateway_command, run_gateway
from zdepth.gateway.urls import UrlPolicy, fetch_url, is_public_address, parse_image_field

__all__ = [
    "DEFAULT_BROKER",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "GatewaySettings",
    "MAX_BODY_BYTES",
    "UrlPolicy",
    "_blob",
    "create_app",
    "error_body",
    "fetch_url",
    "gateway_command",
    "http_status",
    "is_public_address",
    "json_bytes",
    "json_parts",
    "key_digest",
    "key_matches",
    "legacy_health",
    "parse_image_field",
    "run_gateway",
    "token_matches",
]
