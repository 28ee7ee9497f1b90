"""Our ViT and timm's VisionTransformer load each other's weights and give the same features."""

from __future__ import annotations

import inspect

import pytest
import torch

timm = pytest.importorskip("timm")

from dinokit.hub.load import load_backbone  # noqa: E402
from dinokit.models.vit import vit  # noqa: E402
from tests.hub.test_load import randomised  # noqa: E402


def timm_vit(name: str, **kwargs) -> torch.nn.Module:
    """timm's ViT in DINO's configuration, spelled out: [CLS] token, no register tokens, [CLS]
    pooling after the final norm (no fc_norm), LayerNorm eps 1e-6, qkv bias, no layer scale."""
    if "final_norm" in inspect.signature(timm.models.vision_transformer.VisionTransformer).parameters:
        kwargs["final_norm"] = True  # a switch since timm 1.0; before, the final norm came with fc_norm=False
    model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="token", class_token=True,
                              reg_tokens=0, no_embed_class=False, qkv_bias=True, init_values=None, fc_norm=False,
                              pre_norm=False, dynamic_img_size=False, **kwargs)
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    return model.eval()


@pytest.mark.parametrize("arch, patch, img, name", [
    ("vit_small", 16, 224, "vit_small_patch16_224"),
    ("vit_small", 8, 64, "vit_small_patch8_224"),
])
def test_timm_runs_our_weights(arch, patch, img, name):
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(0))
    ours = randomised(vit(arch, patch_size=patch, img_size=img), 0)
    theirs = timm_vit(name, img_size=img)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert (theirs(x) - ours(x)).abs().max() < 1e-5
        assert (theirs.forward_features(x)[:, 0] - ours(x)).abs().max() < 1e-5  # [CLS] after the final norm


def test_ours_runs_timm_weights():
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    theirs = randomised(timm_vit("vit_small_patch8_224", img_size=64), 1)
    ours = vit("vit_small", patch_size=8, img_size=64).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        assert (theirs(x) - ours(x)).abs().max() < 1e-5


def test_load_backbone_reads_a_timm_checkpoint(tmp_path):
    theirs = randomised(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32), 2)
    torch.save(theirs.state_dict(), tmp_path / "timm_vit_tiny.pth")
    ours = load_backbone(tmp_path / "timm_vit_tiny.pth")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (theirs.forward_head(theirs.forward_features(x), pre_logits=True) - ours(x)).abs().max() < 1e-5
