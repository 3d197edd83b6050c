"""Run under torchrun by test_distributed.py: sparse fine-tuning through the Python API.

    torchrun --standalone --nproc-per-node 2 tests/dist_worker.py MODEL MASK DATA OUT MODE OPT

MODE: "ddp" or "fsdp" (DowserTrainer, FSDP from TrainingArguments), "accelerate-fsdp"
(DowserTrainer, FSDP from accelerate's environment variables), "callback-fsdp" (a user's own
Trainer subclass with DowserCallback, FSDP from TrainingArguments), or "loop" (a plain
PyTorch loop over a model sharded with fully_shard by hand). OPT: "sparse-adamw" or
"masked-adamw".
Every rank checks its own part of every masked weight against the base checkpoint after
training and writes OUT/rank<r>.json; with the Trainer, rank 0 also writes the merged model
and the delta.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import dowser
from dowser.hf import load_model
from dowser.mask import Mask
from dowser.train.distributed import exit_process, flat_offset, local, shard_like


def trainer_run(model, tokenizer, mask, data: str, out: Path, mode: str, optimizer: str):
    from transformers import TrainingArguments

    from dowser.train.data import Collator, SupervisedDataset, load_examples
    from dowser.train.trainer import DowserTrainer

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
        fsdp=True if mode in ("fsdp", "callback-fsdp") else None,
    )
    dataset = SupervisedDataset(load_examples(data), tokenizer, max_length=64)
    if mode == "callback-fsdp":
        return callback_run(model, mask, args, dataset, out, optimizer)
    trainer = DowserTrainer(
        model=model,
        args=args,
        mask=mask,
        optimizer=optimizer,
        train_dataset=dataset,
        data_collator=Collator(pad_token_id=0),
    )
    trainer.train()
    return trainer


def callback_run(model, mask, args, dataset, out: Path, optimizer: str):
    """Not DowserTrainer: a Trainer subclass that only lets FSDP2 run on CPU processes."""
    from transformers import Trainer

    from dowser.train.data import Collator
    from dowser.train.trainer import allow_cpu_fsdp

    class UserTrainer(Trainer):
        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            allow_cpu_fsdp(self)

    extra = {}
    if optimizer == "sparse-adamw":
        extra["optimizer_cls_and_kwargs"] = dowser.sparse_adamw(mask, lr=1e-2, weight_decay=0.1)
    callback = dowser.DowserCallback(mask, optimizer=optimizer, delta=out / "delta.safetensors")
    trainer = UserTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=Collator(pad_token_id=0),
        callbacks=[callback],
        **extra,
    )
    trainer.train()  # the callback writes the delta at the end
    return trainer


def loop_run(model, mask, optimizer: str) -> None:
    """fully_shard by hand, then dowser's optimizer or gradient masking: three steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if optimizer == "sparse-adamw":
        dowser.prepare_model(model, mask)
        opt = dowser.SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1)
    else:
        gm = dowser.mask_gradients(model, mask)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
        gm.attach(opt)  # weight decay: frozen entries restored after each step
    g = torch.Generator().manual_seed(dist.get_rank())  # each rank its own data
    vocab = model.config.vocab_size
    for _ in range(3):
        ids = torch.randint(3, vocab, (2, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()


def check_parts(model, mask, base: dict) -> dict:
    """Each masked weight's local part against the same part of the base weights."""
    params = dict(model.named_parameters())
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
    return report


def main() -> None:
    model_dir, mask_path, data, out, mode, optimizer = sys.argv[1:7]
    out = Path(out)
    torch.manual_seed(0)
    model, tokenizer, _ = load_model(model_dir)
    mask = Mask.load(mask_path, model=model)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    if mode == "loop":
        dist.init_process_group("gloo")
        loop_run(model, mask, optimizer)
        report = check_parts(model, mask, base)
    else:
        trainer = trainer_run(model, tokenizer, mask, data, out, mode, optimizer)
        report = check_parts(trainer.model, mask, base)
        if mode == "callback-fsdp":
            trainer.save_model(str(out / "merged"))  # the stock Trainer's save
        else:
            trainer.save_merged(out / "merged", preprocessors=[tokenizer])
            trainer.save_delta(out / "delta.safetensors")
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()
    exit_process(0)  # Python's own exit can abort or hang on gloo's threads


if __name__ == "__main__":
    main()
