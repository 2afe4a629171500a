"""The inference forward of an annealed model (every `attn_mask_probs` 0) compiles as one graph and exports with
dynamic batch, height and width, for both backbone families; compiled and exported programs equal eager."""

import pytest
import torch
from tiny_eomt import TINY
from torch.export import Dim

from modeling_eomt import (
    EomtConfig,
    EomtDinov3Config,
    EomtDinov3ForUniversalSegmentation,
    EomtForUniversalSegmentation,
)


def annealed_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "dinov3":
        model = EomtDinov3ForUniversalSegmentation(EomtDinov3Config(**TINY, intermediate_size=64))
    else:
        model = EomtForUniversalSegmentation(EomtConfig(**TINY))
    model.eval().set_attn_mask_probs([0.0] * TINY["num_blocks"])
    return model


@pytest.mark.parametrize("family", ["dinov2", "dinov3"])
def test_fullgraph_compile_equals_eager(family):
    # fullgraph=True raises at the first graph break; aot_eager traces exactly what inductor would receive.
    model = annealed_model(family)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for shape in ((2, 3, 64, 64), (1, 3, 48, 80)):
        pixels = torch.randn(shape)
        with torch.no_grad():
            got, want = compiled(pixels), model(pixels)
        torch.testing.assert_close(got.masks_queries_logits, want.masks_queries_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.class_queries_logits, want.class_queries_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["dinov2", "dinov3"])
def test_export_with_dynamic_batch_height_and_width(family):
    model = annealed_model(family)
    rows, cols = Dim("rows", min=1, max=128), Dim("cols", min=1, max=128)
    dynamic = {"pixel_values": {0: Dim("batch", min=1, max=64), 2: 16 * rows, 3: 16 * cols}}
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=dynamic)
    exported = program.module()
    for shape in ((1, 3, 64, 64), (3, 3, 48, 80), (2, 3, 96, 32)):  # other batch sizes, square and non-square
        pixels = torch.randn(shape)
        with torch.no_grad():
            got, want = exported(pixels), model(pixels)
        torch.testing.assert_close(got["masks_queries_logits"], want.masks_queries_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["class_queries_logits"], want.class_queries_logits, atol=1e-5, rtol=1e-5)
