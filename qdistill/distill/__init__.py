"""Distillation: the loss and the teacher side (live or cached logits)."""

from qdistill.distill.loss import check_kd_params, distillation_loss
from qdistill.distill.teacher import CachedTeacher, LiveTeacher, check_compatible, model_digest, predict

__all__ = ["CachedTeacher", "LiveTeacher", "check_compatible", "check_kd_params", "distillation_loss", "model_digest", "predict"]
