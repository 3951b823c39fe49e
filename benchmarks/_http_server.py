"""The baseline: an HTTP + JSON + base64 depth server shaped like the one zdepth replaces.

FastAPI + uvicorn + pydantic, a Bearer key, ``POST /rel_depth`` taking
``{"image": base64, "encoder", "dataset", "model_input_size"}`` and answering
``{"depth_map": base64 float32, "shape": [H, W], "min", "max"}``, as the old
server's README documents. No model: the image is base64-decoded (as the old
server did before ``cv2.imdecode``) and a fixed float32 depth map is returned,
so what is measured is the transport. Run as a process:
``python benchmarks/_http_server.py --port N --key K``.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", default=None)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    args = parser.parse_args()
    uvicorn.run(make_app(args.key, args.height, args.width), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
