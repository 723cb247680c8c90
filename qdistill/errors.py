"""One exception type for mistakes a user can fix; the CLI prints its message without a traceback."""


class QDistillError(Exception):
    """Bad input: a config value out of range, a missing or corrupt file, mismatched models."""


class Diverged(QDistillError):
    """Training stopped because the loss became non-finite or exploded (the divergence guard).

    `phase` names the training phase ("qd 2b", ...), `step` the optimizer step (counted from 1 within
    the phase) at which the bad loss was seen, `loss` its value."""

    def __init__(self, phase: str, step: int, loss: float, reason: str):
        self.phase, self.step, self.loss = phase, step, loss
        super().__init__(
            f"{phase}: training diverged at step {step} ({reason}, loss {loss:.4g}); "
            "rerun with --guard rollback (roll back and clip the gradient) or --grad-clip 1"
        )

    def record(self) -> dict:
        """Where and how the run diverged, as JSON (which has no NaN: a non-finite loss is written as text)."""
        return {"phase": self.phase, "step": self.step, "loss": self.loss if abs(self.loss) < float("inf") else str(self.loss)}
