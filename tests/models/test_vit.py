import pytest
import torch
import torch.nn.functional as F

from dinokit.models.backbones import UnknownArchError, build_backbone
from dinokit.models.vit import VisionTransformer, vit

OFFICIAL_KEYS = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
BLOCK_KEYS = {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
              "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"}


def test_official_key_names_and_sizes():
    for name, dim, heads in (("vit_tiny", 192, 3), ("vit_small", 384, 6), ("vit_base", 768, 12)):
        with torch.device("meta"):
            model = vit(name, patch_size=16)
        keys = set(model.state_dict())
        assert keys == OFFICIAL_KEYS | {f"blocks.{i}.{k}" for i in range(12) for k in BLOCK_KEYS}
        assert model.embed_dim == dim and model.num_heads == heads and model.blocks[0].norm1.eps == 1e-6
        assert model.blocks[0].mlp.fc1.out_features == 4 * dim


def test_outputs_for_square_and_non_square_inputs():
    model = vit("vit_tiny", patch_size=8, img_size=32).eval()
    for h, w in ((32, 32), (48, 24), (16, 40)):
        x = torch.randn(2, 3, h, w)
        tokens = 1 + (h // 8) * (w // 8)
        assert model(x).shape == (2, 192)
        assert model.forward_features(x).shape == (2, tokens, 192)
        attn = model.get_last_selfattention(x)
        assert attn.shape == (2, 3, tokens, tokens)
        assert torch.allclose(attn.sum(-1), torch.ones(2, 3, tokens), atol=1e-5)
        layers = model.get_intermediate_layers(x, n=4)
        assert len(layers) == 4 and torch.allclose(layers[-1][:, 0], model(x), atol=1e-5)


def test_forward_runs_the_last_block_for_cls_alone_with_the_same_values_and_gradients():
    """``forward`` computes the last block for [CLS] only; in float64 its output and every
    parameter's gradient equal those of ``forward_features(x)[:, 0]``, in training (the same
    stochastic-depth draws under the same seed) and in eval, for both sequence lengths of a
    DINO step; and the forward does ~7% fewer FLOPs (of 12 blocks, the last one at ~1/6 its cost)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = vit("vit_tiny", patch_size=4, img_size=32, drop_path_rate=0.2).double()
    params = list(model.parameters())
    for side in (32, 16):
        x = torch.randn(4, 3, side, side, dtype=torch.float64)
        for training in (True, False):
            model.train(training)
            outputs, grads = [], []
            for forward in (model, lambda images: model.forward_features(images)[:, 0]):
                torch.manual_seed(1)
                out = forward(x)
                outputs.append(out)
                grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, 192, dtype=out.dtype)).sum(), params))
            assert outputs[0].shape == (4, 192)
            assert torch.allclose(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
            for fast, full in zip(*grads):
                assert torch.allclose(fast, full, rtol=1e-9, atol=1e-12)
    model.eval().float()
    flops = []
    for forward in (model, model.forward_features):
        with FlopCounterMode(display=False) as counter:
            forward(torch.randn(2, 3, 32, 32))
        flops.append(counter.get_total_flops())
    assert flops[0] < 0.94 * flops[1]  # 12 blocks: the last one was ~1/12 of the whole


def test_grad_checkpointing_keeps_a_sixteenth_of_the_activations_for_the_same_values_and_gradients():
    """With ``set_grad_checkpointing`` each block keeps only its input for the backward pass: the
    forward saves ~1/16 of the bytes (parameters aside), and the output and every gradient are
    the same, stochastic-depth draws included."""
    torch.manual_seed(0)
    model = vit("vit_tiny", patch_size=4, img_size=32, drop_path_rate=0.2).double().train()
    params = list(model.parameters())
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        saved = {}  # storage -> bytes, of what the forward keeps for the backward

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in param_storages:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, 192, dtype=out.dtype)).sum(), params)
        results.append((out, grads, sum(saved.values())))
    (out, grads, kept), (out_ckpt, grads_ckpt, kept_ckpt) = results
    assert kept_ckpt < kept / 12
    assert torch.equal(out, out_ckpt)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ckpt))


def test_pos_embed_interpolation_is_bicubic_and_identity_at_native_size():
    model = vit("vit_tiny", patch_size=4, img_size=16)  # 4 x 4 grid
    assert model.interpolate_pos_encoding(4, 4) is model.pos_embed
    pe = model.interpolate_pos_encoding(6, 3)
    assert pe.shape == (1, 1 + 18, 192)
    grid = model.pos_embed[:, 1:].reshape(1, 4, 4, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 3), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 18, 192)
    assert torch.allclose(pe[:, 1:], expected) and torch.equal(pe[:, :1], model.pos_embed[:, :1])


def test_sdpa_attention_equals_explicit_softmax():
    model = vit("vit_tiny", patch_size=8, img_size=32).eval()
    block = model.blocks[0]
    x = torch.randn(2, 17, 192)
    attn = block.attn.attention_map(x)
    _, _, v = block.attn._qkv(x)
    explicit = block.attn.proj((attn @ v).transpose(1, 2).flatten(2))
    assert torch.allclose(block.attn(x), explicit, atol=1e-5)


def test_bf16_attention_on_cpu_is_written_out_for_short_sequences(monkeypatch):
    """In bf16 on a CPU, up to CPU_BF16_EXPLICIT_MAX_TOKENS the attention is computed by hand
    (softmax in fp32), beyond it by scaled_dot_product_attention; both equal fp32 to bf16 tolerance."""
    import dinokit.models.vit as vit_module

    torch.manual_seed(0)
    attn = vit("vit_tiny", patch_size=8, img_size=32).blocks[0].attn
    calls, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(vit_module.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape[-2]) or sdpa(*a, **k))
    for tokens in (17, vit_module.CPU_BF16_EXPLICIT_MAX_TOKENS + 1):
        x = torch.randn(2, tokens, 192, requires_grad=True)
        expected = attn(x)
        (grad_fp32,) = torch.autograd.grad(expected.square().sum(), x)
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x)
        assert out.dtype == torch.bfloat16
        assert calls == ([] if tokens <= vit_module.CPU_BF16_EXPLICIT_MAX_TOKENS else [tokens])
        (grad_bf16,) = torch.autograd.grad(out.float().square().sum(), x)
        assert torch.allclose(out.float(), expected, atol=0.02, rtol=0.02)
        assert torch.allclose(grad_bf16, grad_fp32, atol=0.05 * grad_fp32.abs().max().item())


def test_fp32_attention_on_cpu_is_written_out_when_trained_through_short_sequences(monkeypatch):
    """In float32 on a CPU the attention is computed by hand when gradients flow through it and
    the sequence has at most CPU_FP32_TRAINING_EXPLICIT_MAX_TOKENS tokens; without gradients
    (the teacher) and for longer sequences by scaled_dot_product_attention. Same values and
    gradients either way."""
    import dinokit.models.vit as vit_module

    torch.manual_seed(0)
    attn = vit("vit_tiny", patch_size=8, img_size=32).blocks[0].attn
    calls, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(vit_module.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape[-2]) or sdpa(*a, **k))
    longest = vit_module.CPU_FP32_TRAINING_EXPLICIT_MAX_TOKENS
    for tokens in (17, longest, longest + 1):
        x = torch.randn(2, tokens, 192, requires_grad=True)
        calls.clear()
        out = attn(x)
        assert calls == ([] if tokens <= longest else [tokens])
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        calls.clear()
        with torch.no_grad():
            assert torch.allclose(attn(x), out, atol=1e-5)
        assert calls == [tokens]
        with monkeypatch.context() as m:  # the fused kernel everywhere: the reference
            m.setattr(vit_module, "_explicit_attention", lambda q: False)
            reference = attn(x)
            (grad_reference,) = torch.autograd.grad(reference.square().sum(), x)
        assert torch.allclose(out, reference, atol=1e-5)
        assert torch.allclose(grad, grad_reference, atol=1e-5)


def test_residual_with_drop_path_equals_torchvision_stochastic_depth():
    """add_residual(x, b, p) is x + stochastic_depth(b, p, "row"): the same mask from the same
    random numbers, the same gradients; p = 0 is a plain sum."""
    from torchvision.ops import stochastic_depth

    from dinokit.models.vit import add_residual

    x = torch.randn(64, 5, 8, requires_grad=True)
    branch = torch.randn(64, 5, 8, requires_grad=True)
    torch.manual_seed(3)
    out = add_residual(x, branch, 0.3)
    grads = torch.autograd.grad(out.square().sum(), (x, branch))
    torch.manual_seed(3)
    expected = x + stochastic_depth(branch, 0.3, "row")
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, branch))
    assert torch.allclose(out, expected)
    assert all(torch.allclose(g, e) for g, e in zip(grads, expected_grads))
    kept = (out - x).flatten(1).abs().sum(1) > 0
    assert 0 < kept.sum() < 64  # some rows dropped, some kept (64 rows, p = 0.3)
    assert torch.allclose((out - x)[kept], branch[kept] / 0.7, atol=1e-6)
    assert torch.equal(add_residual(x, branch, 0.0), x + branch)


def test_drop_path_rises_linearly_and_is_off_in_eval():
    model = vit("vit_tiny", patch_size=8, img_size=32, drop_path_rate=0.1)
    rates = [b.drop_path for b in model.blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.equal(a, model(x))


def test_size_not_multiple_of_patch_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit("vit_tiny", patch_size=8, img_size=32)(torch.randn(1, 3, 30, 32))


def test_registry_resnet_timm_and_unknown():
    resnet = build_backbone("resnet18")
    assert resnet.num_features == 512 and resnet(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    tm = build_backbone("timm:vit_tiny_patch16_224", img_size=32)
    assert tm.num_features == 192 and tm(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    assert isinstance(build_backbone("vit_small", patch_size=8, img_size=64), VisionTransformer)
    with pytest.raises(UnknownArchError, match="vit_small"):
        build_backbone("vit_giant")
    with pytest.raises(UnknownArchError, match="timm has no model"):
        build_backbone("timm:not_a_model")


@pytest.mark.parametrize("images, match", [
    (torch.randn(3, 32, 32), r"B x 3 x H x W, got shape \(3, 32, 32\) \(one image\? add the batch dimension"),
    (torch.randn(2, 32, 32, 3), r"B x 3 x H x W, got shape \(2, 32, 32, 3\)$"),  # channels last
    (torch.randn(2, 1, 32, 32), r"B x 3 x H x W, got shape \(2, 1, 32, 32\)$"),  # grey
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "images must be floating point, normalised .* got torch.uint8"),
])
def test_images_of_the_wrong_shape_or_dtype_are_refused_with_one_message(images, match):
    model = vit("vit_tiny", patch_size=8, img_size=32)
    for method in (model, model.forward_features, model.get_last_selfattention):
        with pytest.raises(ValueError, match=match):
            method(images)


def test_a_patch_of_no_pixels_is_refused():
    with pytest.raises(ValueError, match="patch_size must be at least 1 pixel, got 0"):
        vit("vit_tiny", patch_size=0)
