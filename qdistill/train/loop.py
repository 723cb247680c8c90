"""The loop of method.md, Figure 1: quantize -> distill -> SGD step on the full-precision weights.

Every method (fp, kd, ptq, qat, qd, dq, qd+dq) runs through `fit`; they differ only in the quantizer
attached, whether a teacher is used, and which tensors the optimizer steps: a method is a tuple of
phases (`config.Method.phases`), each one `Phase`. Every task (image classification, language
modelling, ...) too: the loop is given a task, which makes the batches, runs the model, computes the
loss and the metrics (see `qdistill.tasks`). Read top-down: `train`, its two phases, `fit`, then helpers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from qdistill.data import Dataset
from qdistill.distill import check_compatible
from qdistill.errors import QDistillError
from qdistill.modes import evaluating
from qdistill.quant import attach, detach, fused_quantization, quantized_tensors, redistribute_points
from qdistill.tasks import Task, accuracy, as_task, to_device
from qdistill.train import distributed
from qdistill.train.config import TrainConfig
from qdistill.train.state import Checkpoint, load_finished
from qdistill.train.tracker import PhaseTracker


@dataclass
class TrainResult:
    model: nn.Module  # with its quantizers attached: reading a weight gives the shipped value
    config: TrainConfig
    test: dict  # the task's metrics on the test split, of the quantized model, never of the shadow weights
    train_seconds: float = 0.0
    samples_per_s: float = 0.0
    history: list[dict] = field(default_factory=list)
    val: dict | None = None  # on the validation split, where the data have one: what options are chosen on

    @property
    def test_acc(self) -> float | None:
        return self.test.get("acc")

    @property
    def val_acc(self) -> float | None:
        return self.val.get("acc") if self.val else None


@dataclass
class Phase:
    """One run of the loop: the tensors it steps, for how long, and with which optimizer."""

    name: str  # also the phase's key in a checkpoint
    params: list[torch.Tensor]
    epochs: int
    lr: float
    optimizer: str  # "sgd" (Nesterov when momentum > 0), "adam" or "adamw"
    momentum: float  # SGD's momentum and AdamW's beta1: one knob, used by both
    weight_decay: float


@dataclass
class Events:
    """What the loop tells whoever runs it: `record(dict)` for each step's loss, each epoch's metrics and each
    rollback (a run directory's metrics.jsonl); `progress(name, done, total, status)` (the CLI's bars)."""

    record: Callable[[dict], None] = lambda record: None
    progress: Callable[..., None] = lambda name, done, total, status="": None


def train(
    student: nn.Module,
    data: Dataset | Task,
    cfg: TrainConfig,
    teacher: nn.Module | None = None,
    cache_dir=None,
    log=None,
    progress=None,
    checkpoint: Checkpoint | None = None,
    final_eval: bool = True,
) -> TrainResult:
    """Train (or only quantize, for ptq) `student` with the method in `cfg` on a task (a `Dataset` is
    image classification); the student is changed in place. `log` and `progress` are the `Events`.

    With a `checkpoint`, the run's state is saved as it goes, and a run over a checkpoint that a killed
    run left continues where it stopped, ending with the same weights bit for bit.

    Under torchrun (a process group joined, `train.distributed`) each rank trains on its share of every
    batch, and rank 0 alone evaluates, logs, saves the checkpoint and shows progress: on the other ranks
    the result holds the trained model but no metrics. With `parallel: fsdp` the student is sharded in
    place, and rank 0's result holds a whole copy gathered from the shards. `final_eval=False` leaves the final validation and
    test metrics to the caller too (who scores the packed file it saves, say)."""
    cfg.validate()
    task = as_task(data)
    events = Events()
    if distributed.is_main():  # under torchrun rank 0 alone logs and shows progress
        events = Events(log or events.record, progress or events.progress)
    device = distributed.device_for(resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)
    method = cfg.spec
    student.to(device, memory_format=memory_format(student, cfg, device))
    if cfg.dropout is not None:
        set_dropout(student, cfg.dropout)
    if cfg.needs_teacher and teacher is None:
        raise QDistillError(f"method {cfg.method} needs a teacher")
    targets = None  # the teacher's targets of a batch: live, or computed once and cached
    if teacher is not None and method.distill:
        teacher.to(device, memory_format=memory_format(teacher, cfg, device))
        check_compatible(teacher, student, to_device(task.sample(), device), task.forward)
        with distributed.main_first():  # a cache of the teacher's targets is built once, by rank 0
            targets = task.teacher(teacher, cfg, cache_dir, events.progress)
    if method.quantizer == "uniform":
        attach(student, cfg.make_quantizer("uniform"), by_name=cfg.quantizers_by_name("uniform"), **cfg.select_kwargs())
    runs = []
    if "weights" in method.phases:
        student, out = fit_weights(student, task, targets, cfg, events, checkpoint)
        runs.append(out)
    if "points" in method.phases:
        runs.append(fit_points(student, task, targets, cfg, events, checkpoint, cache_dir))
    history = [record for out in runs for record in out["records"]]
    seconds, samples = sum(out["seconds"] for out in runs), sum(out["samples"] for out in runs)
    speed = samples / seconds if seconds else 0.0
    if not (final_eval and distributed.is_main()):  # under torchrun rank 0 alone evaluates (and writes)
        return TrainResult(student, cfg, {}, seconds, speed, history)
    val = task.evaluate(student, "val") if task.has_split("val") else None
    return TrainResult(student, cfg, task.evaluate(student, "test"), seconds, speed, history, val)


def fit_weights(student: nn.Module, task: Task, targets, cfg: TrainConfig, events: Events, checkpoint: Checkpoint | None) -> tuple[nn.Module, dict]:
    """The weights phase: the full-precision (shadow) weights stepped through their quantized values. Under
    FSDP the student is sharded for it, and rank 0 gets the whole trained model back."""
    sharded, device = cfg.parallel == "fsdp" and distributed.active(), next(student.parameters()).device
    whole = copy.deepcopy(student).cpu() if sharded and distributed.is_main() else None  # what rank 0 gathers the weights into
    if sharded:
        distributed.shard_weights(student)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise QDistillError("the student has no trainable weights (requires_grad is off for all of them): turn it on for those to train")
    name = f"{cfg.method} {cfg.bits}b" if cfg.spec.quantizer else cfg.method
    phase = Phase(name, params, cfg.epochs, cfg.lr, cfg.optimizer, cfg.momentum, cfg.weight_decay)
    with fused_quantization(student, enabled=False if sharded else None):  # off-CPU: one batch of kernels for all tensors, same values
        out = fit(student, phase, task, targets, cfg, events, checkpoint)
    if sharded:  # the whole trained model, gathered (every rank sends its shards) onto rank 0, which evaluates and saves it
        state = distributed.full_state(student)[0]
        if whole is not None:
            whole.load_state_dict(state)
            student = whole.to(device)
    return student, out


def fit_points(student: nn.Module, task: Task, targets, cfg: TrainConfig, events: Events, checkpoint: Checkpoint | None, cache_dir) -> dict:
    """The points phase (differentiable quantization): the learned quantization points alone, each weight's level frozen.

    Points are learned for the model as it stands: a quantized model is baked to its levels first, so each
    weight keeps its level and the points move the levels. (Learning them over the shadow weights of qd
    instead reassigns the many weights that training left near a decision boundary: 2-bit accuracy fell by
    5 points where baking gained 0.7.) qd+dq starts exactly at the qd levels."""
    if cfg.dq_teacher == "self":  # the full-precision version of this very model
        with distributed.main_first():
            targets = task.teacher(detach(copy.deepcopy(student), keep_quantized=False), cfg, cache_dir, events.progress)
    detach(student, keep_quantized=True)
    attach_learned(student, task, targets, cfg, init="uniform" if cfg.spec.then == "dq" else cfg.points_init)
    student.requires_grad_(False)
    points = [qt.quantizer.points.requires_grad_(True) for qt in quantized_tensors(student)]
    phase = Phase(f"dq {cfg.bits}b points", points, cfg.dq_epochs, cfg.points_lr, cfg.points_optimizer, cfg.momentum, weight_decay=0.0)
    return fit(student, phase, task, targets, cfg, events, checkpoint)


def fit(model: nn.Module, phase: Phase, task: Task, targets, cfg: TrainConfig, events: Events, checkpoint: Checkpoint | None = None) -> dict:
    """Run one phase of the loop; `targets(batch)` gives the teacher's targets (None: no teacher). Returns
    the phase's timing and per-epoch records. With a `checkpoint`, the phase starts where a killed run left
    it (or is skipped if it finished)."""
    done = checkpoint.finished(phase.name) if checkpoint else None
    if done is not None:
        return load_finished(model, done)
    device = next(model.parameters()).device
    quantizers = [qt.quantizer for qt in quantized_tensors(model)]
    opt = make_optimizer(phase)
    steps_per_epoch = math.ceil(task.train_size() / cfg.batch_size)
    total = phase.epochs * steps_per_epoch
    schedule = make_schedule(opt, cfg.schedule, total, cfg.warmup)
    tracker = PhaseTracker(phase.name, model, opt, schedule, cfg, task, steps_per_epoch, events.record, checkpoint)
    if tracker.step > total:  # a damaged or crafted state.pt: the untrained model would be saved as finished
        raise QDistillError(f"the saved run state is at step {tracker.step} of a phase of {total} steps: it is not this run's; start a new run")
    events.progress(phase.name, tracker.step, total)
    net = distributed.wrap(model)  # under torchrun: DDP, which averages the ranks' gradients
    while tracker.step < total:
        model.train()
        batch = task.train_batch(*divmod(tracker.step, steps_per_epoch), cfg)
        rows, labels = len(batch["x"]), distributed.counted(batch)  # what the loss is a mean over: examples, or real tokens
        batch, mine = distributed.shard(batch)  # this rank's share of the global batch (all of it in one process)
        batch = to_device(batch, device)
        out = task.forward(net, batch)  # 1. quantize: the parametrized weights read as Q(w)
        target = targets(batch) if targets is not None else None
        loss = task.loss(out, target, batch, cfg)  # 2. distill
        opt.zero_grad(set_to_none=True)
        (loss * distributed.loss_weight(mine, labels)).backward()  # straight-through: dL/dQ(w) reaches w
        if tracker.grad_clip:
            torch.nn.utils.clip_grad_norm_(phase.params, tracker.grad_clip)
        opt.step()  # 3. SGD step on the full-precision weights (or the points)
        schedule.step()
        for q in quantizers:
            q.after_step(opt)  # (learned points stay sorted, and their optimizer state with them)
        diverged = tracker.after_step(distributed.global_mean(loss, mine, labels), rows, total)  # the guard, the log, the checkpoint
        if diverged is not None:
            if not tracker.can_roll_back:  # --guard stop, or a 4th divergence
                raise diverged
            tracker.roll_back(diverged)  # to the last state the guard passed, the gradient clipped
        events.progress(phase.name, tracker.step, total, tracker.status)
    return tracker.finish()


def make_optimizer(phase: Phase):
    params, lr, momentum, decay = phase.params, phase.lr, phase.momentum, phase.weight_decay
    if phase.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=decay)
    if phase.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=decay)


def make_schedule(opt, kind: str, total_steps: int, warmup: float = 0.0):
    """The learning-rate schedule, with a linear rise over the first `warmup` fraction of the steps."""
    if kind == "onecycle" and total_steps > 0:
        # cycle_momentum=False: the configured momentum (or Adam's beta1) stays what the user set
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total_steps, cycle_momentum=False, pct_start=warmup or 0.3
        )
    rise = round(warmup * total_steps)
    if kind == "cosine" and total_steps > 0 and not rise:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps)
    decay = (lambda t: 0.5 * (1 + math.cos(math.pi * t / max(1, total_steps - rise)))) if kind == "cosine" else (lambda t: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (step + 1) / rise if step < rise else decay(step - rise))


def attach_learned(model: nn.Module, task: Task, teacher, cfg: TrainConfig, init: str) -> None:
    """Attach learned-points quantizers, optionally sharing the points among tensors by gradient norm."""
    attach(model, cfg.make_quantizer("learned", init), by_name=cfg.quantizers_by_name("learned", init), **cfg.select_kwargs())
    if not cfg.redistribute:
        return
    tensors = quantized_tensors(model)
    norms = gradient_norms(model, [qt.shadow for qt in tensors], task, teacher, cfg)
    counts = redistribute_points(norms, total=len(tensors) * 2**cfg.bits)
    for qt, n in zip(tensors, counts):
        qt.quantizer.init_points(qt.shadow, n)


def gradient_norms(model, tensors, task: Task, teacher, cfg: TrainConfig, n_batches: int = 4) -> list[float]:
    """Each tensor's gradient norm, summed over the first `n_batches` batches of the training data; in eval
    mode, so that probing changes no BatchNorm statistics and draws no dropout."""
    device = next(model.parameters()).device
    grads = [torch.zeros_like(t) for t in tensors]
    with evaluating(model):
        for i, batch in enumerate(task.ordered_batches("train", cfg.batch_size)):
            if i == n_batches:
                break
            batch = to_device(batch, device)
            target = teacher(batch) if teacher is not None else None
            for g, gi in zip(grads, torch.autograd.grad(task.loss(task.forward(model, batch), target, batch, cfg), tensors)):
                g += gi
    return [g.norm().item() for g in grads]


def memory_format(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.memory_format:
    """The configured layout for a model with 4-d weights (convolutions); contiguous for any other, since
    converting an LSTM's weights made its training step slower."""
    has_4d = any(p.dim() == 4 for p in model.parameters())
    return cfg.torch_memory_format(device) if has_4d else torch.contiguous_format


def set_dropout(model: nn.Module, p: float) -> None:
    """The dropout of `model` at probability `p` (kept after the run): its Dropout modules (BERT's attention
    dropout reads its module's too) and its recurrent layers' dropout between layers. A model that keeps a
    dropout rate as a plain number elsewhere keeps that one."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = p
        elif isinstance(m, nn.RNNBase) and m.num_layers > 1:
            m.dropout = p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise QDistillError(f"unknown device {name!r}: {e}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise QDistillError(f"device {name!r}: torch finds no such CUDA device here: use --device cpu (or auto)")
    return device


evaluate = accuracy  # top-1 accuracy in percent over tensors (x, y): image classification's metric
