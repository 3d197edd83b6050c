"""`DowserTrainer`: the Hugging Face Trainer with a Dowser mask.

    trainer = DowserTrainer(model=model, args=TrainingArguments(...), mask=mask,
                            train_dataset=ds, data_collator=collate)
    trainer.train()
    trainer.save_delta("delta.safetensors")

Training stops at the first non-finite loss, and no model or delta with a non-finite trained
weight is written (`dowser.train.guard`); a mask with no trainable entry is refused.
Everything else is the stock Trainer (gradient accumulation, checkpointing, bf16, logging,
resume, accelerate/torchrun launch). Under torchrun it trains with DDP, or with FSDP2 when
asked (`TrainingArguments(fsdp=True)` or `accelerate launch --use_fsdp`): after the Trainer
has sharded the model, the mask is cut like each weight's shard (`DowserCallback` does it when
training begins); saving gathers a sharded model and rank 0 writes. DeepSpeed and FSDP1
are refused (they flatten weights). Two optimizers:

- "sparse-adamw" (default): `SparseAdamW` from the Trainer's learning rate, betas, epsilon
  and weight decay (no decay on norms and biases, as the Trainer's own grouping);
- "masked-adamw": the Trainer's own optimizer with `mask_gradients` (the reference), attached
  so that frozen entries stay bit-identical even with weight decay.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from dowser.errors import DowserError
from dowser.mask import Mask
from dowser.train.artifacts import save_merged
from dowser.train.callback import DowserCallback, build_sparse_adamw
from dowser.train.distributed import barrier, full_state_dict, is_main_process, is_sharded
from dowser.train.guard import check_loss, check_weights
from dowser.train.masking import GradientMask


class DowserTrainer(Trainer):
    """transformers.Trainer that fine-tunes only the trainable entries of `mask`.

    The same pieces as `DowserCallback` (which it adds to its callbacks), plus what only a
    subclass can do: SparseAdamW built from the Trainer's own learning rate, betas, epsilon
    and weight decay; every micro-batch's loss checked; FSDP2 on CPU processes.

    Args:
        mask: the Dowser mask (checked against the model: names, shapes, fingerprints).
        optimizer: "sparse-adamw" or "masked-adamw" (see module doc).
        train_norms: also train the norms of the decoder layers the mask reaches (reference).
        Everything else: as transformers.Trainer.
    """

    def __init__(
        self,
        model: Any = None,
        args: Any = None,
        *,
        mask: Mask,
        optimizer: str = "sparse-adamw",
        train_norms: bool = True,
        **kwargs: Any,
    ):
        if model is None:
            raise DowserError("DowserTrainer needs the model")
        # the loss is checked after every micro-batch here: no extra pass over the weights
        self.dowser = DowserCallback(
            mask, optimizer=optimizer, train_norms=train_norms, check_finite=False
        )
        self.dowser.setup(model, args)
        _choose_fsdp_units(args, model)
        callbacks = [*(kwargs.pop("callbacks", None) or []), self.dowser]
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)

    @property
    def mask(self) -> Mask:
        return self.dowser.mask

    @property
    def gradient_mask(self) -> GradientMask | None:
        return self.dowser.gradient_mask

    @property
    def dense_names(self) -> list[str]:
        return self.dowser.dense_names

    def create_accelerator_and_postprocess(self) -> None:
        """The stock accelerator, with FSDP2 allowed on CPU processes (`allow_cpu_fsdp`)."""
        super().create_accelerator_and_postprocess()
        allow_cpu_fsdp(self)

    def create_optimizer(self, model: Any = None):
        """SparseAdamW from the Trainer's settings, or the stock optimizer (the callback
        protects its frozen entries)."""
        if self.optimizer is not None or self.dowser.optimizer == "masked-adamw":
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        self.optimizer = build_sparse_adamw(
            opt_model,
            self.mask,
            decay=self.get_decay_parameter_names(opt_model),
            lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
            weight_decay=self.args.weight_decay,
        )
        return self.optimizer

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        """The stock step, stopped at the first non-finite loss (see dowser.train.guard)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        check_loss(loss, self.state.global_step + 1, self.state.max_steps, self.state.epoch)
        return loss

    def save_delta(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the sparse delta (trainable entries + dense-trained norms) of the model.

        Under torchrun every rank must call this: a sharded model is gathered, rank 0 writes.
        """
        model = self.accelerator.unwrap_model(self.model)
        return self.dowser.save_delta(model, path, overwrite=overwrite)

    def save_merged(
        self, out_dir: str | Path, *, preprocessors=(), source_dir: str | Path | None = None
    ) -> Path:
        """Write the fine-tuned model as a Hugging Face checkpoint directory.

        Under torchrun every rank must call this: a sharded model is gathered, rank 0 writes.
        """
        model = self.accelerator.unwrap_model(self.model)
        check_weights(model)
        state = full_state_dict(model) if is_sharded(model) else None
        if is_main_process():
            save_merged(
                model,
                out_dir,
                preprocessors=preprocessors,
                source_dir=source_dir,
                state_dict=state,
            )
        barrier()
        return Path(out_dir)


class SaveLastStep(TrainerCallback):
    """Checkpoint the final step too. The Trainer skips it when the save interval does not
    divide the run; with it, a crash while the model is written resumes with no step lost."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step >= state.max_steps:
            control.should_save = True
        return control


def allow_cpu_fsdp(trainer: Trainer) -> None:
    """FSDP2 on CPU processes (gloo) when asked for, and FSDP1 refused.

    accelerate turns FSDP on only for accelerator devices; fully_shard itself runs on CPU
    processes over gloo, so a CPU run asked for FSDP gets it too (the same code path as on
    GPUs, which is how the tests check sharded training on a CPU machine). Call it at the
    end of a Trainer subclass's `create_accelerator_and_postprocess`, as DowserTrainer does.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    asked = trainer.args.fsdp_plugin_args is not None or _env_flag("ACCELERATE_USE_FSDP")
    if asked and state.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin(**(trainer.args.fsdp_plugin_args or {}))
        # accelerate keeps the distributed type in two shared dicts: set both
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        state.fsdp_plugin = plugin
        trainer.is_fsdp_enabled = True
    if asked and trainer.accelerator.num_processes < 2:
        raise DowserError(
            "FSDP needs several processes: launch with torchrun --nproc-per-node N "
            "(or accelerate launch), or train without FSDP"
        )
    if trainer.is_fsdp_enabled and getattr(state.fsdp_plugin, "fsdp_version", 2) != 2:
        raise DowserError(
            "Dowser masks need FSDP2 (per-parameter sharding); FSDP1 flattens weights. "
            "Set fsdp_config version 2 (the default)"
        )


def _choose_fsdp_units(args: Any, model: Any) -> None:
    """FSDP2's shard units: the model's layer classes that exist in it, unless set by the user.

    accelerate wraps every class in `model._no_split_modules` and fails on one the model
    does not contain (LLaVA lists CLIP's text-model classes, absent from its vision tower).
    FSDP asked for in TrainingArguments gets them in its plugin settings; FSDP asked for by
    `accelerate launch --use_fsdp` (environment variables) in FSDP_TRANSFORMER_CLS_TO_WRAP.
    """
    listed = set(getattr(model, "_no_split_modules", None) or ())
    present = ",".join(sorted({type(m).__name__ for m in model.modules()} & listed))
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if not present:
        return
    if plugin_args is not None:
        policy = plugin_args.get("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")
        if policy == "TRANSFORMER_BASED_WRAP" and not plugin_args.get(
            "transformer_cls_names_to_wrap"
        ):
            plugin_args["transformer_cls_names_to_wrap"] = present
    elif _env_flag("ACCELERATE_USE_FSDP"):
        policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "NO_WRAP")  # accelerate's default
        if policy == "TRANSFORMER_BASED_WRAP":
            os.environ.setdefault("FSDP_TRANSFORMER_CLS_TO_WRAP", present)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
