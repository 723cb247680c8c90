"""The divergence guard: notices a loss that became non-finite or exploded, and names the step.

Losses are read back from the device in groups (`check_every` steps), not after every step, so the
guard costs no synchronization per step on a GPU; a rollback returns to the last group that was fine.
"""

from __future__ import annotations

import statistics

import torch

from qdistill.errors import Diverged

WINDOW = 200  # steps in the running median
WARMUP = 20  # steps seen before the ratio test applies (the first losses fall fast)
MEDIAN_FLOOR = 1e-3  # a loss that fell to about 0 (a memorized subset) makes no small loss a spike


class DivergenceGuard:
    def __init__(self, phase: str, factor: float | None, enabled: bool = True, check_every: int = 16):
        self.phase, self.factor, self.enabled, self.check_every = phase, factor, enabled, check_every
        self.pending: list[torch.Tensor] = []
        self.recent: list[float] = []

    def state(self) -> dict:
        return {"recent": list(self.recent)}

    def load(self, state: dict) -> None:
        self.recent, self.pending = list(state["recent"]), []

    def add(self, loss: torch.Tensor) -> bool:
        """Queue one step's loss; True when a group is full and `check` should run."""
        self.pending.append(loss.detach())
        return len(self.pending) >= self.check_every

    def check(self, last_step: int) -> list[float]:
        """The queued losses (the last one taken at `last_step`); raises Diverged at the first bad one."""
        values = torch.stack(self.pending).float().cpu().tolist() if self.pending else []
        self.pending = []
        first = last_step - len(values) + 1
        for step, value in enumerate(values if self.enabled else [], start=first):
            if value != value or value in (float("inf"), float("-inf")):
                raise Diverged(self.phase, step, value, "the loss is not finite")
            if self.factor is not None and len(self.recent) >= WARMUP:
                median = statistics.median(self.recent)
                if value > self.factor * max(median, MEDIAN_FLOOR):
                    raise Diverged(self.phase, step, value, f"over {self.factor:g}x the running median {median:.4g}")
            self.recent = self.recent[-(WINDOW - 1) :] + [value]
        return values
