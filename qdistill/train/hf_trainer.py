"""Quantized distillation inside your own `transformers.Trainer` script (ModelOpt's QADTrainer is the peer).

`QuantizedDistillationTrainer` is the Trainer with the three arrows of method.md's loop put in:
1. quantize: the student's weights carry qdistill quantizers, attached before the Trainer builds its
   optimizer, so every forward reads Q(w) and the optimizer steps the full-precision shadow weights w;
2. distill: the loss is `distillation_loss` of the student's next-token logits against a frozen teacher's
   (T^2 KL at `temperature`, weighted `alpha`, plus cross-entropy on the labels), padding (-100) left out;
3. the SGD step is the Trainer's own, with its schedule, accumulation, mixed precision and devices.

A checkpoint (`save_model`, and each `save_steps`) is a save_pretrained folder holding the quantized values
(what `AutoModelForCausalLM` opens) and `PACKED`, the low-bit file qdistill evaluates, exports and runs on
its kernels. Resuming from such a checkpoint restarts from those quantized values: the shadow weights'
fractions below one quantization step are not kept.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from qdistill.distill import distillation_loss
from qdistill.errors import QDistillError
from qdistill.format import save_packed
from qdistill.quant import UniformQuantizer, attach, detach, quantized_tensors

try:
    from transformers import Trainer
except ImportError as e:  # the module is the transformers integration: nothing else imports it
    raise QDistillError("QuantizedDistillationTrainer needs transformers: pip install transformers") from e

PACKED = "qdistill.safetensors"  # the low-bit file written beside each saved checkpoint


def default_quantizer(bits: int = 4) -> UniformQuantizer:
    """Row groups of 32 with integer zero points and least-squared-error ranges: the layout of ONNX Runtime's
    MatMulNBits, and the recipe chosen for MiniLM (bench/README.md)."""
    return UniformQuantizer(bits=bits, bucket=32, groups="row", zero_point="int", scale="mse")


class QuantizedDistillationTrainer(Trainer):
    """A `transformers.Trainer` that trains `model` (a causal LM, the student) at low bits against `teacher`.

    `quantizer` is attached to the tensors `select` picks (`qdistill.attach`'s keyword arguments; by default
    every Linear and Conv1D weight and the embeddings, a tied head once); `bits` sets the default quantizer's
    width. A model that already has quantizers attached keeps them. Every other argument is the Trainer's."""

    def __init__(self, model: nn.Module, *args, teacher: nn.Module, bits: int = 4, quantizer=None, select: dict | None = None,
                 temperature: float = 2.0, alpha: float = 0.7, **kwargs):
        if not quantized_tensors(model):
            attach(model, quantizer if quantizer is not None else default_quantizer(bits), **(select or {}))
        super().__init__(model, *args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
        self.temperature, self.alpha = temperature, alpha
        self.loss_is_scaled_for_ga = False  # a mean over the batch's tokens: the Trainer divides it for accumulation

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """Next-token distillation: position t's logits predict label t + 1 (the model's own shift), with the teacher's at t."""
        labels = inputs.get("labels")
        if labels is None:
            raise QDistillError("the batches hold no labels: use a collator that makes them (DataCollatorForLanguageModeling(tokenizer, mlm=False))")
        features = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**features)
        with torch.no_grad():
            teacher_logits = self.teacher(**features).logits
        if teacher_logits.shape != outputs.logits.shape:
            raise QDistillError(f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(outputs.logits.shape)} differ: distill between models of one vocabulary")
        loss = distillation_loss(outputs.logits[:, :-1], labels[:, 1:], teacher_logits[:, :-1], self.temperature, self.alpha)
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The checkpoint as a save_pretrained folder of the quantized values, and the packed low-bit file beside it."""
        if not self.args.should_save:
            return
        output_dir = Path(output_dir or self.args.output_dir)
        os.makedirs(output_dir, exist_ok=True)
        self.save_packed(output_dir / PACKED)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        detach(copy.deepcopy(model), keep_quantized=True).save_pretrained(output_dir)  # (save_pretrained fails on parametrized weights)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def save_packed(self, path) -> Path:
        """The student as a packed low-bit file (`qdistill.save_packed`), rebuilt from its config alone by `load_packed`."""
        from qdistill.models import hf_spec

        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return save_packed(model, hf_spec(model.config, head="causal-lm"), path, overwrite=True)
