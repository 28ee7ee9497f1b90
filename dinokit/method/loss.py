"""The DINO loss: cross-entropy from the centred, sharpened teacher to the student.

With ``S`` student views and ``G`` teacher (global) views of a batch of ``B`` images, student
logits are ``(S*B) x K`` and teacher logits ``(G*B) x K``, both grouped by view (view 0's B
rows first). The teacher's global view ``q`` is compared with every student view ``v != q``;
the loss is the mean over those pairs of the batch-mean cross-entropy. The teacher side never
receives gradients. The centre ``c`` (``K``) is a buffer, so ``state_dict()`` is the official
``dino_loss`` entry.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """``softmax((t - c) / teacher_temp)``, computed in float32."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, teacher_temp: float,
                num_teacher_views: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns ``(loss, stats)``; ``stats`` holds detached scalars for monitoring collapse:
        ``teacher_entropy``, the mean entropy of one image's teacher distribution (nats, 0 = one
        dimension, ln K = uniform), ``teacher_batch_entropy``, the entropy of the batch-mean
        teacher distribution (ln K = all prototypes used equally, 0 = every image on one), and
        ``kl`` = KL(P_t || P_s). Under a launcher each process reports its own share of the batch
        (the loop averages them). Uniform collapse: both entropies near ln K; collapse to one
        dimension: both near 0; a healthy run: the first low, the second high."""
        num_student_views = student_logits.shape[0] * num_teacher_views // teacher_logits.shape[0]
        batch = teacher_logits.shape[0] // num_teacher_views
        student_logp = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        teacher_p = self.teacher_probs(teacher_logits.detach(), teacher_temp)
        # sum over all pairs (q, v) of <p_q, log p_v>, minus the pairs of a view with itself:
        # two reductions over B x K instead of one per pair
        all_pairs = (teacher_p.view(num_teacher_views, batch, -1).sum(0)
                     * student_logp.view(num_student_views, batch, -1).sum(0)).sum()
        same = min(num_teacher_views, num_student_views)
        same_view = (teacher_p[:same * batch] * student_logp[:same * batch]).sum()
        pairs = num_teacher_views * num_student_views - same
        loss = -(all_pairs - same_view) / (batch * pairs)
        with torch.no_grad():
            entropy = _entropy(teacher_p).mean()
            batch_entropy = _entropy(teacher_p.mean(0))
        stats = {"teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy, "kl": loss.detach() - entropy}
        return loss, stats

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor, apply: torch.Tensor | float = 1.0) -> None:
        """``c <- m c + (1 - m) mean(t)``, the mean over the teacher logits of all processes.

        ``apply``: 0 keeps the centre as it is (a skipped step); a 0-d tensor when that is decided
        on the device. Every process must call this (the mean is all-reduced).
        """
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


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the distributions along the last dimension of ``p``."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def uniform_loss(out_dim: int) -> float:
    """The loss of a uniform collapse, ln K."""
    return math.log(out_dim)
