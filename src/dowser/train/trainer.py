"""`DowserTrainer`: the Hugging Face Trainer with a Dowser mask.

    trainer = DowserTrainer(model=model, args=TrainingArguments(...), mask=mask,
                            train_dataset=ds, data_collator=collate)
    trainer.train()
    trainer.save_delta("delta.safetensors")

Everything else is the stock Trainer (gradient accumulation, checkpointing, bf16, logging,
resume, accelerate/torchrun launch). Two optimizers:

- "sparse-adamw" (default): `SparseAdamW` from the Trainer's learning rate, betas, epsilon
  and weight decay (no decay on norms and biases, as the Trainer's own grouping);
- "masked-adamw": the Trainer's own optimizer with `mask_gradients` (the reference), attached
  so that frozen entries stay bit-identical even with weight decay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Trainer

from dowser.errors import DowserError
from dowser.fingerprint import model_fingerprints
from dowser.mask import Mask
from dowser.train.artifacts import save_delta, save_merged
from dowser.train.masking import mask_gradients, masked_parameters, prepare_model
from dowser.train.sparse_adamw import SparseAdamW

OPTIMIZERS = ("sparse-adamw", "masked-adamw")


class DowserTrainer(Trainer):
    """transformers.Trainer that fine-tunes only the trainable entries of `mask`.

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
        if optimizer not in OPTIMIZERS:
            raise DowserError(f"optimizer={optimizer!r}: choose {' or '.join(OPTIMIZERS)}")
        if model is None:
            raise DowserError("DowserTrainer needs the model")
        mask.check(model)
        self.mask = mask
        self.dowser_optimizer = optimizer
        if optimizer == "masked-adamw":
            self.gradient_mask = mask_gradients(model, mask, train_norms=train_norms)
        else:
            self.gradient_mask = None
            prepare_model(model, mask, train_norms=train_norms)
        masked = set(masked_parameters(model, mask))
        self.dense_names = [
            n for n, p in model.named_parameters() if p.requires_grad and n not in masked
        ]
        # fingerprints of the base weights, for the delta file
        self.base_fingerprints = model_fingerprints(model, [*mask, *self.dense_names])
        super().__init__(model=model, args=args, **kwargs)

    def create_optimizer(self, model: Any = None):
        """SparseAdamW, or the stock optimizer with frozen entries protected."""
        if self.optimizer is not None:
            return self.optimizer
        if self.dowser_optimizer == "masked-adamw":
            super().create_optimizer(model)
            self.gradient_mask.attach(self.optimizer)
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        masked = set(self.mask)
        trainable = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        wd = self.args.weight_decay
        groups = [
            {"params": [p for n, p in trainable if n in masked or n in decay], "weight_decay": wd},
            {
                "params": [p for n, p in trainable if n not in masked and n not in decay],
                "weight_decay": 0.0,
            },
        ]
        self.optimizer = SparseAdamW(
            opt_model,
            self.mask,
            lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
            weight_decay=wd,
            param_groups=[g for g in groups if g["params"]],
        )
        return self.optimizer

    def save_delta(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the sparse delta (trainable entries + dense-trained norms) of the model."""
        return save_delta(
            self.accelerator.unwrap_model(self.model),
            self.mask,
            path,
            base_fingerprints=self.base_fingerprints,
            dense=self.dense_names,
            overwrite=overwrite,
        )

    def save_merged(
        self, out_dir: str | Path, *, preprocessors=(), source_dir: str | Path | None = None
    ) -> Path:
        """Write the fine-tuned model as a Hugging Face checkpoint directory."""
        model = self.accelerator.unwrap_model(self.model)
        return save_merged(model, out_dir, preprocessors=preprocessors, source_dir=source_dir)
