"""Stop a run that has gone non-finite before it writes anything.

A learning rate or weight decay that is too large makes the loss inf or NaN within a few
steps, and every later step spreads the NaN through the trained entries. The Trainer hides
this: its loss log skips non-finite steps (`logging_nan_inf_filter`), so the printed mean loss
looks normal while the saved model holds NaN. Two checks close that hole:

- `check_loss`, after every micro-batch: the first non-finite loss stops training with the
  step at which it happened (all ranks agree, so a distributed run stops together);
- `check_weights`, before a model or delta is written: every trained tensor must be finite
  (the loss can still be finite on the step that overflowed the weights).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dowser.errors import DowserError
from dowser.train.distributed import any_over_ranks, local

ADVICE = "lower the learning rate or the weight decay, or clip the gradient norm"


class NonFiniteError(DowserError):
    """Training produced a non-finite loss or weight; nothing was saved."""


def check_loss(loss: torch.Tensor, step: int, max_steps: int, epoch: float | None) -> None:
    """Raise NonFiniteError if `loss` (a scalar tensor) is inf or NaN on any rank.

    `step`: the optimizer step being taken (1-based), `max_steps` the run's total, `epoch`
    the Trainer's fractional epoch.
    """
    value = float(loss.detach().float().mean().item())
    if any_over_ranks(not math.isfinite(value)):
        where = f"step {step} of {max_steps}" + (f" (epoch {epoch:.2f})" if epoch else "")
        raise NonFiniteError(
            f"training diverged: the loss became non-finite ({value} here) at {where}; "
            f"the model was not saved. To fix it, {ADVICE}"
        )


@torch.no_grad()
def check_weights(model: nn.Module, *, step: int | None = None) -> None:
    """Raise NonFiniteError if any trained parameter (requires_grad) holds inf or NaN.

    Each rank checks the part it holds (a DTensor's local shard), then all ranks agree.
    `step`: the optimizer step just taken, for the message (checked during training).
    """
    bad = next(
        (
            name
            for name, p in model.named_parameters()
            if p.requires_grad and not torch.isfinite(local(p)).all()
        ),
        None,
    )
    if any_over_ranks(bad is not None):
        which = f" ({bad})" if bad else ""
        when = f" at step {step}" if step is not None else ""
        raise NonFiniteError(
            f"training produced non-finite weights{which}{when}; the model was not saved. "
            f"To fix it, {ADVICE}"
        )
