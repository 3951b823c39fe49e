"""CUDA graphs for the forward pass: the padding rule everywhere, capture and replay on a GPU only."""

import pytest
import torch

from zdepth.engine.cudagraphs import GraphedForward, padded_batch


def test_batches_pad_to_powers_of_two():
    assert [padded_batch(n) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 16]
    with pytest.raises(ValueError, match="batch size"):
        padded_batch(0)


def test_off_cuda_the_model_is_called_as_is():
    calls = []

    def model(x, scale):
        calls.append((tuple(x.shape), scale))
        return x.sum(dim=1)

    graphed = GraphedForward(model)
    out = graphed(torch.ones(3, 2, 4), None)
    assert calls == [((3, 2, 4), None)] and out.shape == (3, 4) and graphed.captured == 0


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_replays_match_eager_and_captures_once_per_padded_shape():
    layer = torch.nn.Linear(4, 3).cuda().eval()

    def model(x, scale):
        y = layer(x).sum(dim=-1)
        return y if scale is None else y * scale

    graphed = GraphedForward(model, max_graphs=3)
    with torch.inference_mode():
        for count in (1, 3, 4, 3, 1):
            x = torch.randn(count, 4, device="cuda")
            scale = torch.rand(count, device="cuda") + 0.5
            torch.testing.assert_close(graphed(x, scale).clone(), model(x, scale))
        assert graphed.captured == 2  # batches 1 and 4
        x = torch.randn(5, 4, device="cuda")
        torch.testing.assert_close(graphed(x, None).clone(), model(x, None))  # a third graph: 8, no scale
        y = torch.randn(2, 4, device="cuda")
        torch.testing.assert_close(graphed(y, None).clone(), model(y, None))  # past max_graphs: eager
        assert graphed.captured == 3
