"""Engine.prepare / run / collect: the three steps the worker's pipeline runs on three threads.

On the CPU they must give exactly what ``infer`` gives (the official cv2
pipeline), on the tensor path (the GPU's, run here on the CPU) what infer's
tensor path gives; a float16 map is the float32 map rounded, with min and max
taken before the cast. CUDA streams and events are exercised by the GPU
tests (they skip here).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from zdepth.engine import Engine, Pending
from zdepth.errors import BadRequest
from zdepth.protocol.images import decode_image, device_decodable_jpeg, encode_jpeg

SMALL = 28
RNG = np.random.default_rng(5)
SIZES = [(60, 80), (61, 80), (80, 60), (35, 35), (60, 80)]  # two network sizes share a batch, two shapes share a resize


def frames() -> list[np.ndarray]:
    return [RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.fixture(scope="module")
def engine(weights_dir):
    return Engine(weights_dir=weights_dir)


@pytest.fixture(scope="module")
def tensor_engine(weights_dir):
    """The GPU's pipeline (torch resize + normalise) run on the CPU, JPEGs decoded by cv2 first."""
    return Engine(weights_dir=weights_dir, preprocess="torch")


@pytest.mark.parametrize("tensor_path", [False, True], ids=["cv2", "tensor"])
def test_the_three_steps_give_what_infer_gives(engine, tensor_engine, tensor_path):
    engine = tensor_engine if tensor_path else engine
    images = frames()
    max_depth = [5.0, None, 7.5, 2.0, None]
    expected = engine.infer(images, "vits-hypersim", input_size=SMALL, max_depth=max_depth)
    pending = engine.run([engine.prepare(image, SMALL) for image in images], "vits-hypersim", max_depth=max_depth)
    depths = engine.collect(pending)
    for depth, want in zip(depths, expected):
        assert depth.dtype == np.float32 and depth.shape == want.shape
        if tensor_path:  # infer uploads equally sized images together: the same ops, batched differently
            np.testing.assert_allclose(depth, want, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(depth, want)
    assert pending.ranges() == [(float(d.min()), float(d.max())) for d in depths]


def test_steps_may_run_on_three_threads(engine):
    """prepare on one thread, run on another, collect on a third: as the worker's pipeline calls them."""
    images = frames()
    prepared, pending, depths = [], [], []
    for step in (
        lambda: prepared.extend(engine.prepare(image, SMALL) for image in images),
        lambda: pending.append(engine.run(prepared, "vits")),
        lambda: depths.extend(engine.collect(pending[0])),
    ):
        thread = threading.Thread(target=step)
        thread.start()
        thread.join()
    for depth, want in zip(depths, engine.infer(images, "vits", input_size=SMALL)):
        # Not bit for bit: another thread may run torch with another number of intra-op threads.
        np.testing.assert_allclose(depth, want, rtol=1e-5, atol=1e-6)


def test_float16_is_cast_in_the_engine_after_min_and_max(engine):
    images = frames()
    expected = engine.infer(images, "vits", input_size=SMALL)
    halves = [True, False, True, False, True]
    pending = engine.run([engine.prepare(image, SMALL) for image in images], "vits", float16=halves)
    depths = engine.collect(pending)
    for depth, want, half in zip(depths, expected, halves):
        assert depth.dtype == (np.float16 if half else np.float32)
        np.testing.assert_array_equal(depth, want.astype(depth.dtype))
    assert pending.ranges() == [(float(d.min()), float(d.max())) for d in expected]


def test_jpegs_and_device_decoding_on_the_tensor_path(weights_dir, tensor_engine):
    engine = Engine(weights_dir=weights_dir, preprocess="torch", jpeg_decoder="device")
    image = RNG.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    jpeg = device_decodable_jpeg(encode_jpeg(image, quality=95))
    (depth,) = engine.collect(engine.run([engine.prepare(jpeg, SMALL)], "vits"))
    (want,) = engine.infer([jpeg], "vits", input_size=SMALL)
    np.testing.assert_allclose(depth, want, rtol=1e-5, atol=1e-6)
    engine = tensor_engine  # no device decoder: the JPEG is decoded by cv2 first
    (depth,) = engine.collect(engine.run([engine.prepare(jpeg, SMALL)], "vits"))
    np.testing.assert_allclose(depth, engine.infer([decode_image(encode_jpeg(image, quality=95))], "vits", input_size=SMALL)[0], rtol=1e-5, atol=1e-6)


def test_ranges_of_an_all_nan_map_are_nan():
    pending = Pending(
        depths=[torch.zeros(2, 2), torch.zeros(2, 2)],
        lows=[torch.tensor(math.inf), torch.tensor(0.5)],
        highs=[torch.tensor(-math.inf), torch.tensor(2.0)],
    )
    (low, high), second = pending.ranges()
    assert math.isnan(low) and math.isnan(high) and second == (0.5, 2.0)


def test_bad_arguments_are_bad_requests(engine):
    with pytest.raises(BadRequest, match="input_size"):
        engine.prepare(frames()[0], 30)
    with pytest.raises(BadRequest, match="HxWx3 uint8"):
        engine.prepare(np.zeros((4, 4), np.uint8), SMALL)
    prepared = [engine.prepare(image, SMALL) for image in frames()[:2]]
    with pytest.raises(BadRequest, match="float16 flags"):
        engine.run(prepared, "vits", float16=[True])
    with pytest.raises(BadRequest, match="relative"):
        engine.run(prepared, "vits", max_depth=3.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_the_steps_on_cuda_give_what_infer_gives(weights_dir, graphs):
    """The upload stream, the events between it and the compute stream, the pinned copies back and
    the float16 cast on the device, against infer's batched upload on the same GPU."""
    engine = Engine(device="cuda", weights_dir=weights_dir, cuda_graphs=graphs)
    images = frames()
    max_depth = [5.0, None, 7.5, 2.0, None]
    expected = engine.infer(images, "vits-hypersim", input_size=SMALL, max_depth=max_depth)
    halves = [False, True, False, True, False]
    results: list = []
    prepared = [engine.prepare(image, SMALL) for image in images]
    worker = threading.Thread(target=lambda: results.append(engine.collect(engine.run(prepared, "vits-hypersim", max_depth=max_depth, float16=halves))))
    worker.start()
    worker.join()
    for depth, want, half in zip(results[0], expected, halves):
        assert depth.dtype == (np.float16 if half else np.float32)
        np.testing.assert_allclose(depth.astype(np.float32), want, rtol=2e-3, atol=1e-3)  # fp16 on the device either way
