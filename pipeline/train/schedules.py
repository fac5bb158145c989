"""Learning-rate schedules: the paper's divide-by-10-on-plateau and torchvision's step,
both behind an optional linear warmup.

A schedule owns the lr: the training loop asks it for each step's lr (`apply`) and tells
it each epoch's val top-1 error (`step`); its whole state goes into every checkpoint.

Warmup (train.warmup_epochs, Goyal et al. 2017): the lr rises linearly, step by step,
from lr / steps to lr over the first warmup epochs. Right after initialisation the loss
surface is at its sharpest, and a full-size SGD-momentum step there can overshoot into a
region the network does not come back from (dead ReLUs, saturated tanh units: train loss
pinned at ln C). Small first steps let the curvature fall before the full lr applies.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import TrainParams


class _Resumable:
    """A schedule whose whole state is its attributes (saved in every checkpoint)."""

    lr: float
    stop: bool
    warmup_epochs: int = 0

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume."""
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()` output."""
        vars(self).update(state)

    def lr_at(self, epochs_done: float) -> float:
        """The lr of the step taken after `epochs_done` epochs (fractional within an epoch,
        counting the step itself): this epoch's lr, scaled down linearly during warmup."""
        if epochs_done >= self.warmup_epochs:
            return self.lr
        return self.lr * epochs_done / self.warmup_epochs

    def apply(self, opt: torch.optim.Optimizer, epochs_done: float = float("inf")) -> float:
        """Sets the optimizer's lr for the step ending at `epochs_done` (default: past any
        warmup): the schedule alone owns the lr.

        Returns:
            The lr set.
        """
        lr = self.lr_at(epochs_done)
        for group in opt.param_groups:
            group["lr"] = lr
        return lr


class PlateauSchedule(_Resumable):
    """The paper's schedule: divide lr by 10 when val error stops improving.

    After `patience` epochs without a new best val top-1 error the lr drops tenfold; after
    `max_reductions` drops, a further plateau ends training (the paper reduced three
    times before stopping).
    """

    def __init__(self, lr: float, patience: int, max_reductions: int, warmup_epochs: int = 0) -> None:
        self.lr = lr
        self.warmup_epochs = warmup_epochs
        self.patience = patience
        self.max_reductions = max_reductions
        self.best = float("inf")
        self.bad_epochs = 0
        self.reductions = 0
        self.stop = False

    def step(self, val_error: float) -> None:
        """Updates the schedule with one epoch's val top-1 error."""
        if val_error < self.best:
            self.best, self.bad_epochs = val_error, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            if self.reductions >= self.max_reductions:
                self.stop = True
            else:
                self.lr /= 10.0
                self.reductions += 1
                self.bad_epochs = 0


class StepSchedule(_Resumable):
    """torchvision's reference recipe: lr /10 every `step_size` epochs."""

    def __init__(self, lr: float, step_size: int, warmup_epochs: int = 0) -> None:
        self.warmup_epochs = warmup_epochs
        self.base_lr = lr
        self.lr = lr
        self.step_size = step_size
        self.epochs = 0
        self.stop = False

    def step(self, val_error: float) -> None:  # noqa: ARG002 - same interface as plateau
        """Counts one epoch."""
        self.epochs += 1
        self.lr = self.base_lr * 0.1 ** (self.epochs // self.step_size)


def make_schedule(p: TrainParams) -> PlateauSchedule | StepSchedule:
    """The lr schedule chosen by train.schedule."""
    if p.schedule == "plateau":
        return PlateauSchedule(p.lr, p.patience, p.max_reductions, p.warmup_epochs)
    return StepSchedule(p.lr, p.step_size, p.warmup_epochs)
