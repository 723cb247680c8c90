"""The distillation loss of method.md: alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qdistill.errors import QDistillError


def check_kd_params(temperature: float, alpha: float) -> None:
    if not temperature > 0:
        raise QDistillError(f"temperature must be positive, got {temperature}")
    if not 0 <= alpha <= 1:
        raise QDistillError(f"alpha (weight of the distillation term) must be in [0, 1], got {alpha}")


def distillation_loss(
    student: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor | None = None,
    temperature: float = 2.0,
    alpha: float = 0.7,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Logits are [batch, classes] or [batch, tokens, classes]; without a teacher this is plain cross-entropy.

    The KL term uses "batchmean" over examples (tokens for sequences, padding, i.e. label == ignore_index,
    left out), so its scale does not depend on the number of classes.
    """
    classes = student.shape[-1]
    s = student.reshape(-1, classes)
    y = labels.reshape(-1)
    ce = F.cross_entropy(s, y, ignore_index=ignore_index)
    if teacher is None or alpha == 0:
        return ce
    if teacher.shape != student.shape:
        raise QDistillError(f"teacher logits {tuple(teacher.shape)} and student logits {tuple(student.shape)} differ in shape")
    t = teacher.reshape(-1, classes).detach()
    keep = y != ignore_index
    if not bool(keep.all()):
        s, t = s[keep], t[keep]
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=-1),
        F.log_softmax(t.float() / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature**2 * kl + (1 - alpha) * ce
