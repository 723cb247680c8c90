"""Training configuration: the methods are settings of one loop, not separate code paths."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from qdistill.distill.loss import check_kd_params
from qdistill.errors import QDistillError
from qdistill.quant import LearnedPointsQuantizer, Quantizer, UniformQuantizer
from qdistill.quant.base import GROUPS, SCALE_DTYPES
from qdistill.quant.uniform import SCALES, ZERO_POINTS


@dataclass(frozen=True)
class Method:
    """What a method changes in the loop: which quantizer is attached, whether a teacher is used, what is trained."""

    quantizer: str | None  # None, "uniform" or "learned"
    distill: bool
    trains: str  # "weights", "points" or "nothing" (post-training quantization)
    then: str | None = None  # a second phase run on the result (qd+dq)

    @property
    def phases(self) -> tuple[str, ...]:
        """What the loop steps, in order: the weights, the learned points, both (qd+dq), or nothing (ptq)."""
        return tuple(p for p in ("weights", "points") if p == self.trains or (p == "points" and self.then == "dq"))


METHODS = {
    "fp": Method(None, distill=False, trains="weights"),
    "kd": Method(None, distill=True, trains="weights"),
    "ptq": Method("uniform", distill=False, trains="nothing"),
    "qat": Method("uniform", distill=False, trains="weights"),
    "qd": Method("uniform", distill=True, trains="weights"),
    "dq": Method("learned", distill=True, trains="points"),
    "qd+dq": Method("uniform", distill=True, trains="weights", then="dq"),
}


# The allowed values of the string options.
CHOICES = {
    "scale": SCALES,
    "groups": GROUPS,
    "zero_point": ZERO_POINTS,
    "scale_dtype": tuple(SCALE_DTYPES),
    "optimizer": ("sgd", "adamw"),
    "schedule": ("onecycle", "cosine", "constant"),
    "teacher_logits": ("cached", "live"),
    "points_init": ("quantile", "uniform"),
    "points_optimizer": ("sgd", "adam"),
    "dq_teacher": ("teacher", "self"),
    "memory_format": ("auto", "channels_last", "contiguous"),
    "guard": ("stop", "rollback", "off"),
    "parallel": ("ddp", "fsdp"),
}


# Settings that change how fast a model trains, or only what happens once it diverged, not what a
# finished run learns: left out of cache keys.
SPEED_ONLY = ("memory_format", "guard", "guard_factor", "parallel")
# What training a full-precision model (method fp, as a teacher is trained) reads from a config.
FP_SETTINGS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule", "warmup", "grad_clip", "augment", "seed", "device", "memory_format", "guard", "guard_factor", "parallel")


# A declared field type: how a value is named in an error, and the test it must pass.
FIELD_TYPES = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "list[str]": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
}


@dataclass
class TrainConfig:
    method: str = "qd"
    # quantizer
    bits: int = 4
    bucket: int | None = 256
    stochastic: bool = False
    scale: str = "minmax"  # minmax (the paper) or mse: each bucket's range clipped to the least squared error
    # kernel-ready layouts (docs/quantizer-options.md), trained as they are stored:
    groups: str = "flat"  # flat (the paper: buckets over the flattened tensor) or row (groups within each row [out, in*...])
    zero_point: str = "float"  # float (min-max) or int (a step and an integer zero point: ONNX Runtime, torchao)
    scale_dtype: str = "float32"  # float32, float16 or bfloat16: each group's stored values, in training as on disk
    keep_first_last: bool = False
    # "GLOB=N": the bucket of the tensors so named (the first pattern that matches wins), instead of `bucket`. A large
    # embedding table in bigger groups costs little quality and much size (bench/README.md, MiniLM)
    bucket_by_name: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)  # glob patterns on tensor names; empty = all default layer types
    exclude: list[str] = field(default_factory=list)
    # optimization (the paper, for CNNs: SGD with Nesterov momentum 0.9; language models: tasks.TASKS["lm"])
    epochs: int = 2
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd (Nesterov when momentum > 0) or adamw
    lr: float = 0.05
    momentum: float = 0.9  # SGD's; with adamw, its beta1
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # onecycle, cosine or constant
    warmup: float = 0.0  # the fraction of steps the learning rate rises over linearly (onecycle: its rising part, else 0.3)
    # None (the paper) or the largest global gradient norm let through to a step. At 2 bits with min-max
    # buckets one loss spike can grow a bucket's extreme weight, widen its levels and feed back
    # (bench/results/ablation-cpu-medium-2bit-clip.md)
    grad_clip: float | None = None
    # the divergence guard: a non-finite loss, or one over guard_factor x its running median (null: no
    # ratio test), stops the phase (stop), or returns to the last good state and clips the gradient (rollback).
    # 4: normal runs peaked at 1.5-2.3x, the 400k student's diverging 3-bit seed at 7.3x (bench/README.md)
    guard: str = "stop"
    guard_factor: float | None = 4.0
    augment: bool = False
    # the student's dropout probability while it trains, and after (null: the model's own). 0 turns it off: a
    # pretrained student copying its teacher's exact outputs gains nothing from the noise
    dropout: float | None = None
    # distillation
    temperature: float = 2.0
    alpha: float = 0.7
    teacher_logits: str = "cached"  # cached or live (live is forced by augment)
    topk: int = 32  # language models: the teacher's k most likely tokens per position kept in the cache
    # sentence embeddings: the weight of the batch's similarity matrix (student's against teacher's, squared
    # error) beside each embedding's cosine, so that neighbours are kept and not only directions
    relational: float = 0.0
    # sentence embeddings: the weight of the teacher's token states layer by layer (squared error relative
    # to the teacher's, as TinyBERT and MiniLM's own distillation), beside the pooled embedding; needs the live teacher
    hidden_states: float = 0.0
    # differentiable quantization
    dq_epochs: int = 1
    points_lr: float = 1e-3
    # adam by default: the points' gradients are sums over thousands of weights, so plain SGD (the paper's,
    # lr 1e-6..1e-4) is scale-sensitive. Development runs, 2-bit dq from kd weights on the tiny student:
    # SGD lr 1e-5 74.3 %, Adam lr 1e-3 81.1 %; SGD lr 1e-3 collapsed to 10 %
    points_optimizer: str = "adam"
    points_init: str = "quantile"  # quantile or uniform (qd+dq starts from the qd levels: uniform)
    redistribute: bool = False
    dq_teacher: str = "teacher"  # teacher or self (the student's own full-precision weights)
    # run
    seed: int = 0
    device: str = "auto"
    # auto: channels_last on CPU, where it made a quantized training step of the conv students 1.16-1.3x
    # faster (bench/speed.py); contiguous on other devices until measured there
    memory_format: str = "auto"
    # under torchrun: ddp replicates the student on every rank; fsdp (FSDP2) shards its weights, gradients
    # and optimizer state (docs/distributed.md). One process: no effect.
    parallel: str = "ddp"

    def __post_init__(self):
        if self.guard is False:  # YAML 1.1 reads `guard: off` as false
            self.guard = "off"
        self.validate()

    def validate(self) -> None:
        self.check_types()
        if self.method not in METHODS:
            raise QDistillError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        self.make_quantizer("uniform")  # checks bits and bucket
        self.quantizers_by_name("uniform")
        check_kd_params(self.temperature, self.alpha)
        for name in ("epochs", "dq_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise QDistillError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise QDistillError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        for name in ("lr", "points_lr"):
            if not getattr(self, name) > 0:
                raise QDistillError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and not isinstance(self.grad_clip, bool) and self.grad_clip > 0):
            raise QDistillError(f"grad_clip must be positive or null (no clipping), got {self.grad_clip!r}")
        if self.guard_factor is not None and not (isinstance(self.guard_factor, (int, float)) and not isinstance(self.guard_factor, bool) and self.guard_factor > 1):
            raise QDistillError(f"guard_factor must be a number above 1 or null (no ratio test), got {self.guard_factor!r}")
        if not (isinstance(self.warmup, (int, float)) and not isinstance(self.warmup, bool) and 0 <= self.warmup < 1):
            raise QDistillError(f"warmup must be a fraction of the steps in [0, 1), got {self.warmup!r}")
        if not isinstance(self.topk, int) or isinstance(self.topk, bool) or not 1 <= self.topk <= 1024:
            raise QDistillError(f"topk must be an integer from 1 to 1024, got {self.topk!r}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise QDistillError(f"dropout must be a probability in [0, 1) or null (the model's own), got {self.dropout!r}")
        for name in ("relational", "hidden_states"):
            if not getattr(self, name) >= 0:
                raise QDistillError(f"{name} must be a non-negative weight, got {getattr(self, name)!r}")
        if not 0 <= self.momentum < 1:
            raise QDistillError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise QDistillError(f"weight_decay must be non-negative, got {self.weight_decay}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise QDistillError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.scale != "minmax" and self.spec.quantizer != "uniform":
            raise QDistillError(f"scale={self.scale} applies to the uniform quantizer (ptq, qat, qd, qd+dq), not to method {self.method}")
        if self.parallel == "fsdp" and "dq" in (self.method, self.spec.then):
            raise QDistillError(f"parallel=fsdp shards weights as they train; method {self.method} learns quantization points of frozen weights: use parallel ddp")
        if self.zero_point == "int" and "dq" in (self.method, self.spec.then):
            raise QDistillError(f"zero_point=int applies to the uniform quantizer (ptq, qat, qd), not to method {self.method}: learned points keep each group's float min and max (use zero_point float)")

    def check_types(self) -> None:
        """Each field's value is of its declared type (a YAML file or a saved run can hold anything): an
        integer for an int (not a bool), a finite number for a float, a list of strings for a list."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.type.removesuffix(" | None")
            if value is None and f.type.endswith(" | None"):
                continue
            what, ok = FIELD_TYPES[kind]
            if not ok(value):
                raise QDistillError(f"{f.name} must be {what}{' or null' if f.type.endswith(' | None') else ''}, got {value!r}")
        if not 0 <= self.seed < 2**32:
            raise QDistillError(f"seed must be from 0 to {2**32 - 1}, got {self.seed}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise QDistillError(f"unknown device {self.device!r}: auto, cpu, cuda or cuda:N") from None

    def fp_only(self) -> "TrainConfig":
        """Method fp with this config's full-precision training settings and every other setting at its default."""
        return TrainConfig(method="fp", **{k: getattr(self, k) for k in FP_SETTINGS})

    def torch_memory_format(self, device: torch.device) -> torch.memory_format:
        if self.memory_format == "channels_last" or (self.memory_format == "auto" and device.type == "cpu"):
            return torch.channels_last
        return torch.contiguous_format

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    @property
    def needs_teacher(self) -> bool:
        """Distilling methods need one, except dq taught by the student's own full-precision weights."""
        return self.spec.distill and not (self.method == "dq" and self.dq_teacher == "self")

    def make_quantizer(self, kind: str, init: str | None = None) -> Quantizer:
        return self._quantizer(kind, init, self.bucket)

    def _quantizer(self, kind: str, init: str | None, bucket: int | None) -> Quantizer:
        if kind == "uniform":
            return UniformQuantizer(self.bits, bucket, self.stochastic, self.scale, self.groups, self.zero_point, self.scale_dtype)
        return LearnedPointsQuantizer(self.bits, bucket, init or self.points_init, groups=self.groups, scale_dtype=self.scale_dtype)

    def quantizers_by_name(self, kind: str, init: str | None = None) -> dict[str, Quantizer]:
        """`bucket_by_name` as quantizers: {glob pattern: its quantizer}, in the order given."""
        out = {}
        for item in self.bucket_by_name:
            pattern, _, bucket = item.rpartition("=")
            if not pattern or not (bucket.isdigit() and int(bucket) > 0):
                raise QDistillError(f"bucket_by_name takes GLOB=N (N a positive bucket size, e.g. '*word_embeddings*=128'), got {item!r}")
            if pattern in out:
                raise QDistillError(f"bucket_by_name names {pattern!r} twice: give each pattern once")
            out[pattern] = self._quantizer(kind, init, int(bucket))
        return out

    def select_kwargs(self) -> dict:
        return {"include": self.include or None, "exclude": self.exclude or None, "keep_first_last": self.keep_first_last}

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise QDistillError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**values)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise QDistillError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise QDistillError(f"config file {path} is a directory: give the YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise QDistillError(f"cannot read config file {path}: {type(e).__name__}") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise QDistillError(f"config file {path} is not valid YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(values, dict):
        raise QDistillError(f"config file {path} must hold a mapping of option: value")
    return values
