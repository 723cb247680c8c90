"""Tasks: what the one training loop is given.

The loop (`train.loop.fit`) knows nothing about images or tokens. A task makes the batches of a
split, runs a model on a batch, computes the loss from the student's output, the teacher's target
and the batch, evaluates a split into named metrics, and chooses the teacher side (live, or targets
cached once). A batch is a dict of tensors: "x" the inputs, "y" the labels (-100 where there is
nothing to predict: padding), "index" the training examples' positions, which cached teacher
targets are looked up by.

Methods (fp, kd, qd, ...) are a table of configurations of the loop (`train.config.METHODS`); tasks
are a second, independent table (`TASKS`), each with the training defaults that suit it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from qdistill.tasks.classification import ImageClassification, accuracy
from qdistill.tasks.embedding import SentenceEmbedding
from qdistill.tasks.language import LanguageModelling, generate

Batch = dict[str, torch.Tensor]


class Task(Protocol):
    name: str  # a key of TASKS
    metric: str  # the headline metric evaluate() returns ("acc", "ppl"): what options are chosen on

    def train_size(self) -> int: ...  # training examples (images, token windows) per epoch

    def train_batch(self, epoch: int, position: int, cfg) -> Batch: ...  # step `position` of `epoch`, a function of them and cfg.seed alone

    def ordered_batches(self, split: str, batch_size: int): ...  # the split in order, for teacher caches and evaluation

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...  # in training, whatever `loss` takes (the embedding task's layers too)

    def loss(self, out, target, batch: Batch, cfg) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]: ...

    def has_split(self, split: str) -> bool: ...

    def describe(self) -> dict: ...  # kept in a saved model's file: how to evaluate it as it was trained

    def data_key(self) -> str: ...  # identifies the training data, for the keys of cached teachers

    def spec_args(self) -> dict: ...  # what a model preset needs to fit the data: model_spec(name, **task.spec_args())

    def sample(self) -> Batch: ...  # two examples, to check that teacher and student fit the data and each other

    def teacher(self, model: nn.Module, cfg, cache_dir, progress=None): ...  # a callable batch -> target


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def as_task(data) -> Task:
    """A task as it is, and a `data.Dataset` (tensors in memory) as image classification."""
    from qdistill.data import Dataset

    return ImageClassification(data) if isinstance(data, Dataset) else data


# Per task: the training options that differ from TrainConfig's defaults (which are the paper's, for CNNs).
# Language models train with AdamW, warm-up and a cosine decay (on a small LSTM classifier SGD reached
# 49 % at lr 0.02 and 100 % at lr 0.5: no global default serves both), and distil at T = 1: in the
# language-model demo's setting kd reached a validation perplexity of 158.5 at T = 1, 230 at T = 2,
# against 167 without a teacher (bench/README.md).
TASKS = {
    "classification": {},
    "lm": {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.01, "schedule": "cosine", "warmup": 0.05, "batch_size": 32, "grad_clip": 1.0, "temperature": 1.0},
    # a pretrained encoder distilled into low-bit copies of itself: sentence-transformers' fine-tuning
    # defaults (AdamW, 10 % warm-up) with the learning rate and dropout chosen on the validation split
    # (MiniLM at 4 bits: lr 1e-4 over 2e-5; dropout off lifted the cosine from 0.9858 to 0.9929, bench/README.md)
    "embedding": {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.01, "schedule": "cosine", "warmup": 0.1, "batch_size": 32, "grad_clip": 1.0, "dropout": 0.0},
}

# A language model started from a pretrained Hugging Face model (--init hf:DIR) is fine-tuned, not trained from
# scratch: at 3e-3 qd undid more than it gained (validation ppl 101.3 against plain rounding's 99.0; 99.6 at 1e-3,
# 98.6 at 3e-4, 98.4 at 1e-4: bench/results/own-lm-cpu.md).
FROM_PRETRAINED = {"lm": {"lr": 1e-4}}

__all__ = ["Batch", "FROM_PRETRAINED", "ImageClassification", "LanguageModelling", "SentenceEmbedding", "TASKS", "Task", "accuracy", "as_task", "generate", "to_device"]
