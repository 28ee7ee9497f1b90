"""The fast paths compute what the plain paths compute: bf16 autocast, torch.compile (backbone and loss), activation
checkpointing, multi-tensor
(and, on CUDA, fused) AdamW, CUDA-event phase timing, pinned batches. GPU-only checks skip
without CUDA. (The multi-tensor EMA is checked in tests/method/test_teacher.py.)"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinokit.config import TrainConfig
from dinokit.method.schedules import StepHyperparameters
from dinokit.models.head import DINOHead
from dinokit.models.multicrop import MultiCropModel
from dinokit.models.vit import VisionTransformer
from dinokit.train.devices import autocast_for
from dinokit.train.loop import build_state
from dinokit.train.optim import build_optimizer, param_groups, set_hyperparameters

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tiny_cfg(**changes) -> TrainConfig:
    values = dict(arch="vit_tiny", patch_size=8, global_crops_size=16, local_crops_size=8, local_crops_number=2,
                  out_dim=256, head_hidden_dim=64, head_bottleneck_dim=32, batch_size=4, device="cpu",
                  drop_path_rate=0.0)
    return TrainConfig.build({**values, **changes})


def _views(cfg: TrainConfig, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sides = [cfg.global_crops_size] * 2 + [cfg.local_crops_size] * cfg.local_crops_number
    return [torch.randn(cfg.batch_size, 3, s, s, generator=g).to(device) for s in sides]


def _loss_and_grads(precision: str, device: torch.device, **changes):
    cfg = _tiny_cfg(precision=precision, device=str(device), **changes)
    state = build_state(cfg, device)
    views = _views(cfg, device)
    with autocast_for(device, cfg.precision):
        teacher_logits = state.teacher(views[:2])
        student_logits = state.student(views)
    loss, _ = state.loss(student_logits, teacher_logits, 0.04)
    loss.backward()
    grads = torch.cat([p.grad.flatten().float() for p in state.student.parameters() if p.grad is not None])
    return student_logits.dtype, loss.detach().float(), grads


def _check_bf16_matches_fp32(device: torch.device) -> None:
    dtype32, loss32, grads32 = _loss_and_grads("fp32", device)
    dtype16, loss16, grads16 = _loss_and_grads("bf16", device)
    assert dtype32 == torch.float32 and dtype16 == torch.bfloat16  # the bf16 path really ran
    assert torch.isclose(loss16, loss32, rtol=1e-2), (loss16.item(), loss32.item())
    assert F.cosine_similarity(grads16, grads32, dim=0) > 0.98


def test_bf16_autocast_gives_the_fp32_loss_on_the_cpu():
    _check_bf16_matches_fp32(torch.device("cpu"))


def _check_grad_checkpointing_changes_nothing(device: torch.device, precision: str) -> None:
    """The student's blocks recomputed in the backward give the step's loss and gradients (with
    stochastic depth: the same draws)."""
    plain = _loss_and_grads(precision, device, drop_path_rate=0.3)
    recomputed = _loss_and_grads(precision, device, drop_path_rate=0.3, grad_checkpointing=True)
    assert torch.equal(plain[1], recomputed[1])
    assert torch.allclose(plain[2], recomputed[2], rtol=1e-5, atol=1e-7)


def test_grad_checkpointing_gives_the_same_step_on_the_cpu():
    _check_grad_checkpointing_changes_nothing(torch.device("cpu"), "fp32")


@cuda
def test_grad_checkpointing_gives_the_same_step_on_cuda_in_bf16():
    _check_grad_checkpointing_changes_nothing(torch.device("cuda"), "bf16")


def test_grad_checkpointing_needs_a_backbone_that_can_recompute():
    from dinokit.config import ConfigError

    assert build_state(_tiny_cfg(arch="timm:resnet18", grad_checkpointing=True), torch.device("cpu"))
    with pytest.raises(ConfigError, match="resnet18 cannot recompute its activations; timm's ResNets can"):
        build_state(_tiny_cfg(arch="resnet18", grad_checkpointing=True), torch.device("cpu"))


@cuda
def test_bf16_autocast_gives_the_fp32_loss_on_cuda():
    _check_bf16_matches_fp32(torch.device("cuda"))


def _reference_adamw(model: nn.Module) -> torch.optim.AdamW:
    """The plain per-parameter loop implementation, with the same groups."""
    return torch.optim.AdamW(param_groups(model), lr=0.0, weight_decay=0.0, foreach=False, fused=False)


def _check_adamw_matches_reference(device: torch.device) -> None:
    torch.manual_seed(0)
    fast_model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3)).to(device)
    ref_model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3)).to(device)
    ref_model.load_state_dict(fast_model.state_dict())
    fast, ref = build_optimizer(fast_model, device), _reference_adamw(ref_model)
    initial = fast_model[0].weight.detach().clone()
    for step in range(4):
        grads = [torch.randn_like(p) for p in fast_model.parameters()]
        for model, opt in ((fast_model, fast), (ref_model, ref)):
            set_hyperparameters(opt, lr=0.01 * (step + 1), weight_decay=0.1 * step)
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(fast_model.parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(fast_model[0].weight, initial, atol=1e-3)  # the steps did move it


def test_multi_tensor_adamw_equals_the_per_parameter_loop():
    opt = build_optimizer(nn.Linear(2, 2), torch.device("cpu"))
    assert opt.defaults["foreach"] or opt.defaults["fused"]
    _check_adamw_matches_reference(torch.device("cpu"))


@cuda
def test_fused_adamw_on_cuda_equals_the_per_parameter_loop():
    assert build_optimizer(nn.Linear(2, 2).cuda(), torch.device("cuda")).defaults["fused"]
    _check_adamw_matches_reference(torch.device("cuda"))


@pytest.mark.slow  # torch.compile of a forward and a backward takes a minute or more on 2 cores
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])  # CPU C++ or GPU Triton kernels
def test_compiled_backbone_and_head_give_the_eager_outputs_and_gradients(device):
    torch.manual_seed(0)
    backbone = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    eager = MultiCropModel(backbone, DINOHead(32, 64, 32, 16)).to(device)
    compiled = MultiCropModel(VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2),
                              DINOHead(32, 64, 32, 16)).to(device)
    compiled.load_state_dict(eager.state_dict())
    compiled.backbone.compile()  # as DINOState.compile("all"): one graph per resolution
    compiled.head.compile()
    views = [torch.randn(2, 3, 16, 16).to(device), torch.randn(2, 3, 16, 16).to(device),
             torch.randn(2, 3, 8, 8).to(device)]
    outputs = []
    for model in (eager, compiled):
        logits = model(views)
        (logits.square().mean()).backward()
        outputs.append((logits.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(outputs[0][0], outputs[1][0], atol=1e-5)
    for a, b in zip(outputs[0][1], outputs[1][1]):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_compiled_loss_gives_the_eager_loss_and_gradient_without_recompiling(device):
    """As dinokit train --compile compiles it: the teacher temperature changes every step of its
    warm-up, which must not make a graph per step."""
    from torch._dynamo.utils import counters

    from dinokit.method.loss import DINOLoss

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = DINOLoss(256).to(device), DINOLoss(256).to(device)
    compiled.compile()
    g = torch.Generator().manual_seed(0)
    for temperature in (0.04, 0.045, 0.05, 0.06, 0.07):
        student = torch.randn(8 * 4, 256, generator=g).to(device)
        teacher = torch.randn(2 * 4, 256, generator=g).to(device)
        results = []
        for loss_fn in (eager, compiled):
            logits = student.clone().requires_grad_()
            loss, stats = loss_fn(logits, teacher, temperature)
            loss.backward()
            results.append((loss.detach(), stats["teacher_entropy"], logits.grad))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert counters["stats"]["unique_graphs"] <= 2  # the first temperature, then one graph for any


@cuda
def test_cuda_phase_timer_and_mfu():
    from dinokit.train.bench import run_bench

    result = run_bench(_tiny_cfg(device="cuda"), steps=2, warmup=1, data="synthetic", measure_data=False)
    assert all(result.phases_ms[p] > 0 for p in ("teacher_forward", "student_forward", "backward", "optimizer"))
    assert result.memory_kind == "cuda_max_memory_allocated" and result.peak_memory_mib > 0
    assert 0 < result.mfu < 1
    assert 0 < result.gpu_busy <= 1.1  # per step under the profiler, over the step's time without it


@cuda
def test_cuda_peak_memory_is_that_of_the_timed_steps(monkeypatch):
    """Not that of the eager step that counts the FLOPs before them (with compile=all the compiled
    steps may need less) nor of compiling: 1 GiB held while the FLOPs are counted is not in it."""
    from dinokit.train import bench

    count = bench.count_step_flops

    def count_holding_a_gib(*args):
        held = torch.empty(2**30, dtype=torch.uint8, device="cuda")
        return count(*args) + 0 * held.numel()

    monkeypatch.setattr(bench, "count_step_flops", count_holding_a_gib)
    result = bench.run_bench(_tiny_cfg(device="cuda"), steps=1, warmup=1, data="synthetic", measure_data=False)
    assert 0 < result.peak_memory_mib < 1024


@cuda
def test_pipeline_batches_are_pinned_for_cuda(textures_dir):
    from dinokit.train.bench import pipeline_loader

    batch = next(iter(pipeline_loader(_tiny_cfg(data=str(textures_dir), device="cuda"), 0, torch.device("cuda"))))
    assert all(v.is_pinned() for v in batch.tensors)


def test_a_training_step_reads_no_value_on_the_device():
    """The step on PyTorch's ``meta`` device, which has shapes and no values: every op that would
    make the host wait for a GPU to know a value (``item``, a tensor in an ``if``, ``nonzero``)
    raises there. Forward, loss, backward, clipping, the optimizer's decision to step (given to a
    fused optimizer as ``found_inf``), EMA and centre get through; the fused kernel itself has no
    ``meta`` version and is left out. Runs everywhere; on a GPU the next test checks the same."""
    from dinokit.train.loop import train_step

    device = torch.device("meta")
    cfg = _tiny_cfg(drop_path_rate=0.1)
    state = build_state(cfg, device)
    for group in state.optimizer.param_groups:
        group["fused"] = True  # as on a GPU
    state.optimizer.step = lambda: None
    metrics = train_step(state, _views(cfg, device), StepHyperparameters.mid_run(cfg), cfg, state.student,
                         autocast_for(device, cfg.precision))
    assert metrics["finite"].device.type == "meta" and state.optimizer.found_inf.device.type == "meta"


@cuda
def test_a_training_step_never_waits_for_the_gpu():
    from dinokit.train.loop import train_step

    device = torch.device("cuda")
    cfg = _tiny_cfg(device="cuda")
    state = build_state(cfg, device)
    views, hp, autocast = _views(cfg, device), StepHyperparameters.mid_run(cfg), autocast_for(device, cfg.precision)
    train_step(state, views, hp, cfg, state.student, autocast)  # first step: lazy state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        metrics = train_step(state, views, hp, cfg, state.student, autocast)
        skipped = train_step(state, [v * float("inf") for v in views], hp, cfg, state.student, autocast)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert metrics["finite"].item() == 1 and skipped["finite"].item() == 0
