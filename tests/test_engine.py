import json

import numpy as np
import pytest
import torch

import zdepth.engine.inference
import zdepth.engine.jpeg
from conftest import data_file
from zdepth.engine import Engine
from zdepth.engine.inference import resolve_device
from zdepth.errors import BadRequest, UnknownModel, WeightsNotFound
from zdepth.protocol.images import EncodedJpeg, decode_image, device_decodable_jpeg, encode_jpeg, read_image

SMALL = 28  # a fast input size: 60x80 frames become 28x42 network inputs
RNG = np.random.default_rng(0)


def frame(height, width):
    return RNG.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def engine(weights_dir):
    return Engine(weights_dir=weights_dir)


@pytest.fixture(scope="module")
def golden_engine(golden_weights_dir):
    return Engine(weights_dir=golden_weights_dir)


GOLDEN_CASES = json.loads(data_file("golden", "cases.json").read_text())["cases"]


def golden(name):
    return data_file("golden", name)


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=lambda case: case["output"])
def test_golden_cpu_fp32(golden_engine, case):
    image = read_image(golden(case["image"]))
    model_id = "vits" if case["model"] == "relative" else "vits-hypersim"
    (depth,) = golden_engine.infer([image], model_id, input_size=case["input_size"], max_depth=case.get("max_depth"))
    reference = np.load(golden(case["output"]))
    assert depth.shape == tuple(case["shape"]) and depth.dtype == np.float32
    assert rel_l2(depth, reference) < 1e-5


def test_tensor_path_matches_golden_on_cpu(golden_weights_dir):
    """The GPU pipeline (torch resize + normalise, batched upload) run on the CPU."""
    engine = Engine(weights_dir=golden_weights_dir, preprocess="torch")
    case = next(c for c in GOLDEN_CASES if c["input_size"] == 364 and c["model"] == "metric")
    (depth,) = engine.infer([read_image(golden(case["image"]))], "vits-hypersim", input_size=364, max_depth=20.0)
    assert rel_l2(depth, np.load(golden(case["output"]))) < 1e-4


# Heights 60 and 61 share the network size 28x42 at input_size 28; 80x60 and 35x35 do not.
MIXED_SIZES = [(60, 80), (80, 60), (61, 80), (60, 80), (35, 35)]


@pytest.fixture(scope="module")
def tensor_engine(weights_dir):
    """The GPU's pipeline (torch resize + normalise, batched upload) run on the CPU."""
    return Engine(weights_dir=weights_dir, preprocess="torch")


@pytest.mark.parametrize("tensor_path", [False, True], ids=["cv2", "tensor"])
def test_mixed_batch_equals_one_by_one(engine, tensor_engine, tensor_path):
    engine = tensor_engine if tensor_path else engine
    images = [frame(h, w) for h, w in MIXED_SIZES]
    forwards = []
    counting = engine.model("vits-hypersim").register_forward_pre_hook(lambda module, args: forwards.append(tuple(args[0].shape)))
    depths = [5.0, None, 7.0, 9.0, 11.0]
    try:
        together = engine.infer(images, "vits-hypersim", input_size=SMALL, max_depth=depths)
    finally:
        counting.remove()
    assert sorted(forwards) == sorted([(3, 3, 28, 42), (1, 3, 42, 28), (1, 3, 28, 28)])
    for image, max_depth, depth in zip(images, depths, together):
        (alone,) = engine.infer([image], "vits-hypersim", input_size=SMALL, max_depth=max_depth)
        assert depth.shape == image.shape[:2] and depth.dtype == np.float32 and depth.flags.c_contiguous
        np.testing.assert_allclose(depth, alone, rtol=1e-4, atol=1e-5 * (max_depth or 20.0))


def test_max_depth_scales_exactly(engine):
    image = frame(60, 80)

    def run(model_id, max_depth=None):
        return engine.infer([image], model_id, input_size=SMALL, max_depth=max_depth)[0]

    base = run("vits-hypersim")  # default range, 20 m
    assert 0 < base.max() <= 20.0
    np.testing.assert_array_equal(run("vits-hypersim", 40), 2 * base)
    np.testing.assert_array_equal(run("vits-hypersim", [10.0]), base / 2)
    # Same weights under the vkitti id, whose default range is 80 m.
    np.testing.assert_array_equal(run("vits-vkitti"), 4 * base)
    # Per-image values in one batch (batch position may change rounding, not the scale).
    default, tripled = engine.infer([image] * 2, "vits-hypersim", input_size=SMALL, max_depth=[None, 60.0])
    np.testing.assert_allclose(default, base, rtol=1e-5)
    np.testing.assert_allclose(tripled, 3 * base, rtol=1e-5)


@pytest.mark.parametrize("max_depth", [5.0, [None, 3.0]])
def test_relative_with_max_depth_is_bad_request(engine, max_depth):
    with pytest.raises(BadRequest, match="relative"):
        engine.infer([frame(60, 80)] * 2, "vits", input_size=SMALL, max_depth=max_depth)


def test_relative_accepts_all_none(engine):
    (depth,) = engine.infer([frame(60, 80)], "vits", input_size=SMALL, max_depth=[None])
    assert depth.shape == (60, 80) and depth.min() >= 0


@pytest.mark.parametrize("max_depth", [0.0, -1.0, float("nan"), float("inf"), True, "20", [1.0], [1.0, 2.0, 3.0]])
def test_bad_max_depth(engine, max_depth):
    with pytest.raises(BadRequest, match="max_depth"):
        engine.infer([frame(60, 80)] * 2, "vits-hypersim", input_size=SMALL, max_depth=max_depth)


@pytest.mark.parametrize("input_size", [0, 13, 15, 2072, 70.0, True, "518", None])
def test_bad_input_size(engine, input_size):
    with pytest.raises(BadRequest, match="input_size"):
        engine.infer([frame(60, 80)], "vits", input_size=input_size)


@pytest.mark.parametrize(
    "image", [np.zeros((60, 80), np.uint8), np.zeros((60, 80, 3), np.float32), np.zeros((0, 80, 3), np.uint8), b"jpeg"]
)
def test_bad_images(engine, image):
    with pytest.raises(BadRequest, match="image 1"):
        engine.infer([frame(60, 80), image], "vits", input_size=SMALL)


def test_empty_batch(engine):
    assert engine.infer([], "vits", input_size=SMALL) == []


def test_model_cache_is_per_model_not_per_size(weights_dir, monkeypatch):
    builds = []
    real_build = zdepth.engine.inference.build_model
    monkeypatch.setattr(zdepth.engine.inference, "build_model", lambda *a, **k: builds.append(a) or real_build(*a, **k))
    engine = Engine(weights_dir=weights_dir)
    assert engine.loaded == ()
    spec = engine.load("vits")
    assert spec.id == "vits" and not spec.metric and engine.loaded == ("vits",)
    model = engine.model("vits")
    assert engine.load("vits") is spec and engine.model("vits") is model
    engine.infer([frame(60, 80)], "vits", input_size=SMALL)
    engine.infer([frame(60, 80)], "vits", input_size=42)
    assert builds == [("vits",)]
    engine.warmup("vits-hypersim", sizes=[(30, 40)], input_size=14)
    assert engine.loaded == ("vits", "vits-hypersim") and len(builds) == 2
    assert next(model.parameters()).dtype == torch.float32 and not model.training


def test_unknown_model_and_missing_weights(engine, tmp_path):
    with pytest.raises(UnknownModel, match="vits-hypersim"):
        engine.infer([frame(60, 80)], "vitz", input_size=SMALL)
    with pytest.raises(WeightsNotFound, match="depth_anything_v2_vitb.pth"):
        Engine(weights_dir=tmp_path).load("vitb")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(precision="fp16"), "fp32"),
        (dict(precision="bf16"), "fp32"),
        (dict(precision="fp64"), "fp64"),
        (dict(device="nonsense"), "nonsense"),
        (dict(cuda_graphs=True), "CUDA graphs need a CUDA device"),
    ],
)
def test_bad_engine_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine(**kwargs)


def test_cpu_defaults_and_cuda_unavailable():
    engine = Engine()
    assert engine.precision == "fp32" and engine.dtype == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Engine(device="cuda")


def test_cpu_engine_decodes_encoded_jpegs_with_cv2(engine):
    """Off CUDA an EncodedJpeg is decoded on the CPU first: the same depth as its cv2-decoded array."""
    data = encode_jpeg(frame(60, 80))
    assert not engine.decodes_jpeg
    by_bytes, by_array = engine.infer([device_decodable_jpeg(data), decode_image(data)], "vits", input_size=SMALL)
    np.testing.assert_allclose(by_bytes, by_array, rtol=1e-5, atol=1e-6)


@pytest.fixture
def device_decoding_engine(weights_dir):
    """The CUDA pipeline run on the CPU: JPEGs decoded by torchvision's decoder (libjpeg-turbo here, nvjpeg on
    CUDA) inside the engine, then torch resize and normalise."""
    engine = Engine(weights_dir=weights_dir, preprocess="torch", jpeg_decoder="device")
    assert engine.decodes_jpeg
    return engine


def test_device_decoded_jpegs_match_cv2_decoded_arrays(device_decoding_engine):
    """The same depth whether the engine decodes a JPEG itself or gets cv2's pixels: the decoders agree
    and the colour order comes out the same (RGB from the decoder, BGR arrays flipped)."""
    sizes = [(60, 80), (60, 80), (35, 35), (61, 80)]
    jpegs = [encode_jpeg(frame(h, w)) for h, w in sizes] + [encode_jpeg(frame(60, 80)[:, :, 0])]  # the last one grey
    inputs = [device_decodable_jpeg(data) for data in jpegs]
    inputs.insert(1, decode_image(jpegs[1]))  # a decoded array among JPEGs of its size, in one upload
    expected_inputs = [decode_image(data) for data in [jpegs[0], *jpegs[1:]]]
    expected_inputs.insert(1, expected_inputs[1])
    max_depths = [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    depths = device_decoding_engine.infer(inputs, "vits-hypersim", input_size=SMALL, max_depth=max_depths)
    for depth, array, max_depth in zip(depths, expected_inputs, max_depths, strict=True):
        (expected,) = device_decoding_engine.infer([array], "vits-hypersim", input_size=SMALL, max_depth=max_depth)
        assert depth.shape == array.shape[:2]
        np.testing.assert_allclose(depth, expected, rtol=1e-4, atol=1e-5 * max_depth)
    swapped = device_decoding_engine.infer([expected_inputs[0][:, :, ::-1].copy()], "vits-hypersim", input_size=SMALL, max_depth=3.0)
    assert rel_l2(swapped[0], depths[0]) > 1e-3  # the comparison above would see a colour swap


def test_a_corrupt_jpeg_falls_back_to_cv2_and_fails_alone(device_decoding_engine):
    good = encode_jpeg(frame(60, 80))
    corrupt = good[:200] + bytes(len(good) - 202) + b"\xff\xd9"  # a valid header, zeros, the end marker
    (depth,) = device_decoding_engine.infer([device_decodable_jpeg(good)], "vits", input_size=SMALL)
    assert depth.shape == (60, 80)
    with pytest.raises(BadRequest, match="could not decode"):
        device_decoding_engine.infer([device_decodable_jpeg(good), device_decodable_jpeg(corrupt)], "vits", input_size=SMALL)
    assert device_decoding_engine.decodes_jpeg  # one bad file does not turn the decoder off


def test_a_decoder_that_keeps_failing_is_switched_off(weights_dir, monkeypatch):
    def broken(data, **options):
        raise RuntimeError("nvjpeg is not available")

    monkeypatch.setattr("torchvision.io.decode_jpeg", broken)  # what the engine's device decoder calls
    device_decoding_engine = Engine(weights_dir=weights_dir, preprocess="torch", jpeg_decoder="device")
    data = encode_jpeg(frame(60, 80))
    (expected,) = device_decoding_engine.infer([decode_image(data)], "vits", input_size=SMALL)
    for _ in range(zdepth.engine.jpeg.DECODER_STRIKES):
        assert device_decoding_engine.decodes_jpeg  # one odd JPEG, or a few, do not turn it off
        (depth,) = device_decoding_engine.infer([device_decodable_jpeg(data)], "vits", input_size=SMALL)
        np.testing.assert_array_equal(depth, expected)  # cv2 decoded it
    assert not device_decoding_engine.decodes_jpeg


# --- CUDA: skipped where there is none ------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def photos():
    return [read_image(data_file("demo01.jpg")), read_image(data_file("demo04.jpg")), read_image(golden("frame_240x320.png"))]


# The issue bounds fp16 (2e-3). bf16 keeps 8 mantissa bits: 1.1e-2 measured for vits on an H200.
@pytest.mark.parametrize("precision, tolerance", [("fp16", 2e-3), ("bf16", 2e-2)])
@pytest.mark.parametrize("model_id", ["vits", "vits-hypersim"])
@pytest.mark.gpu
@needs_cuda
def test_cuda_half_close_to_fp32(golden_weights_dir, photos, precision, tolerance, model_id):
    reference = Engine(device="cuda", precision="fp32", weights_dir=golden_weights_dir).infer(photos, model_id)
    half = Engine(device="cuda", precision=precision, weights_dir=golden_weights_dir).infer(photos, model_id)
    for got, ref in zip(half, reference):
        assert got.shape == ref.shape and got.dtype == np.float32
        assert rel_l2(got, ref) <= tolerance


@pytest.mark.gpu
@needs_cuda
def test_cuda_matches_golden(golden_weights_dir):
    engine = Engine(device="cuda", weights_dir=golden_weights_dir)
    assert engine.precision == "fp16"
    for case in GOLDEN_CASES:
        model_id = "vits" if case["model"] == "relative" else "vits-hypersim"
        (depth,) = engine.infer([read_image(golden(case["image"]))], model_id, input_size=case["input_size"])
        assert rel_l2(depth, np.load(golden(case["output"]))) < 3e-3, case["output"]


@pytest.mark.gpu
@needs_cuda
def test_cuda_mixed_batch_order(weights_dir):
    engine = Engine(device="cuda", weights_dir=weights_dir)
    images = [frame(h, w) for h, w in MIXED_SIZES]
    together = engine.infer(images, "vits-hypersim", input_size=SMALL, max_depth=[5.0, None, 7.0, 9.0, 11.0])
    for image, max_depth, depth in zip(images, [5.0, None, 7.0, 9.0, 11.0], together):
        (alone,) = engine.infer([image], "vits-hypersim", input_size=SMALL, max_depth=max_depth)
        assert depth.shape == image.shape[:2]
        assert rel_l2(depth, alone) < 2e-3


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_cuda_compile(golden_weights_dir, photos):
    eager = Engine(device="cuda", weights_dir=golden_weights_dir).infer(photos[2:], "vits")
    engine = Engine(device="cuda", weights_dir=golden_weights_dir, compile=True)
    engine.warmup("vits", sizes=[photos[2].shape[:2]])
    (depth,) = engine.infer(photos[2:], "vits")
    assert rel_l2(depth, eager[0]) < 2e-3


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("gpu_decode, tolerance", [(False, 1e-2), (True, 3e-2)], ids=["cv2-decode", "nvjpeg"])
def test_cuda_fast_path_close_to_the_fp32_reference(golden_weights_dir, gpu_decode, tolerance):
    """The accuracy guard: JPEG bytes through the fast path (GPU preprocessing, fp16, CUDA graphs, one
    batch) against the reference (cv2 decode and preprocessing, fp32, one image at a time): 1e-2 as
    served by default. With nvjpeg (opt-in) its different chroma upsampling adds up to ~2e-2."""
    files = [data_file(name).read_bytes() for name in ("demo01.jpg", "demo04.jpg")]
    fast_engine = Engine(device="cuda", weights_dir=golden_weights_dir, cuda_graphs=True, gpu_decode=gpu_decode)
    inputs = [device_decodable_jpeg(data) for data in files]
    assert all(isinstance(item, EncodedJpeg) for item in inputs) and fast_engine.decodes_jpeg == gpu_decode
    reference_engine = Engine(device="cuda", precision="fp32", weights_dir=golden_weights_dir, preprocess="cv2")
    for model_id in ("vits", "vits-hypersim"):
        fast = fast_engine.infer(inputs, model_id)
        for depth, data in zip(fast, files, strict=True):
            (reference,) = reference_engine.infer([decode_image(data)], model_id)
            assert depth.shape == reference.shape
            assert rel_l2(depth, reference) <= tolerance
    assert fast_engine.decodes_jpeg == gpu_decode  # nvjpeg, when on, decoded them without falling back to cv2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("model_id, max_depth", [("vits", None), ("vits-hypersim", [5.0, 10.0, 15.0, 20.0, 25.0])])
def test_cuda_graphs_match_eager(weights_dir, model_id, max_depth):
    eager = Engine(device="cuda", weights_dir=weights_dir)
    graphed = Engine(device="cuda", weights_dir=weights_dir, cuda_graphs=True)
    images = [frame(60, 80) for _ in range(5)]
    for count in (1, 3, 5, 1, 5):  # 3 and 5 run padded to 4 and 8; repeats replay the graphs
        depths = max_depth[:count] if max_depth else None
        expected = eager.infer(images[:count], model_id, input_size=SMALL, max_depth=depths)
        got = graphed.infer(images[:count], model_id, input_size=SMALL, max_depth=depths)
        for a, b in zip(got, expected, strict=True):
            assert rel_l2(a, b) < 2e-3
    assert graphed.captured_graphs(model_id) == 3  # batches 1, 4 and 8


def test_auto_is_the_first_gpu_or_the_cpu(weights_dir):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert Engine(device="auto", weights_dir=weights_dir).device.type == expected
    assert resolve_device(None) == resolve_device("auto") == ("cuda:0" if expected == "cuda" else "cpu")
    assert resolve_device("cpu") == "cpu"
