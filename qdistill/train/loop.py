"""The loop of method.md, Figure 1: quantize -> distill -> SGD step on the full-precision weights.

Every method (fp, kd, ptq, qat, qd, dq, qd+dq) runs through `fit`; they differ only in the quantizer
attached, whether a teacher is used, and which tensors the optimizer steps (see `config.METHODS`).
Every task (image classification, language modelling, ...) too: the loop is given a task, which
makes the batches, runs the model, computes the loss and the metrics (see `qdistill.tasks`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from qdistill.data import Dataset
from qdistill.distill import check_compatible
from qdistill.errors import QDistillError
from qdistill.quant import attach, detach, fused_quantization, quantized_tensors, redistribute_points
from qdistill.train import distributed
from qdistill.train.config import TrainConfig
from qdistill.train.state import Checkpoint, set_rng_state
from qdistill.tasks import Task, accuracy, as_task, to_device
from qdistill.train.tracker import PhaseTracker
from qdistill.ui import make_progress


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


def make_optimizer(kind: str, params, lr: float, cfg: TrainConfig):
    """`momentum` is SGD's (Nesterov when above 0) and AdamW's first-moment decay (beta1): one knob, used by both."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)


def fit(model, params, task: Task, teacher, cfg: TrainConfig, epochs: int, lr: float, name: str, log, progress, optimizer: str = "sgd", checkpoint: Checkpoint | None = None) -> dict:
    """Run `epochs` of the loop, stepping only `params`; returns timing and the per-epoch records.

    With a `checkpoint`, the phase starts where a killed run left it (or is skipped if it finished)."""
    done = checkpoint.finished(name) if checkpoint else None
    if done is not None:  # as the finished phase left the model: its weights, random state and mode
        try:
            if distributed.is_sharded(model):
                distributed.load_full_state(model, done["model"])
            else:
                model.load_state_dict(done["model"])
        except RuntimeError as e:
            raise QDistillError(f"the saved run state does not fit this run ({str(e).splitlines()[0][:200]}); start a new run") from None
        set_rng_state(done)
        model.train()
        return done["result"]
    device = next(model.parameters()).device
    quantizers = [qt.quantizer for qt in quantized_tensors(model)]
    opt = make_optimizer(optimizer, params, lr, cfg)
    steps_per_epoch = math.ceil(task.train_size() / cfg.batch_size)
    total = epochs * steps_per_epoch
    schedule = make_schedule(opt, cfg.schedule, total, cfg.warmup)
    tracker = PhaseTracker(name, model, opt, schedule, cfg, task, steps_per_epoch, log, checkpoint)
    if tracker.step > total:  # a damaged or crafted state.pt: the untrained model would be saved as finished
        raise QDistillError(f"the saved run state is at step {tracker.step} of a phase of {total} steps: it is not this run's; start a new run")
    bar = progress.add_task(name, total=total, completed=tracker.step, status="")
    net = distributed.wrap(model)  # under torchrun: DDP, which averages the ranks' gradients
    while tracker.step < total:
        model.train()
        batch = task.train_batch(*divmod(tracker.step, steps_per_epoch), cfg)
        rows, labels = len(batch["x"]), distributed.counted(batch)  # what the loss is a mean over: examples, or real tokens
        batch, mine = distributed.shard(batch)  # this rank's share of the global batch (all of it in one process)
        batch = to_device(batch, device)
        out = task.forward(net, batch)  # 1. quantize: the parametrized weights read as Q(w)
        target = teacher(batch) if teacher is not None else None
        loss = task.loss(out, target, batch, cfg)  # 2. distill
        opt.zero_grad(set_to_none=True)
        (loss * distributed.loss_weight(mine, labels)).backward()  # straight-through: dL/dQ(w) reaches w
        if tracker.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, tracker.grad_clip)
        opt.step()  # 3. SGD step on the full-precision weights (or the points)
        schedule.step()
        for q in quantizers:
            q.after_step()
        tracker.after_step(distributed.global_mean(loss, mine, labels), rows, total)  # the guard (which may roll back), the log, the checkpoint
        progress.update(bar, completed=tracker.step, status=tracker.status)
    return tracker.finish()


def attach_learned(model: nn.Module, task: Task, teacher, cfg: TrainConfig, init: str) -> None:
    """Attach learned-points quantizers, optionally sharing the points among tensors by gradient norm."""
    attach(model, cfg.make_quantizer("learned", init), **cfg.select_kwargs())
    if not cfg.redistribute:
        return
    tensors = quantized_tensors(model)
    norms = gradient_norms(model, [qt.shadow for qt in tensors], task, teacher, cfg)
    counts = redistribute_points(norms, total=len(tensors) * 2**cfg.bits)
    for qt, n in zip(tensors, counts):
        qt.quantizer.init_points(qt.shadow, n)


def gradient_norms(model, tensors, task: Task, teacher, cfg: TrainConfig, n_batches: int = 4) -> list[float]:
    """Each tensor's gradient norm, summed over the first `n_batches` batches of the training data."""
    device = next(model.parameters()).device
    grads = [torch.zeros_like(t) for t in tensors]
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


def train(
    student: nn.Module,
    data: Dataset | Task,
    cfg: TrainConfig,
    teacher: nn.Module | None = None,
    cache_dir=None,
    log=None,
    quiet=False,
    checkpoint: Checkpoint | None = None,
    final_eval: bool = True,
) -> TrainResult:
    """Train (or only quantize, for ptq) `student` with the method in `cfg` on a task (a `Dataset` is
    image classification); the student is changed in place.

    With a `checkpoint`, the run's state is saved as it goes, and a run over a checkpoint that a killed
    run left continues where it stopped, ending with the same weights bit for bit.

    Under torchrun (a process group joined, `train.distributed`) each rank trains on its share of every
    batch, and rank 0 alone evaluates, logs, saves the checkpoint and shows progress: on the other ranks
    the result holds the trained model but no metrics. With `parallel: fsdp` the student is sharded in
    place, and rank 0's result holds a whole copy gathered from the shards. `final_eval=False` leaves the final validation and
    test metrics to the caller too (who scores the packed file it saves, say)."""
    cfg.validate()
    task = as_task(data)
    log = log if log is not None and distributed.is_main() else (lambda record: None)
    quiet = quiet or not distributed.is_main()
    device = distributed.device_for(resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)
    method = cfg.spec
    student.to(device, memory_format=memory_format(student, cfg, device))
    if cfg.needs_teacher and teacher is None:
        raise QDistillError(f"method {cfg.method} needs a teacher")
    use_teacher = teacher is not None and method.distill
    sharded = cfg.parallel == "fsdp" and distributed.active()
    if use_teacher:
        teacher.to(device, memory_format=memory_format(teacher, cfg, device))
        check_compatible(teacher, student, to_device(task.sample(), device), task.forward)
    history, seconds, samples = [], 0.0, 0
    with make_progress(quiet) as progress:
        with distributed.main_first():  # a cache of the teacher's targets is built once, by rank 0
            teacher_fn = task.teacher(teacher, cfg, cache_dir, progress) if use_teacher else None
        if method.quantizer == "uniform":
            attach(student, cfg.make_quantizer("uniform"), **cfg.select_kwargs())
        if method.trains == "weights":
            if not any(p.requires_grad for p in student.parameters()):
                raise QDistillError("the student has no trainable weights (requires_grad is off for all of them): turn it on for those to train")
            whole = copy.deepcopy(student).cpu() if sharded and distributed.is_main() else None  # what rank 0 gathers the weights into
            if sharded:
                distributed.shard_weights(student)
            params = [p for p in student.parameters() if p.requires_grad]
            with fused_quantization(student, enabled=False if sharded else None):  # off-CPU: one batch of kernels for all tensors, same values
                name = f"{cfg.method} {cfg.bits}b" if method.quantizer else cfg.method
                out = fit(student, params, task, teacher_fn, cfg, cfg.epochs, cfg.lr, name, log, progress, cfg.optimizer, checkpoint)
            history += out["records"]
            seconds, samples = seconds + out["seconds"], samples + out["samples"]
            if sharded:  # the whole trained model, gathered (every rank sends its shards) onto rank 0, which evaluates and saves it
                state = distributed.full_state(student)[0]
                if whole is not None:
                    whole.load_state_dict(state)
                    student = whole.to(device)
        if method.quantizer == "learned" or method.then == "dq":
            if cfg.dq_teacher == "self":  # the full-precision version of this very model
                with distributed.main_first():
                    teacher_fn = task.teacher(detach(copy.deepcopy(student), keep_quantized=False), cfg, cache_dir, progress)
            # Points are learned for the model as it stands: a quantized model is baked to its levels first,
            # so each weight keeps its level and the points move the levels. (Learning them over the shadow
            # weights of qd instead reassigns the many weights that training left near a decision boundary:
            # 2-bit accuracy fell by 5 points where baking gained 0.7.)
            detach(student, keep_quantized=True)
            init = "uniform" if method.then == "dq" else cfg.points_init  # qd+dq starts exactly at the qd levels
            attach_learned(student, task, teacher_fn, cfg, init)
            student.requires_grad_(False)
            points = []
            for qt in quantized_tensors(student):
                qt.quantizer.points.requires_grad_(True)
                points.append(qt.quantizer.points)
            dq_cfg = cfg.replace(weight_decay=0.0)
            out = fit(student, points, task, teacher_fn, dq_cfg, cfg.dq_epochs, cfg.points_lr, f"dq {cfg.bits}b points", log, progress, cfg.points_optimizer, checkpoint)
            history += out["records"]
            seconds, samples = seconds + out["seconds"], samples + out["samples"]
    if not (final_eval and distributed.is_main()):  # under torchrun rank 0 alone evaluates (and writes)
        return TrainResult(student, cfg, {}, seconds, samples / seconds if seconds else 0.0, history)
    val = task.evaluate(student, "val") if task.has_split("val") else None
    return TrainResult(student, cfg, task.evaluate(student, "test"), seconds, samples / seconds if seconds else 0.0, history, val)
