"""What the loop keeps track of around each step, so that `loop.fit` shows only the step itself.

Per phase: the step count and timing, the loss per step and the epoch records (validation accuracy),
the divergence guard with its rollback point, and the checkpoint of a run that must survive a kill.
"""

from __future__ import annotations

import time

from torch import nn

from qdistill.errors import Diverged, QDistillError
from qdistill.train import distributed
from qdistill.train.config import TrainConfig
from qdistill.train.guard import DivergenceGuard
from qdistill.train.state import Checkpoint, capture, for_file, restore

MAX_ROLLBACKS = 3
ROLLBACK_CLIP = 1.0  # the gradient norm a first rollback clips to when the run set none (bench/results/ablation-cpu-medium-2bit-clip.md)


class PhaseTracker:
    def __init__(self, name: str, model: nn.Module, opt, schedule, cfg: TrainConfig, task, steps_per_epoch: int, log, checkpoint: Checkpoint | None):
        self.name, self.model, self.opt, self.schedule = name, model, opt, schedule
        self.task, self.steps_per_epoch, self.log, self.checkpoint = task, steps_per_epoch, log, checkpoint
        self.cfg = cfg
        self.guard = DivergenceGuard(name, cfg.guard_factor, enabled=cfg.guard != "off")
        self.run = {"step": 0, "seconds": 0.0, "seen": 0, "loss_sum": 0.0, "records": [], "grad_clip": cfg.grad_clip, "rollbacks": 0, "guard": self.guard.state()}
        resumed = checkpoint.running(name) if checkpoint else None
        if resumed is not None:  # a killed run's state: continue from there
            fresh, self.run = self.run, restore(resumed, model, opt, schedule)
            if set(self.run) != set(fresh) or any(not isinstance(self.run[k], type(v)) for k, v in fresh.items() if v is not None) or not isinstance(self.run["guard"].get("recent"), list):
                raise QDistillError("the saved run state's counters are damaged or not this version's; start a new run")
            self.guard.load(self.run["guard"])
        self.good = capture(model, opt, schedule, self.run) if cfg.guard == "rollback" else None  # the rollback point
        self.status = ""
        self.start = time.perf_counter()

    @property
    def step(self) -> int:
        return self.run["step"]

    @property
    def grad_clip(self) -> float | None:
        return self.run["grad_clip"]

    def after_step(self, loss, batch_size: int, total: int) -> Diverged | None:
        """Count the step; every few steps read the losses back, check them, log them, and at an epoch's
        end evaluate; save the checkpoint when due. Returns the guard's Diverged, for the loop to roll back.

        Checks fall on steps alone (a full group, an epoch's end, a save every N steps), never on the
        clock, so the rollback point, and so the result, does not depend on how fast the run went."""
        self.run["step"] += 1
        self.run["seen"] += batch_size
        step = self.run["step"]
        end_of_epoch = step % self.steps_per_epoch == 0
        save = self.checkpoint is not None and self.checkpoint.step_due(step)
        if not (self.guard.add(loss) or end_of_epoch or save):
            return None
        try:
            losses = self.guard.check(step)
        except Diverged as e:
            return e
        for i, value in enumerate(losses, start=step - len(losses) + 1):  # the training curve, one point per step
            self.log({"phase": self.name, "step": i, "epoch": i / self.steps_per_epoch, "loss": value})
        self.run["loss_sum"] += sum(losses)
        self.run["guard"] = self.guard.state()
        if end_of_epoch:
            self.end_epoch(step // self.steps_per_epoch)
        save = self.checkpoint is not None and step < total and (save or self.checkpoint.time_due())
        save = distributed.broadcast(save)  # rank 0's clock decides: under FSDP2 every rank gathers the state
        if save:
            self.take_time()
        if self.good is not None or save:
            state = capture(self.model, self.opt, self.schedule, self.run)
            self.good = state if self.good is not None else None
            if save:
                self.checkpoint.save_running(self.name, for_file(state, self.model, self.opt))
        return None

    @property
    def can_roll_back(self) -> bool:
        """A rollback point is kept (`--guard rollback`) and fewer than MAX_ROLLBACKS were taken."""
        return self.good is not None and self.run["rollbacks"] < MAX_ROLLBACKS

    def roll_back(self, e: Diverged) -> None:
        """Back to the last state that passed the guard, with the gradient clipped: to 1.0 (or the run's
        own clip halved), and halved again at each further rollback, so a replay is never the same run."""
        rollbacks, clip = self.run["rollbacks"] + 1, self.run["grad_clip"]
        self.run = restore(self.good, self.model, self.opt, self.schedule)
        self.run["rollbacks"], self.run["grad_clip"] = rollbacks, ROLLBACK_CLIP if clip is None else clip / 2
        self.guard.load(self.run["guard"])
        self.log({"phase": self.name, "rollback_to": self.step, "diverged_at": e.step, "diverged_loss": e.record()["loss"], "grad_clip": self.grad_clip})

    def end_epoch(self, epoch: int) -> None:
        self.take_time()
        run = self.run
        record = {"phase": self.name, "epoch": epoch, "step": run["step"], "train_loss": run["loss_sum"] / self.steps_per_epoch, "samples_per_s": run["seen"] / run["seconds"]}
        if self.task.has_split("val") and (distributed.is_main() or distributed.is_sharded(self.model)):  # rank 0 alone, but a sharded model needs every rank
            record.update({f"val_{k}": v for k, v in self.task.evaluate(self.model, "val").items()})
        run["records"].append(record)
        run["loss_sum"] = 0.0
        self.log(record)
        metric = f"val_{self.task.metric}"
        self.status = f"loss {record['train_loss']:.3f}" + (f" val {self.task.metric} {record[metric]:.2f}" if metric in record else "")

    def take_time(self) -> None:
        now = time.perf_counter()
        self.run["seconds"] += now - self.start
        self.start = now

    def finish(self) -> dict:
        result = {"seconds": self.run["seconds"], "samples": self.run["seen"], "records": self.run["records"]}
        if self.checkpoint:
            self.checkpoint.save_finished(self.name, self.model, result)
        return result
