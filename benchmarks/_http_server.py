"""The baseline: an HTTP + JSON + base64 depth server shaped like the one zdepth replaces.

FastAPI + uvicorn + pydantic, a Bearer key, ``POST /rel_depth`` taking
``{"image": base64, "encoder", "dataset", "model_input_size"}`` and answering
``{"depth_map": base64 float32, "shape": [H, W], "min", "max"}``, as the old
server's README documents. No model: the image is base64-decoded (as the old
server did before ``cv2.imdecode``) and a fixed float32 depth map is returned,
so what is measured is the transport. Run as a process:
``python benchmarks/_http_server.py --port N --key K``.

With ``--weights FILE`` it is the old server's whole architecture instead: the
endpoint is a plain ``def``, so FastAPI runs it in its thread pool, and each
request runs the official per-image path (``cv2.imdecode``, ``preprocess_cv2``,
the fp32 model, ``resize_depth``) with torch's default threads, as the old
server did; the reply is that depth map, base64 float32 in JSON.
"""

from __future__ import annotations

import argparse
import base64
import binascii

import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel


class DepthRequest(BaseModel):
    image: str
    encoder: str = "vitl"
    dataset: str = "hypersim"
    model_input_size: int = 518


class DepthResponse(BaseModel):
    depth_map: str
    shape: list[int]
    min: float
    max: float


def make_app(key: str | None, height: int, width: int) -> FastAPI:
    app = FastAPI()
    bearer = HTTPBearer(auto_error=False)
    depth = np.random.default_rng(0).random((height, width), dtype=np.float32)
    low, high = float(depth.min()), float(depth.max())

    def verify(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if key is not None and (credentials is None or credentials.credentials != key):
            raise HTTPException(status_code=401, detail="invalid API key")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "healthy"}

    @app.post("/rel_depth", response_model=DepthResponse, dependencies=[Depends(verify)])
    async def rel_depth(request: DepthRequest) -> DepthResponse:
        try:
            image = base64.b64decode(request.image, validate=True)
        except binascii.Error as exc:
            raise HTTPException(status_code=400, detail=f"image is not base64: {exc}") from exc
        if not image:
            raise HTTPException(status_code=400, detail="empty image")
        return DepthResponse(depth_map=base64.b64encode(depth.tobytes()).decode("ascii"), shape=[height, width], min=low, max=high)

    return app


def make_model_app(key: str | None, weights: str, encoder: str, input_size: int) -> FastAPI:
    """The old server's architecture with the real model: one fp32 model shared by FastAPI's thread pool."""
    import cv2
    import torch

    from depth_anything_v2 import build_model, load_checkpoint, preprocess_cv2, resize_depth

    model = build_model(encoder)
    load_checkpoint(model, weights)
    model = model.eval().requires_grad_(False)
    app = FastAPI()
    bearer = HTTPBearer(auto_error=False)

    def verify(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if key is not None and (credentials is None or credentials.credentials != key):
            raise HTTPException(status_code=401, detail="invalid API key")

    @app.get("/health")
    def health() -> dict:
        return {"status": "healthy"}

    @app.post("/rel_depth", response_model=DepthResponse, dependencies=[Depends(verify)])
    def rel_depth(request: DepthRequest) -> DepthResponse:  # a plain def: FastAPI's thread pool runs it
        try:
            data = base64.b64decode(request.image, validate=True)
        except binascii.Error as exc:
            raise HTTPException(status_code=400, detail=f"image is not base64: {exc}") from exc
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise HTTPException(status_code=400, detail="not an image")
        with torch.inference_mode():
            depth = resize_depth(model(preprocess_cv2(image, input_size or request.model_input_size)), image.shape[:2])[0].numpy()
        return DepthResponse(
            depth_map=base64.b64encode(depth.astype(np.float32).tobytes()).decode("ascii"),
            shape=list(depth.shape),
            min=float(depth.min()),
            max=float(depth.max()),
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", default=None)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--weights", default=None, help="a checkpoint: serve the real model the old server's way")
    parser.add_argument("--encoder", default="vits")
    parser.add_argument("--input-size", type=int, default=None, help="network input side (default: the request's model_input_size)")
    args = parser.parse_args()
    if args.weights:
        app = make_model_app(args.key, args.weights, args.encoder, args.input_size)
    else:
        app = make_app(args.key, args.height, args.width)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
