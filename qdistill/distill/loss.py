"""The distillation loss of method.md: alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * CE.

For language models it is taken per token, padding left out, averaged over the real tokens; the
teacher's target is its logits, or its top-k log-probabilities (`TopKTarget`) where full logits for
every token of a corpus would not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qdistill.errors import QDistillError


def check_kd_params(temperature: float, alpha: float) -> None:
    if not temperature > 0:
        raise QDistillError(f"temperature must be positive, got {temperature}")
    if not 0 <= alpha <= 1:
        raise QDistillError(f"alpha (weight of the distillation term) must be in [0, 1], got {alpha}")


@dataclass
class TopKTarget:
    """The teacher's k most likely classes per position and their log-probabilities at `temperature`.

    The rest of the mass, 1 - sum(p_top), is one more outcome: the KL is that of the (k+1)-outcome
    distributions, exact for the classes kept and for the total mass of the others."""

    logprobs: torch.Tensor  # [..., k]
    indices: torch.Tensor  # [..., k]
    temperature: float


def topk_kl(student: torch.Tensor, target: TopKTarget, temperature: float) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top k classes and the rest, summed over the rows of `student` [n, V], divided by n."""
    if temperature != target.temperature:
        raise QDistillError(f"the cached teacher targets are for temperature {target.temperature}, the loss uses {temperature}: rebuild the cache")
    s = F.log_softmax(student.float() / temperature, dim=-1)
    s_top = s.gather(-1, target.indices.long())
    t_top = target.logprobs.float()
    # the mass outside the top k, of the teacher and of the student; clamped where the top k hold it all
    t_rest = (1 - t_top.exp().sum(-1)).clamp(min=0)
    # the student's rest as a logsumexp over the classes outside the top k (1 - sum(p_top) cancels in
    # float32); the top k are filled with the lowest finite value, not -inf, and the result held above
    # -100 nats, so that k = V (no rest) stays finite, gradients included
    s_rest_log = s.scatter(-1, target.indices.long(), torch.finfo(s.dtype).min).logsumexp(-1).clamp(min=-100.0)
    kl = (t_top.exp() * (t_top - s_top)).sum(-1) + torch.xlogy(t_rest, t_rest) - t_rest * s_rest_log
    return kl.sum() / max(len(student), 1)


def distillation_loss(
    student: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor | TopKTarget | None = None,
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
    keep = y != ignore_index
    if isinstance(teacher, TopKTarget):
        k = teacher.indices.shape[-1]
        top = TopKTarget(teacher.logprobs.reshape(-1, k), teacher.indices.reshape(-1, k), teacher.temperature)
        if len(top.indices) != len(s):
            raise QDistillError(f"teacher targets for {len(top.indices)} positions, student logits for {len(s)}")
        if not bool(keep.all()):
            s, top = s[keep], TopKTarget(top.logprobs[keep], top.indices[keep], top.temperature)
        return alpha * temperature**2 * topk_kl(s, top, temperature) + (1 - alpha) * ce
    if teacher.shape != student.shape:
        raise QDistillError(f"teacher logits {tuple(teacher.shape)} and student logits {tuple(student.shape)} differ in shape")
    t = teacher.reshape(-1, classes).detach()
    if not bool(keep.all()):
        s, t = s[keep], t[keep]
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=-1),
        F.log_softmax(t.float() / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * temperature**2 * kl + (1 - alpha) * ce
