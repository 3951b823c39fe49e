"""Who may call, and how much they may send: the bearer key and the body limit, checked before FastAPI runs.

The key is compared in constant time (both sides hashed first); a caller
without it is answered 401 before a byte of its body is read.
"""

import hashlib
import hmac
import json
from typing import Any, Optional


def key_digest(key: str) -> bytes:
    """What a bearer token is compared against: a SHA-256, so the comparison takes the same time whatever the lengths."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def key_matches(authorization: Optional[bytes], digest: bytes) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <the key>``, compared in constant time.

    Both sides are hashed first and compared with ``hmac.compare_digest``, so
    neither where a wrong key first differs nor its length shows in the time
    taken (the old server compared with ``!=``).
    """
    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return token_matches(token.strip(), digest)


def token_matches(token: bytes, digest: bytes) -> bool:
    """Whether ``token`` is the key whose ``key_digest`` is ``digest``: hash, then ``hmac.compare_digest``."""
    return hmac.compare_digest(hashlib.sha256(token).digest(), digest)


async def _send_json(send: Any, status: int, body: dict[str, Any], headers: tuple = ()) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": data})


class _Guard:
    """ASGI middleware for the depth endpoints: the bearer key first, then the body read whole up to the limit.

    A caller without the key is answered 401 before a byte of its body is
    read, and nobody can make the gateway hold more than ``max_body`` bytes
    for one request.
    """

    def __init__(self, app: Any, *, digest: Optional[bytes], max_body: int, paths: tuple[str, ...]) -> None:
        self.app, self.digest, self.max_body, self.paths = app, digest, max_body, paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        if self.digest is not None and not key_matches(headers.get(b"authorization"), self.digest):
            await _send_json(
                send, 401, {"detail": "missing or wrong API key: send Authorization: Bearer <key>", "code": "unauthorized"},
                ((b"www-authenticate", b"Bearer"),),
            )  # fmt: skip
            return
        too_big = {"detail": f"the request body is larger than {self.max_body} bytes", "code": "bad_request"}
        length = headers.get(b"content-length", b"").strip()
        if length.isdigit() and int(length) > self.max_body:
            await _send_json(send, 413, too_big, ((b"connection", b"close"),))
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body:
                await _send_json(send, 413, too_big, ((b"connection", b"close"),))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
