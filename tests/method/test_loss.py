import math

import pytest
import torch

from dinokit.method.loss import DINOLoss


def direct_loss(student, teacher, center, tau_s, tau_t, n_teacher_views=2):
    """The recipe written out: mean over pairs (q, v != q) of batch-mean cross-entropies."""
    s_views = student.chunk(student.shape[0] // (teacher.shape[0] // n_teacher_views))
    t_views = teacher.chunk(n_teacher_views)
    terms = []
    for q, t in enumerate(t_views):
        p_t = torch.softmax((t - center) / tau_t, dim=-1)
        for v, s in enumerate(s_views):
            if v != q:
                terms.append((-(p_t * torch.log_softmax(s / tau_s, dim=-1)).sum(-1)).mean())
    return torch.stack(terms).mean(), len(terms)


def test_loss_equals_direct_formula_with_pair_exclusion():
    torch.manual_seed(0)
    batch, k, n_local = 3, 7, 4
    student = torch.randn((2 + n_local) * batch, k, dtype=torch.float64)
    teacher = torch.randn(2 * batch, k, dtype=torch.float64)
    loss_fn = DINOLoss(k, student_temp=0.1)
    loss_fn.center = torch.randn(1, k)
    loss, stats = loss_fn(student.float(), teacher.float(), teacher_temp=0.04)
    expected, pairs = direct_loss(student, teacher, loss_fn.center.double(), 0.1, 0.04)
    assert pairs == 2 * (2 + n_local) - 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    p_t = torch.softmax((teacher - loss_fn.center.double()) / 0.04, -1)
    entropy = -(p_t * p_t.log()).sum(-1).mean()
    assert stats["teacher_entropy"].item() == pytest.approx(entropy.item(), rel=1e-4)
    assert stats["kl"].item() == pytest.approx((expected - entropy).item(), rel=1e-4, abs=1e-5)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("n_teacher_views, n_student_views", [(2, 6), (2, 2), (1, 3), (3, 2)])
def test_gradient_equals_autograd_through_the_direct_formula(n_teacher_views, n_student_views, device):
    torch.manual_seed(0)
    batch, k = 3, 11
    student = torch.randn(n_student_views * batch, k, dtype=torch.float64).to(device).requires_grad_()
    teacher = torch.randn(n_teacher_views * batch, k, dtype=torch.float64).to(device)
    loss_fn = DINOLoss(k, student_temp=0.1).double().to(device)
    loss_fn.center = torch.randn(1, k, dtype=torch.float64).to(device)
    loss, _ = loss_fn(student, teacher, teacher_temp=0.04, num_teacher_views=n_teacher_views)
    (3.0 * loss).backward()  # an upstream gradient other than 1
    ours = student.grad.clone()
    student.grad = None
    expected, _ = direct_loss(student, teacher, loss_fn.center, 0.1, 0.04, n_teacher_views)
    (3.0 * expected).backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)  # the loss computes in float32
    torch.testing.assert_close(ours, student.grad, rtol=1e-4, atol=1e-6)


def test_bf16_logits_get_a_bf16_gradient():
    student = torch.randn(8, 16).bfloat16().requires_grad_()
    loss, _ = DINOLoss(16)(student, torch.randn(4, 16).bfloat16(), 0.04)
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16


def test_a_second_backward_is_refused():
    student = torch.randn(8, 5, requires_grad=True)
    loss, _ = DINOLoss(5)(student, torch.randn(4, 5), 0.04)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_teacher_receives_no_gradient_and_student_does():
    student = torch.randn(8, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    loss, _ = DINOLoss(5)(student, teacher, 0.04)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_centre_update_is_an_ema_of_the_batch_mean():
    loss_fn = DINOLoss(4, center_momentum=0.9)
    t1, t2 = torch.randn(6, 4), torch.randn(10, 4)
    loss_fn.update_center(t1)
    assert torch.allclose(loss_fn.center, 0.1 * t1.mean(0, keepdim=True))
    loss_fn.update_center(t2)
    assert torch.allclose(loss_fn.center, 0.9 * 0.1 * t1.mean(0, keepdim=True) + 0.1 * t2.mean(0, keepdim=True))
    assert set(loss_fn.state_dict()) == {"center"}


def test_masked_centre_update_keeps_the_centre_on_a_skipped_step():
    loss_fn = DINOLoss(4, center_momentum=0.9)
    t = torch.randn(6, 4)
    loss_fn.update_center(t, apply=torch.tensor(0.0))
    assert torch.equal(loss_fn.center, torch.zeros(1, 4))
    loss_fn.update_center(t, apply=torch.tensor(1.0))
    assert torch.allclose(loss_fn.center, 0.1 * t.mean(0, keepdim=True))


def test_collapse_signals():
    k = 16
    loss_fn = DINOLoss(k)
    uniform_teacher = torch.zeros(4, k)
    _, stats = loss_fn(torch.zeros(8, k), uniform_teacher, 0.04)
    assert stats["teacher_entropy"].item() == pytest.approx(math.log(k), rel=1e-5)  # uniform: ln K
    assert stats["kl"].item() == pytest.approx(0.0, abs=1e-5)
    assert stats["teacher_batch_entropy"].item() == pytest.approx(math.log(k), rel=1e-5)
    one_hot = torch.zeros(4, k)
    one_hot[:, 3] = 100.0
    _, stats = loss_fn(torch.randn(8, k), one_hot, 0.04)
    assert stats["teacher_entropy"].item() < 1e-3  # one dimension: 0
    assert stats["teacher_batch_entropy"].item() < 1e-3  # ... for every image


def test_batch_entropy_tells_a_healthy_teacher_from_collapse():
    k = 8
    loss_fn = DINOLoss(k)
    teacher = torch.full((8, k), -100.0)
    teacher[torch.arange(8), torch.arange(8)] = 100.0  # each image sharp, on its own prototype
    _, stats = loss_fn(torch.randn(16, k), teacher, 0.04)
    assert stats["teacher_entropy"].item() < 1e-3
    assert stats["teacher_batch_entropy"].item() == pytest.approx(math.log(k), rel=1e-5)


@pytest.mark.parametrize("student_shape, teacher_shape, match", [
    ((8, 16), (4, 10), r"K = 16 .* got shape \(4, 10\)"),  # teacher logits of another head
    ((8, 10), (4, 10), r"K = 16 .* got shape \(4, 10\)"),
    ((4, 2, 16), (2, 2, 16), r"got shape \(2, 2, 16\)"),  # views x B x K instead of (views * B) x K
    ((9, 16), (3, 16), "teacher_logits has 3 rows, not a positive multiple of 2"),  # silently wrong before
    ((7, 16), (4, 16), "student_logits has 7 rows, not a positive multiple of 2"),
    ((8, 16), (0, 16), "teacher_logits has 0 rows"),
])
def test_logits_of_the_wrong_shape_are_refused_with_one_message(student_shape, teacher_shape, match):
    with pytest.raises(ValueError, match=match):
        DINOLoss(16)(torch.randn(student_shape), torch.randn(teacher_shape), 0.04)


def test_centre_update_refuses_logits_of_the_wrong_shape_and_keeps_the_centre():
    loss_fn = DINOLoss(16)
    for bad in (torch.randn(16), torch.randn(4, 10), torch.randn(2, 4, 16)):  # a 1-D row was broadcast before
        with pytest.raises(ValueError, match="K = 16"):
            loss_fn.update_center(bad)
    assert torch.equal(loss_fn.center, torch.zeros(1, 16))


def test_logits_on_another_device_than_the_centre_are_refused():
    student, teacher = torch.randn(8, 16, device="meta"), torch.randn(4, 16, device="meta")
    with pytest.raises(ValueError, match=r"on meta, the loss's centre on cpu: move the loss there with \.to\(device\)"):
        DINOLoss(16)(student, teacher, 0.04)
    with pytest.raises(ValueError, match="on meta"):
        DINOLoss(16).update_center(teacher)


def test_the_class_documents_its_arguments():
    assert "out_dim" in DINOLoss.__doc__ and "(views * B) x K" in DINOLoss.__doc__


@pytest.mark.parametrize("make, match", [
    (lambda: DINOLoss(16, student_temp=0.0), "student_temp divides the logits and must be > 0, got 0.0"),
    (lambda: DINOLoss(16, center_momentum=1.5), r"center_momentum .* in \[0, 1\]; got 1.5"),
    (lambda: DINOLoss(16)(torch.randn(8, 16), torch.randn(4, 16), 0.0), "teacher_temp .* > 0, got 0.0"),
    (lambda: DINOLoss(16)(torch.randn(8, 16), torch.randn(4, 16), -0.04), "teacher_temp .* > 0, got -0.04"),
    (lambda: DINOLoss(16)(torch.randn(8, 16), torch.randn(4, 16), float("nan")), "teacher_temp .* > 0, got nan"),
])
def test_temperatures_and_centre_momentum_out_of_range_are_refused(make, match):
    with pytest.raises(ValueError, match=match):  # a temperature of 0 gave a NaN loss without a word
        make()
