"""The ASGI app: the old server's endpoints as FastAPI routes, each forwarded through one ``AsyncClient``.

FastAPI is imported only when ``create_app`` runs (the ``gateway`` extra).
"""

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from zdepth.client.urls import MAX_URL_IMAGE_BYTES, shown_url
from zdepth.errors import BadRequest, ServiceError, Unauthorized
from zdepth.gateway.answers import _blob, error_body, http_status, json_parts, legacy_health
from zdepth.gateway.auth import _Guard, key_digest
from zdepth.gateway.urls import UrlPolicy, fetch_url, parse_image_field

log = logging.getLogger("zdepth.gateway")  # one logger for the whole gateway, as when it was one module

DEFAULT_BROKER = "tcp://localhost:5555"
DEFAULT_TIMEOUT_S = 30.0
LEGACY_MAX_DEPTH = 1.0  # the old server's max_depth when a request names none, and /rel_depth's always
LEGACY_ENCODER = "vitl"  # the old server's defaults for encoder, dataset and input size
LEGACY_DATASET = "hypersim"
LEGACY_INPUT_SIZE = 518
# The largest image a broker accepts, as base64 (4/3), plus room for the JSON around it.
MAX_BODY_BYTES = MAX_URL_IMAGE_BYTES * 4 // 3 + 1024 * 1024
HEALTH_TIMEOUT_S = 5.0
DEPTH_PATHS = ("/pc", "/metric_depth", "/rel_depth")


@dataclass
class GatewaySettings:
    """What a gateway needs: the broker (an address, several comma-separated, or a profile name), its key and
    CurveZMQ pair, timeouts, the URL policy.

    ``key``: None reads ``ZDEPTH_KEY`` / ``ZDEPTH_KEY_FILE``, as ``zdepth.Client``
    does; the same key is then required as the bearer token. ``timeout`` and
    ``retries``: the AsyncClient's, so a request takes at most
    ``timeout * (retries + 1)`` seconds before it is answered 504.
    """

    broker: str = DEFAULT_BROKER
    key: Optional[str] = None
    curve: Any = None  # zdepth.protocol.curve.CurveClient
    timeout: float = DEFAULT_TIMEOUT_S
    retries: int = 1
    urls: UrlPolicy = field(default_factory=UrlPolicy)
    max_body_bytes: int = MAX_BODY_BYTES


def create_app(settings: GatewaySettings) -> Any:
    """The ASGI app: the old server's four endpoints (and its ``/docs``), forwarding through an AsyncClient.

    The FastAPI app (``.app`` of what is returned) sits behind ``_Guard``,
    which checks the key and the body's size first. Needs the ``gateway`` extra.
    """
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from fastapi.security import HTTPBearer
    from pydantic import BaseModel, Field, model_validator

    from zdepth import __version__
    from zdepth.client.aio import AsyncClient
    from zdepth.client.options import resolve_addresses
    from zdepth.config import read_key

    addresses, profile = resolve_addresses(settings.broker)  # one broker, several (a:5555,b:5555) or a profile
    # One key for both sides: the one the AsyncClient would use (given, else the profile's, else the environment's).
    key = settings.key or (profile.key if profile is not None and profile.key else None) or read_key()
    curve = settings.curve if settings.curve is not None else (profile.curve if profile is not None else None)
    client = AsyncClient(list(addresses), key=key, timeout=settings.timeout, retries=settings.retries, curve=curve)
    health_client = AsyncClient(list(addresses), key=key, timeout=min(settings.timeout, HEALTH_TIMEOUT_S), retries=0, curve=curve)
    counter = {"requests": 0}

    class CameraIntrinsics(BaseModel):
        fx: float
        fy: float
        cx: float
        cy: float

    class DepthRequest(BaseModel):
        """The old server's request: one model for all three endpoints."""

        image: Optional[str] = Field(None, description="base64 of JPEG/PNG bytes (or a data: URI), or an http(s) URL")
        image_url: Optional[str] = Field(None, description="an http(s) URL, instead of image")
        camera_intrinsics: Optional[CameraIntrinsics] = Field(None, description="pixels; required by /pc")
        max_depth: Optional[float] = Field(None, description="/pc and /metric_depth; default 1.0; /rel_depth always uses 1.0")
        encoder: str = LEGACY_ENCODER
        dataset: str = LEGACY_DATASET
        model_input_size: int = LEGACY_INPUT_SIZE

        @model_validator(mode="after")
        def _one_image(self):
            if not self.image and not self.image_url:
                raise ValueError("give the image: 'image' (base64 or an http(s) URL) or 'image_url'")
            return self

    class DepthResponse(BaseModel):
        depth_map: str = Field(description="base64 of float32 little-endian, row-major")
        shape: list[int]
        min: float
        max: float

    class PointCloudResponse(BaseModel):
        pointcloud: str = Field(description="base64 of float32 (N, 3): X = (u - cx) Z / fx, Y = (v - cy) Z / fy, Z = depth")
        pointcloud_shape: list[int]
        depth_map: str
        depth_shape: list[int]
        min: float
        max: float

    class HealthResponse(BaseModel):
        status: str
        device: Optional[str] = None
        worker_id: int = 0
        gpu_id: Optional[int] = None
        gpu_count: int = 0
        models_loaded: list[str] = []
        total_model_instances: int = 0
        request_counter: int = 0
        workers: int = 0

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        log.info(
            "gateway for broker %s: bearer key %s, URL fetching %s",
            client.address,
            "required" if key else "NOT required (no key: anyone may call)",
            ("on" + (f", also from {', '.join(map(str, settings.urls.networks))}" if settings.urls.networks else "")) if settings.urls.fetch else "off",
        )
        try:
            yield
        finally:
            await client.aclose()
            await health_client.aclose()

    app = FastAPI(
        title="zdepth gateway",
        version=__version__,
        description="The HTTP + JSON + base64 depth API, served through a zdepth broker.",
        lifespan=lifespan,
    )
    bearer = HTTPBearer(auto_error=False, description="The broker's key; checked before the body is read.")

    async def documented_key(_: Any = Depends(bearer)) -> None:
        """Declares the bearer key for /docs; the key itself is checked by _Guard before the body is read."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        status = http_status(exc)
        level = logging.ERROR if status in (401, 500) else logging.INFO
        log.log(level, "%s %s -> %d %s: %s", request.method, request.url.path, status, exc.code, exc.message)
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse(error_body(exc), status_code=status, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed: %s: %s (traceback below)", request.method, request.url.path, type(exc).__name__, exc)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the gateway's log", "code": "internal"}, status_code=500)

    async def image_of(body: DepthRequest) -> bytes:
        image = parse_image_field(body.image) if body.image else body.image_url
        if isinstance(image, bytes):
            return image
        image = str(image)
        if not image.lower().startswith(("http://", "https://")):
            raise BadRequest(f"image_url must be an http:// or https:// URL, got {shown_url(image)}")
        policy = settings.urls
        try:
            return await asyncio.wait_for(asyncio.to_thread(fetch_url, image, policy), policy.timeout_s + 1.0)
        except asyncio.TimeoutError:
            raise BadRequest(f"cannot fetch {shown_url(image)}: no complete answer in {policy.timeout_s:g} s") from None

    def depth_fields(result: Any) -> list[tuple[str, Any]]:
        return [("depth_map", _blob(result.depth)), ("shape", list(result.depth.shape)), ("min", result.min), ("max", result.max)]

    def model_of(body: DepthRequest) -> dict[str, Any]:
        return {"encoder": body.encoder, "dataset": body.dataset, "input_size": body.model_input_size}

    class JsonParts(Response):
        """A JSON body sent as the pieces ``json_parts`` made, never joined into one copy."""

        media_type = "application/json"

        def __init__(self, parts: list[bytes]) -> None:
            super().__init__(b"")
            self.parts = parts
            self.headers["content-length"] = str(sum(len(part) for part in parts))

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            for index, part in enumerate(self.parts):
                await send({"type": "http.response.body", "body": part, "more_body": index < len(self.parts) - 1})

    def answer(fields: list[tuple[str, Any]]) -> Response:
        return JsonParts(json_parts(fields))

    @app.post("/pc", responses={200: {"model": PointCloudResponse}}, dependencies=[Depends(documented_key)])
    async def pointcloud(body: DepthRequest) -> Response:
        """A point cloud (every pixel, camera frame) and the metric depth map it comes from."""
        counter["requests"] += 1
        if body.camera_intrinsics is None:
            raise BadRequest("/pc needs camera_intrinsics: {fx, fy, cx, cy} in pixels of this image")
        image = await image_of(body)
        k = body.camera_intrinsics
        max_depth = LEGACY_MAX_DEPTH if body.max_depth is None else body.max_depth
        result = await client.pointcloud(image, (k.fx, k.fy, k.cx, k.cy), max_depth=max_depth, colors=False, **model_of(body))
        depth = result.depth
        return answer(
            [
                ("pointcloud", _blob(result.points)),
                ("pointcloud_shape", list(result.points.shape)),
                ("depth_map", _blob(depth.depth)),
                ("depth_shape", list(depth.depth.shape)),
                ("min", depth.min),
                ("max", depth.max),
            ]
        )

    @app.post("/metric_depth", responses={200: {"model": DepthResponse}}, dependencies=[Depends(documented_key)])
    async def metric_depth(body: DepthRequest) -> Response:
        """Metric depth from the {encoder}-{dataset} model, scaled by max_depth (default 1.0, as the old server)."""
        counter["requests"] += 1
        image = await image_of(body)
        max_depth = LEGACY_MAX_DEPTH if body.max_depth is None else body.max_depth
        return answer(depth_fields(await client.metric_depth(image, max_depth=max_depth, **model_of(body))))

    @app.post("/rel_depth", responses={200: {"model": DepthResponse}}, dependencies=[Depends(documented_key)])
    async def rel_depth(body: DepthRequest) -> Response:
        """The old server's "relative" depth: the METRIC model with max_depth 1 (max_depth in the request is ignored)."""
        counter["requests"] += 1
        image = await image_of(body)
        return answer(depth_fields(await client.legacy_relative_depth(image, **model_of(body))))

    @app.get("/health", response_model=HealthResponse)
    async def health() -> JSONResponse:
        """The old server's health fields, from the broker's: 200 with workers, 503 without any or without the broker. No key."""
        try:
            info = await health_client.health()
        except ServiceError as exc:
            log.warning("health: the broker at %s did not answer: %s", health_client.address, exc)
            reason = "the broker refused the gateway's key" if isinstance(exc, Unauthorized) else "the broker does not answer"
            return JSONResponse({"status": "unhealthy", "detail": reason, "request_counter": counter["requests"]}, status_code=503)
        return JSONResponse(legacy_health(info, counter["requests"]), status_code=200 if info.get("workers") else 503)

    return _Guard(app, digest=key_digest(key) if key else None, max_body=settings.max_body_bytes, paths=DEPTH_PATHS)
