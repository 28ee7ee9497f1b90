"""The DINO loss: cross-entropy from the centred, sharpened teacher to the student.

With ``S`` student views and ``G`` teacher (global) views of a batch of ``B`` images, student
logits are ``(S*B) x K`` and teacher logits ``(G*B) x K``, both grouped by view (view 0's B
rows first). The teacher's global view ``q`` is compared with every student view ``v != q``;
the loss is the mean over those pairs of the batch-mean cross-entropy. The teacher side never
receives gradients. The centre ``c`` (``K``) is a buffer, so ``state_dict()`` is the official
``dino_loss`` entry.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class DINOLoss(nn.Module):
    """The DINO loss with its centre: ``DINOLoss(K)(student_logits, teacher_logits, teacher_temp)``.

    Args:
        out_dim: ``K``, the number of prototypes (the head's ``out_dim``).
        student_temp: the student's softmax temperature.
        center_momentum: ``m`` of the centre's EMA (``update_center``).

    The logits are ``(views * B) x K``, grouped by view, on the device of the loss (``.to(device)``
    moves the centre there); anything else is refused with a ``ValueError`` naming the shape, as
    are temperatures <= 0 and a ``center_momentum`` outside [0, 1].
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        _check_temperature("student_temp", student_temp)
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum is the weight of the old centre, in [0, 1]; got {center_momentum}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``p = softmax((t - c) / teacher_temp)`` in float32 (``(G*B) x K``) and the entropy of
        each row (nats, ``G*B``), from the log-probabilities (no ``log`` of a rounded ``p``)."""
        _check_temperature("teacher_temp", teacher_temp)
        logp = F.log_softmax((teacher_logits.float() - self.center).div_(teacher_temp), dim=-1)
        p = logp.exp()
        return p, -torch.einsum("nk,nk->n", p, logp)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, teacher_temp: float,
                num_teacher_views: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns ``(loss, stats)``; ``stats`` holds detached scalars for monitoring collapse:
        ``teacher_entropy``, the mean entropy of one image's teacher distribution (nats, 0 = one
        dimension, ln K = uniform), ``teacher_batch_entropy``, the entropy of the batch-mean
        teacher distribution (ln K = all prototypes used equally, 0 = every image on one), and
        ``kl`` = KL(P_t || P_s). Under a launcher each process reports its own share of the batch
        (the loop averages them). Uniform collapse: both entropies near ln K; collapse to one
        dimension: both near 0; a healthy run: the first low, the second high."""
        self._check_logits("teacher_logits", teacher_logits, num_teacher_views, "num_teacher_views")
        self._check_logits("student_logits", student_logits, teacher_logits.shape[0] // num_teacher_views,
                           "B, the batch of each teacher view")
        num_student_views = student_logits.shape[0] * num_teacher_views // teacher_logits.shape[0]
        teacher_p, teacher_entropy = self.teacher_probs(teacher_logits.detach(), teacher_temp)
        loss = _PairedCrossEntropy.apply(student_logits, teacher_p, self.student_temp, num_teacher_views,
                                         num_student_views)
        with torch.no_grad():
            entropy = teacher_entropy.mean()
            batch_entropy = _entropy(teacher_p.mean(0))
        stats = {"teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy, "kl": loss.detach() - entropy}
        return loss, stats

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor, apply: torch.Tensor | float = 1.0) -> None:
        """``c <- m c + (1 - m) mean(t)``, the mean over the teacher logits of all processes.

        ``apply``: 0 keeps the centre as it is (a skipped step); a 0-d tensor when that is decided
        on the device. Every process must call this (the mean is all-reduced).
        """
        self._check_logits("teacher_logits", teacher_logits, 1, "at least one row")
        batch_sum = teacher_logits.float().sum(dim=0, keepdim=True)
        count = torch.full((1,), float(teacher_logits.shape[0]), device=teacher_logits.device)  # no host copy
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        updated = self.center * self.center_momentum + batch_sum / count * (1 - self.center_momentum)
        if isinstance(apply, torch.Tensor):
            updated = torch.where(apply.bool(), updated, self.center)
        elif not apply:
            return
        self.center.copy_(updated)

    def _check_logits(self, name: str, logits: torch.Tensor, rows_multiple: int, multiple_is: str) -> None:
        """``ValueError`` unless ``logits`` is ``N x K`` (``N`` a positive multiple of ``rows_multiple``)
        on the centre's device. Reads shapes only: no device synchronisation."""
        k = self.center.shape[1]
        if logits.ndim != 2 or logits.shape[1] != k:
            raise ValueError(f"{name} must be (views * B) x K with K = {k} (this loss's out_dim), "
                             f"got shape {tuple(logits.shape)}")
        if logits.shape[0] == 0 or logits.shape[0] % rows_multiple:
            raise ValueError(f"{name} has {logits.shape[0]} rows, not a positive multiple of {rows_multiple} "
                             f"({multiple_is}); rows are grouped by view, view 0's B rows first")
        if logits.device != self.center.device:
            raise ValueError(f"{name} is on {logits.device}, the loss's centre on {self.center.device}: "
                             f"move the loss there with .to(device)")


class _PairedCrossEntropy(torch.autograd.Function):
    """The loss over all pairs (teacher view q, student view v != q), with a hand-written backward.

    ``student_logits``: ``(S*B) x K``; ``teacher_p``: ``(G*B) x K`` teacher probabilities (rows
    summing to 1), both grouped by view. Returns ``-sum_pairs <p_q, log_softmax(s_v / tau)> / (B *
    pairs)``. Autograd through the same formula keeps about six ``(S*B) x K`` float32 tensors
    alive or allocated per step (the scaled logits, the log-probabilities, the zero-filled
    gradient of a slice, the expanded gradient of a sum, the two backward results); here there are
    two, and the gradient is computed in place of the saved log-probabilities:

        d loss / d s_v = (n_v * softmax(s_v / tau) - q_v) / (tau * B * pairs),

    where ``q_v`` is the sum of the teacher distributions paired with view ``v`` and ``n_v`` the
    sum of ``q_v`` (the number of those teacher views, up to rounding). Its backward can run once
    (autograd raises on a second run: the saved tensor was modified).
    """

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_p: torch.Tensor, student_temp: float,
                num_teacher_views: int, num_student_views: int) -> torch.Tensor:
        batch = teacher_p.shape[0] // num_teacher_views
        scaled = student_logits.float()  # a copy unless the logits are float32 already; never divide those in place
        scaled = scaled / student_temp if scaled is student_logits else scaled.div_(student_temp)
        student_logp = F.log_softmax(scaled, dim=-1)
        del scaled
        teacher_sum = teacher_p.view(num_teacher_views, batch, -1).sum(0)  # B x K: every view's p_q summed
        # sum over all pairs (q, v) of <p_q, log p_v>, minus the pairs of a view with itself
        all_pairs = (teacher_sum * student_logp.view(num_student_views, batch, -1).sum(0)).sum()
        same = min(num_teacher_views, num_student_views) * batch
        same_view = (teacher_p[:same] * student_logp[:same]).sum()
        pairs = num_teacher_views * num_student_views - same // batch
        ctx.save_for_backward(student_logp, teacher_p, teacher_sum)
        ctx.scale, ctx.dtype = 1.0 / (student_temp * batch * pairs), student_logits.dtype
        return -(all_pairs - same_view) / (batch * pairs)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        student_logp, teacher_p, teacher_sum = ctx.saved_tensors
        batch = teacher_sum.shape[0]
        same = min(teacher_p.shape[0], student_logp.shape[0])
        scale = grad_loss * ctx.scale  # 0-d, on the device: no host sync
        row_sums = teacher_p.sum(-1)  # G*B, each 1 up to rounding
        q_total = row_sums.view(-1, batch).sum(0).repeat(student_logp.shape[0] // batch)  # n_v of each row, S*B
        q_total[:same] -= row_sums[:same]
        grad = student_logp.exp_()  # softmax(s_v / tau), in place
        grad.mul_((q_total * scale).unsqueeze(-1))
        grad.view(-1, batch, grad.shape[-1]).sub_(teacher_sum * scale)
        grad[:same].addcmul_(teacher_p[:same], scale)
        return grad.to(ctx.dtype), None, None, None, None


def _check_temperature(name: str, temperature: float | torch.Tensor) -> None:
    """``ValueError`` for a temperature <= 0 given as a number (a tensor is not read: no sync)."""
    if not isinstance(temperature, torch.Tensor) and not temperature > 0:
        raise ValueError(f"{name} divides the logits and must be > 0, got {temperature}")


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the distributions along the last dimension of ``p``."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
