"""MultiCropModel: one backbone pass per view resolution, and what it refuses."""

import pytest
import torch

from dinokit.models.backbones import build_backbone
from dinokit.models.head import DINOHead
from dinokit.models.multicrop import MultiCropModel
from dinokit.models.vit import vit


def test_multicrop_model_one_backbone_pass_per_resolution():
    backbone = vit("vit_tiny", patch_size=8, img_size=32).eval()
    calls = []
    backbone.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape))
    model = MultiCropModel(backbone, DINOHead(192, 50, 32, 16))
    views = [torch.randn(3, 3, 32, 32)] * 2 + [torch.randn(3, 3, 16, 16)] * 4
    out = model(views)
    assert out.shape == (18, 50)
    assert calls == [(6, 3, 32, 32), (12, 3, 16, 16)]
    assert torch.allclose(out[:3], model.head(backbone(views[0])), atol=1e-5)


@pytest.mark.parametrize("views", [
    [],
    [torch.randn(3, 32, 32), torch.randn(3, 32, 32)],  # the views of one image, not a batch
    [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)],  # silently (5 x K) logits before
    [[torch.randn(3, 32, 32)] * 2],  # a list per image
])
def test_views_that_are_not_a_batch_are_refused_with_one_message(views):
    model = MultiCropModel(vit("vit_tiny", patch_size=8, img_size=32), DINOHead(192, 50, 32, 16))
    with pytest.raises(ValueError, match="views must be a non-empty list of B x 3 x H x W tensors with the same B"):
        model(views)


def test_views_as_a_tuple_or_generator_equal_a_list():
    model = MultiCropModel(vit("vit_tiny", patch_size=8, img_size=32).eval(), DINOHead(192, 50, 32, 16))
    views = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    with torch.no_grad():
        expected = model(views)
        assert torch.allclose(model(tuple(views)), expected) and torch.allclose(model(v for v in views), expected)


def test_integer_images_are_refused_whatever_the_backbone():
    resnet = MultiCropModel(build_backbone("resnet18"), DINOHead(512, 50, 32, 16))  # a conv dtype error before
    with pytest.raises(ValueError, match="images must be floating point, normalised .* got torch.uint8"):
        resnet([torch.zeros(2, 3, 32, 32, dtype=torch.uint8)])
