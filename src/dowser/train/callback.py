"""`DowserCallback`: sparse fine-tuning in any `transformers.Trainer`, no subclass needed.

    trainer = SFTTrainer(model=model, args=args, train_dataset=ds,      # TRL, or any Trainer
                         callbacks=[dowser.DowserCallback(mask, delta="delta.safetensors")])
    trainer.train()                                                      # delta written at the end

What the callback does, at the Trainer's events:

- `on_init_end` (the model is final, no optimizer yet): checks the mask against the model
  (names, shapes, fingerprints) and that it leaves something to train, sets requires_grad so
  that only the masked weights and the tuned layers' norms train, hooks the masked weights so
  frozen entries get zero gradients, and records the base weights' fingerprints and digests
  for the delta;
- `on_train_begin` (after `accelerator.prepare`, so after FSDP2 swapped every weight for its
  shard, and after a resumed optimizer state was loaded): binds the hooks and the optimizer to
  the parameters that will train, before the first backward;
- `on_step_end`: stops at the first step whose trained weights are no longer finite (the
  Trainer's loss log hides NaN steps), before that step can be checkpointed;
- `on_train_end`: writes the sparse delta when `delta=` was given.

Two optimizers, as in `DowserTrainer`:

- "masked-adamw" (default): the Trainer's own optimizer (whatever `optim=` says). Frozen
  entries get zero gradients, and are restored after each step when the optimizer would move
  them anyway (weight decay, momentum), so they stay bit-identical. Memory: the optimizer's
  full state for every masked weight.
- "sparse-adamw": `SparseAdamW`, state for the trainable entries only (12 bytes per trainable
  entry instead of 8 per entry of a masked weight). The Trainer must build it: pass
  `optimizer_cls_and_kwargs=dowser.sparse_adamw(mask, lr=...)` (the Trainer does not hand
  its learning rate to optimizers given that way: pass the same one as TrainingArguments).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from dowser.errors import DowserError
from dowser.fingerprint import model_digests, model_fingerprints
from dowser.io import PathLike, check_writable
from dowser.mask import Mask
from dowser.train.artifacts import save_delta
from dowser.train.distributed import barrier, full_state_dict, is_main_process, is_sharded
from dowser.train.guard import check_weights
from dowser.train.masking import (
    GradientMask,
    mask_gradients,
    masked_parameters,
    prepare_model,
    tuned_norms,
)
from dowser.train.sparse_adamw import SparseAdamW

OPTIMIZERS = ("sparse-adamw", "masked-adamw")
_FACTORY_HINT = "pass optimizer_cls_and_kwargs=dowser.sparse_adamw(mask, lr=...) to the Trainer"


class DowserCallback(TrainerCallback):
    """Train only the trainable entries of `mask` in any transformers.Trainer (TRL included).

    Args:
        mask: the Dowser mask; checked against the Trainer's model when the Trainer is made.
        optimizer: "masked-adamw" (the Trainer's own optimizer, frozen entries protected) or
            "sparse-adamw" (`dowser.sparse_adamw(mask, lr=...)` given to the Trainer as
            `optimizer_cls_and_kwargs`); see the module doc.
        train_norms: also train the norms of the decoder layers the mask reaches (reference).
        delta: write the sparse delta here when training ends (every rank takes part).
        overwrite: replace an existing delta file.
        check_finite: stop at the first step that leaves a trained weight inf or NaN.
    """

    def __init__(
        self,
        mask: Mask,
        *,
        optimizer: str = "masked-adamw",
        train_norms: bool = True,
        delta: PathLike | None = None,
        overwrite: bool = False,
        check_finite: bool = True,
    ):
        if not isinstance(mask, Mask):
            raise DowserError(
                f"DowserCallback needs a dowser.Mask, got {type(mask).__name__}; load one "
                "with dowser.Mask.load(path)"
            )
        if optimizer not in OPTIMIZERS:
            raise DowserError(f"optimizer={optimizer!r}: choose {' or '.join(OPTIMIZERS)}")
        self.mask = mask
        self.optimizer = optimizer
        self.train_norms = train_norms
        self.delta = None if delta is None else Path(delta)
        self.overwrite = overwrite
        self.check_finite = check_finite
        self.model: nn.Module | None = None  # the model set up, once set up
        self.gradient_mask: GradientMask | None = None
        self.dense_names: list[str] = []  # tensors trained whole (the tuned layers' norms)
        self.base_fingerprints: dict[str, str] = {}
        self.base_digests: dict[str, str] = {}
        self._wrote = False  # the delta file is this callback's own

    # -- the Trainer's events -------------------------------------------------------------

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        model = kwargs.get("model")
        if self.model is None:
            self.setup(model, args)
        elif model is not self.model:
            raise DowserError(
                "this DowserCallback was set up for another model: make one callback per Trainer"
            )
        return control

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if self.model is None:
            raise DowserError("DowserCallback was not set up: pass it in the Trainer's callbacks")
        _refuse_fsdp1(model)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        if self.optimizer == "sparse-adamw":
            if not isinstance(inner, SparseAdamW):
                raise DowserError(
                    f"DowserCallback(optimizer='sparse-adamw'), but the Trainer built "
                    f"{type(inner).__name__}: {_FACTORY_HINT}"
                )
            if inner.mask is not self.mask and not _same_mask(inner.mask, self.mask):
                raise DowserError(
                    "the optimizer was made with another mask than DowserCallback's: give "
                    "both the same mask"
                )
            inner.bind(model)
            _warn_if_other_lr(inner, args)
        else:
            if isinstance(inner, SparseAdamW):
                raise DowserError(
                    "the Trainer was given SparseAdamW: make the callback with "
                    "DowserCallback(mask, optimizer='sparse-adamw')"
                )
            self.gradient_mask.bind(model)
            self.gradient_mask.attach(inner)
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.check_finite:
            check_weights(kwargs["model"], step=state.global_step)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.delta is not None:
            # a later train() call of the same Trainer replaces the delta this one wrote
            self.save_delta(kwargs["model"], self.delta, overwrite=self.overwrite or self._wrote)
            self._wrote = True
        return control

    # -- the pieces, also used by DowserTrainer ---------------------------------------------

    def setup(self, model: nn.Module | None, args: Any = None) -> None:
        """Check the mask against `model`, set what trains, hook the frozen entries' gradients
        and record the base weights for the delta. Runs once, before the optimizer exists."""
        if model is None:
            raise DowserError("DowserCallback needs the Trainer's model")
        if args is not None and getattr(args, "deepspeed", None):
            raise DowserError(
                "DeepSpeed is not supported: ZeRO flattens weights into partitions that a "
                "per-entry mask cannot follow. Use FSDP2 (TrainingArguments(fsdp=True), "
                "`dowser train --fsdp`), which shards like ZeRO-3"
            )
        self.mask.check(model)
        if self.mask.num_trainable() == 0:
            raise DowserError(
                "the mask leaves no entry trainable, so training would change nothing; build "
                "it with a larger ratio"
            )
        if self.delta is not None:
            check_writable(self.delta, overwrite=self.overwrite)  # fail before training
        if self.optimizer == "masked-adamw":
            self.gradient_mask = mask_gradients(model, self.mask, train_norms=self.train_norms)
        else:
            prepare_model(model, self.mask, train_norms=self.train_norms)  # SparseAdamW hooks
        masked = set(masked_parameters(model, self.mask))
        self.dense_names = [
            n for n, p in model.named_parameters() if p.requires_grad and n not in masked
        ]
        names = [*self.mask, *self.dense_names]
        self.base_fingerprints = model_fingerprints(model, names)
        # exact digests of every tensor the delta writes (one read of each, ~1 s per GB)
        self.base_digests = model_digests(model, names)
        self.model = model

    def save_delta(self, model: nn.Module, path: PathLike, *, overwrite: bool = False) -> Path:
        """Write the sparse delta (trainable entries + dense-trained norms) of `model`.

        Under torchrun every rank must call this: a sharded model is gathered, rank 0 writes.
        """
        path = check_writable(path, overwrite=overwrite)  # on every rank, before gathering
        check_weights(model)
        state = full_state_dict(model) if is_sharded(model) else None
        if is_main_process():
            save_delta(
                model,
                self.mask,
                path,
                base_fingerprints=self.base_fingerprints,
                base_digests=self.base_digests,
                dense=self.dense_names,
                overwrite=overwrite,
                state_dict=state,
            )
        barrier()
        return path


def sparse_adamw(
    mask: Mask,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[type, dict[str, Any]]:
    """`SparseAdamW` for a Trainer's `optimizer_cls_and_kwargs` (with DowserCallback).

        Trainer(..., optimizer_cls_and_kwargs=dowser.sparse_adamw(mask, lr=2e-5),
                callbacks=[dowser.DowserCallback(mask, optimizer="sparse-adamw")])

    Weight decay as the Trainer's own grouping: on masked weights and other weight matrices,
    not on norms and biases. `lr` is required because the Trainer does not pass
    TrainingArguments.learning_rate to optimizers given this way (its scheduler then scales
    this one); the callback warns when the two differ.
    """
    kwargs = dict(mask=mask, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    return SparseAdamWFactory, kwargs


class SparseAdamWFactory:
    """What `sparse_adamw` hands the Trainer: called with the model once the Trainer builds
    its optimizer (transformers' optimizer-factory protocol)."""

    def __call__(self, model: nn.Module, *, mask: Mask, **kwargs: Any) -> SparseAdamW:
        allowed = {*masked_parameters(model, mask), *tuned_norms(model, mask)}
        extra = [n for n, p in model.named_parameters() if p.requires_grad and n not in allowed]
        if extra:
            raise DowserError(
                f"{len(extra)} weights outside the mask would train densely (e.g. {extra[0]}): "
                "add dowser.DowserCallback(mask, optimizer='sparse-adamw') to the Trainer's "
                "callbacks, which freezes them before the optimizer is built"
            )
        return build_sparse_adamw(model, mask, decay=_decay_names(model), **kwargs)


def build_sparse_adamw(
    model: nn.Module,
    mask: Mask,
    *,
    decay: set[str] | list[str],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> SparseAdamW:
    """SparseAdamW over `model`'s trainable parameters in two groups: masked weights and the
    `decay` names get `weight_decay`, the rest (norms, biases) none."""
    decay, masked = set(decay), set(mask)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {
            "params": [p for n, p in trainable if n in masked or n in decay],
            "weight_decay": weight_decay,
        },
        {
            "params": [p for n, p in trainable if n not in masked and n not in decay],
            "weight_decay": 0.0,
        },
    ]
    return SparseAdamW(
        model,
        mask,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        param_groups=[g for g in groups if g["params"]],
    )


def _decay_names(model: nn.Module) -> list[str]:
    # the stock Trainer's rule (no decay on norms and biases); it does not use `self`
    return Trainer.get_decay_parameter_names(None, model)


def _refuse_fsdp1(model: nn.Module) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise DowserError(
            "Dowser masks need FSDP2 (per-parameter sharding); FSDP1 flattens weights. Set "
            "fsdp_config version 2 (the default)"
        )


def _same_mask(a: Mask, b: Mask) -> bool:
    return list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)


def _warn_if_other_lr(optimizer: torch.optim.Optimizer, args: Any) -> None:
    lr = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
    wanted = getattr(args, "learning_rate", lr)
    if not torch.isclose(torch.tensor(float(lr)), torch.tensor(float(wanted)), rtol=1e-6):
        warnings.warn(
            f"SparseAdamW trains with lr={lr:g} (given to dowser.sparse_adamw) while "
            f"TrainingArguments.learning_rate is {wanted:g}, which optimizers passed as "
            "optimizer_cls_and_kwargs do not use: make them equal",
            stacklevel=2,
        )
