"""Run under torchrun by test_distributed.py: sparse fine-tuning through the Python API.

    torchrun --standalone --nproc-per-node 2 tests/dist_worker.py MODEL MASK DATA OUT MODE OPT

MODE is "ddp" or "fsdp", OPT the DowserTrainer optimizer. Every rank checks its own part of
every masked weight against the base checkpoint after training and writes OUT/rank<r>.json;
rank 0 also writes the merged model and the delta.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import TrainingArguments

from dowser.hf import load_model
from dowser.mask import Mask
from dowser.train.data import Collator, SupervisedDataset, load_examples
from dowser.train.distributed import flat_offset, local, shard_like
from dowser.train.trainer import DowserTrainer


def main() -> None:
    model_dir, mask_path, data, out, mode, optimizer = sys.argv[1:7]
    out = Path(out)
    torch.manual_seed(0)
    model, tokenizer, _ = load_model(model_dir)
    mask = Mask.load(mask_path, model=model)
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=2,
        num_train_epochs=1,
        learning_rate=1e-2,
        weight_decay=0.1,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        fsdp=True if mode == "fsdp" else None,
    )
    dataset = SupervisedDataset(load_examples(data), tokenizer, max_length=64)
    trainer = DowserTrainer(
        model=model,
        args=args,
        mask=mask,
        optimizer=optimizer,
        train_dataset=dataset,
        data_collator=Collator(pad_token_id=0),
    )
    trainer.train()

    # every rank: its own part of each masked weight against the same part of the base
    base_model, _, _ = load_model(model_dir)
    base = {n: p.detach() for n, p in base_model.named_parameters()}
    params = dict(trainer.model.named_parameters())
    report = {"sharded": 0, "frozen_checked": 0, "frozen_changed": 0, "trainable_changed": 0}
    report["blocks_match"] = True
    for name in mask:
        p = params[name]
        now = local(p.detach())
        was = shard_like(base[name], p)
        keep = shard_like(mask[name], p)
        report["sharded"] += isinstance(p, DTensor) and now.numel() < p.numel()
        report["frozen_checked"] += int((~keep).sum())
        report["frozen_changed"] += int((now != was)[~keep].sum())
        report["trainable_changed"] += int((now != was)[keep].sum())
        if isinstance(p, DTensor):  # the block we cut is the block DTensor holds
            whole = p.detach().full_tensor()  # collective: every rank, same order
            start = flat_offset(p)
            flat = whole.reshape(-1)[start : start + now.numel()]
            report["blocks_match"] &= bool(torch.equal(flat, now.reshape(-1)))
    rank = dist.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    trainer.save_merged(out / "merged", preprocessors=[tokenizer])
    trainer.save_delta(out / "delta.safetensors")


if __name__ == "__main__":
    main()
