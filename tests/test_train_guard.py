"""A training run never writes NaN, never writes over its inputs, and resumes from every
crash point: during training, while a checkpoint is saved, while the model is written."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
from test_cli import FAST, run, user_error

import dowser
from dowser.hf import load_model

TEXT = [{"prompt": f"count to {i}", "answer": " ".join(map(str, range(i)))} for i in range(1, 7)]


@pytest.fixture(scope="module")
def job(tmp_path_factory, checkpoint_dirs):
    """The tiny Llama, its data and mask: argv of a short `dowser train` minus --out."""
    root = tmp_path_factory.mktemp("guard")
    llama = checkpoint_dirs["llama"]
    data = root / "text.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in TEXT) + "\n")
    scores, mask = root / "s.safetensors", root / "m.safetensors"
    from dowser.cli import main

    assert main(["probe", str(llama), "--out", str(scores), *FAST]) == 0
    assert (
        main(["mask", str(scores), "--model", str(llama), "--ratio", "0.1", "--out", str(mask)])
        == 0
    )
    argv = ["train", llama, "--mask", mask, "--data", data, "--batch-size", "2", "--quiet"]
    return {"argv": argv, "llama": llama, "mask": mask, "data": data, "root": root}


def weights(model_dir) -> dict[str, torch.Tensor]:
    model, _, _ = load_model(model_dir)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_diverging_run_stops_at_its_step_and_writes_nothing(job, tmp_path, capsys):
    out = tmp_path / "out"
    # Adam at lr 1 with weight decay 10 multiplies the trained entries by -9 every step
    argv = [*job["argv"], "--out", out, "--lr", "1", "--weight-decay", "10"]
    err = user_error([*argv, "--max-grad-norm", "0", "--epochs", "30"], capsys, "diverged")
    assert "at step " in err and "not saved" in err
    assert not (out / "model.safetensors").exists()


def test_library_run_stops_at_the_first_nonfinite_loss(job, tmp_path):
    from transformers import TrainingArguments

    from dowser.train.data import Collator, SupervisedDataset, load_examples
    from dowser.train.guard import NonFiniteError

    model, tok, _ = load_model(job["llama"])
    mask = dowser.Mask.load(job["mask"], model=model)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        learning_rate=1e30,  # the first step sends the trained entries to +-1e30
        num_train_epochs=3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = dowser.DowserTrainer(
        model=model,
        args=args,
        mask=mask,
        train_dataset=SupervisedDataset(load_examples(job["data"]), tok),
        data_collator=Collator(tok.pad_token_id),
    )
    with pytest.raises(NonFiniteError, match=r"at step 2 of 9"):
        trainer.train()
    # here the weights are still finite (+-1e30); one more step would make them NaN
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite weights"):
        trainer.save_merged(tmp_path / "merged")
    with pytest.raises(NonFiniteError, match="non-finite weights"):
        trainer.save_delta(tmp_path / "delta.safetensors")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "delta.safetensors").exists()


def test_a_mask_with_nothing_trainable_is_refused(job):
    model, _, _ = load_model(job["llama"])
    mask = dowser.Mask.load(job["mask"], model=model)
    empty = dowser.Mask({n: torch.zeros_like(m) for n, m in mask.items()})
    with pytest.raises(dowser.DowserError, match="no entry trainable"):
        dowser.DowserTrainer(model=model, mask=empty)


def test_outputs_never_write_over_inputs(job, tmp_path, capsys):
    llama = tmp_path / "llama"
    shutil.copytree(job["llama"], llama)
    before = (llama / "model.safetensors").read_bytes()
    argv = ["train", llama, "--mask", job["mask"], "--data", job["data"], "--quiet"]
    user_error([*argv, "--out", llama, "--overwrite"], capsys, "is the model directory")
    user_error([*argv, "--out", job["root"], "--overwrite"], capsys, "contains the mask")
    delta = job["mask"]  # any file: the check comes before the delta is read
    apply = ["apply-delta", llama, delta, "--overwrite"]
    user_error([*apply, "--out", llama], capsys, "is the base checkpoint")
    user_error([*apply, "--out", tmp_path], capsys, "contains the base checkpoint")
    # a scores or mask file written over the model's weights or over its own input
    probe = ["probe", llama, *FAST, "--overwrite"]
    user_error([*probe, "--out", llama / "model.safetensors"], capsys, "would replace a file of")
    scores = tmp_path / "s.safetensors"
    assert run(["probe", job["llama"], "--out", scores, *FAST], capsys)[0] == 0
    mask = ["mask", scores, "--model", llama, "--ratio", "0.1", "--overwrite", "--out"]
    user_error([*mask, scores], capsys, "is the scores")
    user_error([*mask, llama / "config.json"], capsys, "would replace a file of the model")
    assert (llama / "model.safetensors").read_bytes() == before


def test_resume_after_a_crash_while_saving_a_checkpoint(job, tmp_path, capsys):
    """A run killed while it wrote checkpoint-N continues from checkpoint-(N-1), bit-exactly;
    the final step is always checkpointed, so a crash while writing the model loses no step."""
    straight, crashed = tmp_path / "a", tmp_path / "b"
    common = [*job["argv"], "--epochs", "2", "--save-steps", "2", "--lr", "1e-2"]
    for out in (straight, crashed):
        code, _, err = run([*common, "--out", out], capsys)
        assert code == 0, err
    steps = sorted(
        int(p.name.split("-")[1]) for p in (crashed / "checkpoints").glob("checkpoint-*")
    )
    assert steps == [
        4,
        6,
    ]  # save_total_limit 2; step 6 is the last, saved though 2 does not divide it
    # the crash: checkpoint-6 half written (no trainer_state.json), the model not yet written
    (crashed / "checkpoints" / "checkpoint-6" / "trainer_state.json").unlink()
    (crashed / "model.safetensors").unlink()
    code, out, err = run([*common, "--out", crashed, "--resume"], capsys)
    assert code == 0, err
    assert "removing the incomplete checkpoint" in out and "trained 6 steps" in out
    a, b = weights(straight), weights(crashed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    # a crash after the last checkpoint (while writing the model): nothing left to train
    (crashed / "model.safetensors").unlink()
    code, out, err = run([*common, "--out", crashed, "--resume"], capsys)
    assert code == 0, err
    assert "already finished (6 steps)" in out and "mean loss" not in out
    assert all(torch.equal(a[n], c) for n, c in weights(crashed).items())
    # a crash before the first checkpoint: --resume starts over
    for path in (crashed / "checkpoints").glob("checkpoint-*"):
        shutil.rmtree(path)
    (crashed / "model.safetensors").unlink()
    code, out, err = run([*common, "--out", crashed, "--resume"], capsys)
    assert code == 0, err
    assert "starting over" in out and "trained 6 steps" in out
    assert all(torch.equal(a[n], c) for n, c in weights(crashed).items())


def test_a_full_disk_says_how_to_continue(job, tmp_path, capsys, monkeypatch):
    import dowser.train.trainer as trainer_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    argv = [*job["argv"], "--out", out, "--lr", "1e-2"]
    with monkeypatch.context() as m:
        m.setattr(trainer_module, "save_merged", full)
        err = user_error(argv, capsys, "no space left")
    assert "--resume" in err
    code, _, err = run([*argv, "--resume"], capsys)
    assert code == 0, err
    assert (out / "model.safetensors").is_file()


def test_a_trained_delta_checks_every_entry_of_its_base(job, tmp_path, capsys):
    """`dowser train --save-delta` writes exact digests: one base entry changed anywhere in
    a tensor the delta writes (far from the 4,096 sampled ones) is enough to refuse it."""
    from safetensors.torch import load_file, save_file

    from dowser.fingerprint import tensor_fingerprint
    from dowser.io import read_metadata

    out = tmp_path / "out"
    code, _, err = run([*job["argv"], "--out", out, "--lr", "1e-2", "--save-delta"], capsys)
    assert code == 0, err
    meta = read_metadata(out / "delta.safetensors", kind="delta")
    assert meta["format"] == 2 and set(meta["base_digests"]) == {*meta["sparse"], *meta["dense"]}
    base = tmp_path / "base"
    shutil.copytree(job["llama"], base)
    tensors = load_file(base / "model.safetensors")
    name = max(meta["sparse"], key=lambda n: tensors[n].numel())
    n = tensors[name].numel()
    sampled = set(torch.linspace(0, n - 1, 4096, dtype=torch.float64).round().long().tolist())
    entry = min(set(range(n)) - sampled)  # one the fingerprint's sample does not read
    original = tensors[name].clone()
    tensors[name].view(-1)[entry] += 1e-3
    assert tensor_fingerprint(tensors[name]) == tensor_fingerprint(original)  # unseen by it
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    user_error(
        ["apply-delta", base, out / "delta.safetensors", "--out", tmp_path / "m"],
        capsys,
        "another base",
    )
    assert not (tmp_path / "m").exists()


def test_a_data_file_with_a_byte_order_mark_reads(tmp_path):
    from dowser.train.data import load_examples

    path = tmp_path / "bom.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in TEXT) + "\n", encoding="utf-8-sig")
    assert [e.turns[0][0] for e in load_examples(path)] == [r["prompt"] for r in TEXT]
