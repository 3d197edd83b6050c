"""DowserCallback in Trainers dowser did not write: TRL's SFTTrainer and DPOTrainer.

Tiny Llama checkpoint built in code; each run a few steps on CPU. What must hold: only the
mask's trainable entries (and the tuned layers' norms) change, frozen entries stay bit for
bit, the delta written at the end rebuilds the trained weights exactly, and misuse is one
clear DowserError before anything trains.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

import dowser
from dowser.errors import DowserError
from dowser.hf import load_model
from dowser.train.artifacts import apply_delta

TEXTS = [
    "the cat sat on the mat and looked at the door",
    "a long road runs over the hills to the sea",
    "the travellers told stories at the long table",
    "one spoke of a city built on water",
]
COMMON = dict(
    max_steps=3,
    per_device_train_batch_size=2,
    learning_rate=1e-2,
    weight_decay=0.1,  # the masked optimizer must then restore frozen entries itself
    use_cpu=True,
    bf16=False,
    report_to="none",
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    seed=0,
)


@pytest.fixture
def llama_dir(checkpoint_dirs):
    return checkpoint_dirs["llama"]


def random_mask(model, ratio: float = 0.1, seed: int = 0) -> dowser.Mask:
    """A mask on the last layer's linear weights, `ratio` of each trainable."""
    g = torch.Generator().manual_seed(seed)
    last = len(model.model.layers) - 1
    tensors = {
        n: torch.rand(p.shape, generator=g) < ratio
        for n, p in model.named_parameters()
        if f"layers.{last}." in n and p.dim() == 2
    }
    return dowser.Mask(tensors, info={n: {"layer": last} for n in tensors})


def sft_trainer(model, tok, tmp_path, callback, **kwargs):
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_length=32, **COMMON)
    data = Dataset.from_list([{"text": t} for t in TEXTS])
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        callbacks=[callback],
        **kwargs,
    )


def check_sparse(before: dict, model, mask, norms: set[str]) -> None:
    """Frozen entries and untouched tensors bit-identical; trainable entries moved."""
    moved = 0
    for n, p in model.named_parameters():
        now, was = p.detach(), before[n]
        if n in mask:
            m = mask[n]
            assert torch.equal(now[~m], was[~m]), n
            moved += int((now[m] != was[m]).sum())
        elif n not in norms:
            assert torch.equal(now, was), n
    assert moved > 0


@pytest.mark.parametrize("optimizer", ["masked-adamw", "sparse-adamw"])
def test_sft_trains_only_the_mask_and_writes_the_delta(llama_dir, tmp_path, optimizer):
    model, tok, _ = load_model(llama_dir)
    mask = random_mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = tmp_path / "delta.safetensors"
    callback = dowser.DowserCallback(mask, optimizer=optimizer, delta=delta)
    extra = {}
    if optimizer == "sparse-adamw":
        extra["optimizer_cls_and_kwargs"] = dowser.sparse_adamw(mask, lr=1e-2, weight_decay=0.1)
    trainer = sft_trainer(model, tok, tmp_path, callback, **extra)
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(inner, dowser.SparseAdamW) == (optimizer == "sparse-adamw")
    norms = set(callback.dense_names)
    assert norms and all("layers.1." in n and "norm" in n for n in norms)
    check_sparse(before, model, mask, norms)

    base, _, _ = load_model(llama_dir)
    apply_delta(base, delta)
    for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters(), strict=True):
        assert torch.equal(p.detach(), q.detach()), n

    # a second train() of the same Trainer: no hook twice, frozen entries still exact, and
    # the delta this callback wrote is replaced
    trainer.train()
    check_sparse(before, model, mask, norms)
    base, _, _ = load_model(llama_dir)
    apply_delta(base, delta)
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters(), strict=True)
    )


def test_sft_masked_equals_sparse(llama_dir, tmp_path):
    """Both optimizers follow the same AdamW trajectory on the trainable entries."""
    results = []
    for optimizer in ("masked-adamw", "sparse-adamw"):
        model, tok, _ = load_model(llama_dir)
        mask = random_mask(model)
        extra = {}
        if optimizer == "sparse-adamw":
            extra["optimizer_cls_and_kwargs"] = dowser.sparse_adamw(mask, lr=1e-2, weight_decay=0.1)
        callback = dowser.DowserCallback(mask, optimizer=optimizer)
        sft_trainer(model, tok, tmp_path / optimizer, callback, **extra).train()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], rtol=1e-5, atol=1e-6)


def test_dpo_trains_only_the_mask(llama_dir, tmp_path):
    model, tok, _ = load_model(llama_dir)
    mask = random_mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pairs = [
        {"prompt": t[:12], "chosen": t[12:], "rejected": TEXTS[(i + 1) % len(TEXTS)][12:]}
        for i, t in enumerate(TEXTS)
    ]
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_length=32, **COMMON)
    callback = dowser.DowserCallback(mask, delta=tmp_path / "delta.safetensors")
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tok,
        callbacks=[callback],
    )
    trainer.train()
    check_sparse(before, model, mask, set(callback.dense_names))
    assert (tmp_path / "delta.safetensors").is_file()


def test_misuse_is_one_clear_error(llama_dir, tmp_path, checkpoint_dirs):
    model, tok, _ = load_model(llama_dir)
    mask = random_mask(model)

    # a mask of another model: refused when the Trainer is made
    other, _, _ = load_model(checkpoint_dirs["qwen2_vl"])
    with pytest.raises(DowserError, match="does not fit this model|does not have"):
        sft_trainer(other, tok, tmp_path, dowser.DowserCallback(mask))

    # sparse-adamw asked for, the Trainer given nothing: refused before the first step
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = sft_trainer(
        model, tok, tmp_path, dowser.DowserCallback(mask, optimizer="sparse-adamw")
    )
    with pytest.raises(DowserError, match="optimizer_cls_and_kwargs=dowser.sparse_adamw"):
        trainer.train()
    assert all(torch.equal(p.detach(), base[n]) for n, p in model.named_parameters())

    # the factory without the callback would train every weight densely
    model, tok, _ = load_model(llama_dir)
    with pytest.raises(DowserError, match="DowserCallback"):
        args = SFTConfig(output_dir=str(tmp_path / "o2"), max_length=32, **COMMON)
        SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list([{"text": t} for t in TEXTS]),
            processing_class=tok,
            optimizer_cls_and_kwargs=dowser.sparse_adamw(mask, lr=1e-2),
        ).train()

    # an existing delta file is not overwritten: refused before training
    (tmp_path / "d.safetensors").write_bytes(b"mine")
    with pytest.raises(DowserError, match="overwrite"):
        sft_trainer(
            model, tok, tmp_path, dowser.DowserCallback(mask, delta=tmp_path / "d.safetensors")
        )
    assert (tmp_path / "d.safetensors").read_bytes() == b"mine"

    # a learning rate that differs from TrainingArguments' is said
    model, tok, _ = load_model(llama_dir)
    callback = dowser.DowserCallback(mask, optimizer="sparse-adamw")
    factory = dowser.sparse_adamw(mask, lr=1e-3)
    trainer = sft_trainer(model, tok, tmp_path, callback, optimizer_cls_and_kwargs=factory)
    with pytest.warns(UserWarning, match=r"lr=0.001 \(given .*learning_rate is 0.01"):
        trainer.train()

    with pytest.raises(DowserError, match="optimizer="):
        dowser.DowserCallback(mask, optimizer="adam")
    with pytest.raises(DowserError, match="dowser.Mask"):
        dowser.DowserCallback({"w": torch.ones(2, 2, dtype=torch.bool)})


def test_diverging_run_stops_before_it_is_saved(llama_dir, tmp_path):
    model, tok, _ = load_model(llama_dir)
    mask = random_mask(model)
    callback = dowser.DowserCallback(mask, delta=tmp_path / "delta.safetensors")
    trainer = sft_trainer(model, tok, tmp_path, callback)
    trainer.args.learning_rate = 1e30  # AdamW steps of 1e30 overflow float32 at once
    trainer.args.max_grad_norm = 0.0
    with pytest.raises(
        dowser.train.guard.NonFiniteError, match=r"non-finite weights .* at step \d"
    ):
        trainer.train()
    assert not (tmp_path / "delta.safetensors").exists()
