"""model-dowser: data-free importance probing and sparse fine-tuning that limits forgetting.

scores = dowser.probe(model, tokenizer=tok)          # once per base model, no data
mask = dowser.build_mask(model, scores, update_ratio=0.1, last_layers=20)
mask.save("mask.safetensors")

# a task-aware mask: also what a few batches of the fine-tuning data say about each entry
grads = dowser.task_gradients(model, batches)        # batches with labels
mask = dowser.build_mask(model, scores, update_ratio=0.1, task_scores=grads)

# any transformers.Trainer (TRL's SFTTrainer, DPOTrainer, your own) trains only the mask
trainer = SFTTrainer(..., callbacks=[dowser.DowserCallback(mask, delta="delta.safetensors")])
"""

from dowser.errors import DowserError
from dowser.mask import Mask, build_mask
from dowser.probing import ESTIMATORS, probe
from dowser.probing.task import task_gradients
from dowser.scores import Scores
from dowser.train import (
    GradientMask,
    SparseAdamW,
    apply_delta,
    mask_gradients,
    prepare_model,
    save_delta,
    save_merged,
)
from dowser.version import __version__

__all__ = [
    "ESTIMATORS",
    "DowserError",
    "GradientMask",
    "Mask",
    "Scores",
    "SparseAdamW",
    "__version__",
    "apply_delta",
    "build_mask",
    "mask_gradients",
    "prepare_model",
    "probe",
    "save_delta",
    "save_merged",
    "task_gradients",
]


def __getattr__(name: str):
    # transformers is heavy to import: load the Trainer integration only when asked for.
    if name == "DowserTrainer":
        from dowser.train.trainer import DowserTrainer

        return DowserTrainer
    if name in ("DowserCallback", "sparse_adamw"):
        from dowser.train import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'dowser' has no attribute {name!r}")
