"""A run's whole state, captured and put back bit for bit: resume after a kill, and the guard's rollback.

The state is the model (shadow weights, quantizer points, BatchNorm statistics), the optimizer and
schedule, every random generator the step draws from, and the loop's counters. The data order needs
no saving: an epoch's order is a function of (seed, epoch) alone (`data.epoch_order`).
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch
from torch import nn

from qdistill.errors import QDistillError
from qdistill.files import open_unlinked, replaced_whole
from qdistill.train import distributed


def on_cpu(value):
    """A copy with every tensor in CPU memory (a shard of a sharded model stays where it is: it is one rank's
    share); loading it back puts each on its parameter's device, bit for bit."""
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    if distributed.is_dtensor(value):
        return value.detach().clone()
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return copy.deepcopy(value)


def capture(model: nn.Module, opt, schedule, loop: dict) -> dict:
    """A copy of everything a step reads or changes, kept in CPU memory: with AdamW on a GPU, a copy there
    would take about three times the model's memory again."""
    return {
        "model": on_cpu(model.state_dict()),
        "optimizer": on_cpu(opt.state_dict()),
        "schedule": schedule.state_dict(),
        **rng_state(),
        "loop": copy.deepcopy(loop),
    }


def for_file(state: dict, model: nn.Module, opt) -> dict:
    """`capture`'s result as a checkpoint holds it: a sharded model's (FSDP2) is each rank's shard, so the
    whole state is gathered instead (every rank calls this; rank 0 gets it, and alone writes it)."""
    if not distributed.is_sharded(model):
        return state
    model_state, opt_state = distributed.full_state(model, opt)
    return {**state, "model": model_state, "optimizer": opt_state, "full": True}


def restore(state: dict, model: nn.Module, opt, schedule) -> dict:
    """Put `capture`'s (or `for_file`'s) result back; returns the loop's counters. A state that does not
    fit (a run resumed with other settings or code) is one QDistillError."""
    try:
        if state.get("full"):  # gathered from shards (FSDP2): each rank takes its own, or one process all
            distributed.load_full_state(model, state["model"], opt, copy.deepcopy(state["optimizer"]))
        elif distributed.is_sharded(model) and not distributed.holds_shards(state["model"]):
            raise QDistillError("this run's state was saved by one process, unsharded: resume it in one process (or with --parallel ddp)")
        else:
            model.load_state_dict(state["model"])
            opt.load_state_dict(copy.deepcopy(state["optimizer"]))
        schedule.load_state_dict(state["schedule"])
        set_rng_state(state)
        return copy.deepcopy(state["loop"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise QDistillError(f"the saved run state does not fit this run ({type(e).__name__}: {str(e).splitlines()[0][:200]}); start a new run") from None


def load_finished(model: nn.Module, done: dict) -> dict:
    """A phase a resumed run had finished: the model as it left it (weights, random state, mode); returns its result."""
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


def rng_state() -> dict:
    return {"rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _well_formed(saved) -> bool:
    """The checkpoint's own structure, before any of it is used: a state.pt may be damaged, or come from someone else."""
    phases = [*saved["done"].values(), *([saved["current"]] if saved.get("current") is not None else [])] if isinstance(saved, dict) and isinstance(saved.get("done"), dict) else None
    return (
        phases is not None and _int(saved.get("log_bytes"))
        and all(isinstance(p, dict) and isinstance(p.get("model"), dict) and isinstance(p.get("rng"), torch.Tensor) for p in phases)
        and all(isinstance(p.get("result"), dict) for p in saved["done"].values())
        and (saved.get("current") is None or isinstance(saved["current"].get("phase"), str) and isinstance(saved["current"].get("loop"), dict) and _int(saved["current"]["loop"].get("step")))
    )


def check_intervals(every_steps: int | None, every_minutes: float | None) -> None:
    if every_steps is not None and not every_steps > 0 or every_minutes is not None and not 0 < every_minutes < float("inf"):
        raise QDistillError(f"checkpoint intervals must be positive, got {every_steps} steps and {every_minutes} minutes")


class Checkpoint:
    """Saves a run's state to one file, atomically, every `every_steps` steps or `every_minutes`, and at
    the end of each phase; built over an existing file, it hands that state back so the run resumes.

    A phase that finished keeps its final model, so a run killed in a later phase redoes nothing.
    `log_path` (the run's metrics.jsonl) is cut back to its length at the last save, so a resumed
    run logs each step once. Under torchrun rank 0 writes the file and every rank reads it; the state is
    the global one (the weights and optimizer state every rank holds, the data order a function of the
    step), so a run resumes with as many processes as before or another number.
    """

    def __init__(self, path: str | Path, every_steps: int | None = None, every_minutes: float | None = None, log_path: Path | None = None):
        check_intervals(every_steps, every_minutes)
        self.path, self.log_path = Path(path), Path(log_path) if log_path is not None else None
        self.every_steps, self.every_seconds = every_steps, every_minutes * 60 if every_minutes else None
        self.saved = {"done": {}, "current": None, "log_bytes": 0}
        if self.path.exists():
            try:
                self.saved = torch.load(self.path, map_location="cpu", weights_only=True)
                if not _well_formed(self.saved):
                    raise ValueError
            except Exception:
                raise QDistillError(f"{self.path} is damaged: this run cannot be resumed (start a new one)") from None
        self.writer = distributed.is_main()  # under torchrun rank 0 writes; every rank reads the state to resume
        if self.writer and self.log_path is not None and self.log_path.exists():  # what a killed run logged after its last save is logged again
            with open_unlinked(self.log_path, "r+") as log:
                log.truncate(min(self.saved["log_bytes"], os.fstat(log.fileno()).st_size))
        self.last_save = time.monotonic()

    def finished(self, phase: str) -> dict | None:
        return self.saved["done"].get(phase)

    def running(self, phase: str) -> dict | None:
        current = self.saved["current"]
        return current if current is not None and current["phase"] == phase else None

    def step_due(self, step: int) -> bool:
        return self.every_steps is not None and step % self.every_steps == 0

    def time_due(self) -> bool:
        return self.writer and self.every_seconds is not None and time.monotonic() - self.last_save >= self.every_seconds

    def save_running(self, phase: str, state: dict) -> None:
        self.saved["current"] = {"phase": phase, **state}
        self._write()

    def save_finished(self, phase: str, model: nn.Module, result: dict) -> None:
        """Every rank calls this (a sharded model's state is gathered)."""
        state = distributed.full_state(model)[0] if distributed.is_sharded(model) else model.state_dict()
        self.saved["done"][phase] = {"model": {k: v.detach().cpu().clone() for k, v in state.items()}, **rng_state(), "result": result}
        self.saved["current"] = None
        self._write()

    def _write(self) -> None:
        if not self.writer:
            return
        self.saved["log_bytes"] = self.log_path.stat().st_size if self.log_path is not None and self.log_path.exists() else 0
        with replaced_whole(self.path) as tmp, open(tmp, "wb") as f:
            torch.save(self.saved, f)
            f.flush()
            os.fsync(f.fileno())
        self.last_save = time.monotonic()
