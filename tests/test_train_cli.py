"""`dowser train` and `dowser apply-delta` end to end, DowserTrainer options, user errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from test_cli import FAST, run, user_error

import dowser
from dowser.hf import load_model
from dowser.tiny import build_checkpoint

TRAIN = ["--epochs", "2", "--batch-size", "2", "--lr", "1e-2", "--weight-decay", "0.1", "--quiet"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, checkpoint_dirs):
    """Data files, and for llava and llama: a mask built through the CLI."""
    root = tmp_path_factory.mktemp("train")
    g = torch.Generator().manual_seed(0)
    (root / "img").mkdir()
    rows = []
    for i in range(6):
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "prompt": "what is it?", "answer": f"thing {i % 2}"})
    (root / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = [
        {"prompt": f"count to {i}", "answer": " ".join(map(str, range(i)))} for i in range(1, 7)
    ]
    (root / "text.jsonl").write_text("\n".join(json.dumps(r) for r in text) + "\n")
    conv = [
        {
            "image": "img/0.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat?"},
                {"from": "gpt", "value": "a cat"},
            ],
        }
    ] * 4
    (root / "llava.json").write_text(json.dumps(conv))
    masks = {}
    for arch in ("llava", "llama"):
        scores = root / f"{arch}.scores.safetensors"
        masks[arch] = root / f"{arch}.mask.safetensors"
        assert main_ok(["probe", checkpoint_dirs[arch], "--out", scores, *FAST])
        assert main_ok(
            [
                "mask",
                scores,
                "--model",
                checkpoint_dirs[arch],
                "--ratio",
                "0.1",
                "--out",
                masks[arch],
            ]
        )
    return root, masks


def train_llama(setup, checkpoint_dirs, out, capsys, *extra) -> None:
    """`dowser train` on the tiny Llama with its mask and the text data, which must succeed."""
    root, masks = setup
    argv = [
        "train",
        checkpoint_dirs["llama"],
        "--mask",
        masks["llama"],
        "--data",
        root / "text.jsonl",
    ]
    code, _, err = run([*argv, "--out", out, "--quiet", *extra], capsys)
    assert code == 0, err


def main_ok(argv) -> bool:
    from dowser.cli import main

    return main([str(a) for a in argv]) == 0


def params(model_dir):
    model, _, _ = load_model(model_dir)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "arch, data, optimizer",
    [
        ("llava", "vqa.jsonl", "sparse-adamw"),
        ("llama", "text.jsonl", "masked-adamw"),
        ("llava", "llava.json", "masked-adamw"),
    ],
)
def test_train_end_to_end(arch, data, optimizer, setup, checkpoint_dirs, tmp_path, capsys):
    root, masks = setup
    out = tmp_path / "out"
    argv = [
        "train",
        checkpoint_dirs[arch],
        "--mask",
        masks[arch],
        "--data",
        root / data,
        "--out",
        out,
    ]
    code, stdout, err = run([*argv, *TRAIN, "--optimizer", optimizer, "--save-delta"], capsys)
    assert code == 0, err
    assert "trained" in stdout
    base, tuned = params(checkpoint_dirs[arch]), params(out)
    mask = dowser.Mask.load(masks[arch])
    for n, m in mask.items():
        assert torch.equal(tuned[n][~m], base[n][~m]), n  # frozen: bit-identical
    assert any(not torch.equal(tuned[n][m], base[n][m]) for n, m in mask.items())
    changed = {n for n in base if not torch.equal(base[n], tuned[n])}
    assert changed - set(mask) and all("norm" in n for n in changed - set(mask))
    # the merged dir is a complete checkpoint with the preprocessor
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    # the delta rebuilds the merged weights exactly
    merged = tmp_path / "merged"
    code, _, err = run(
        ["apply-delta", checkpoint_dirs[arch], out / "delta.safetensors", "--out", merged], capsys
    )
    assert code == 0, err
    again = params(merged)
    assert all(torch.equal(again[n], tuned[n]) for n in tuned)
    code, stdout, _ = run(["inspect", out / "delta.safetensors"], capsys)
    assert code == 0 and "sparse delta" in stdout


def test_resume_equals_uninterrupted(setup, checkpoint_dirs, tmp_path, capsys):
    root, masks = setup
    common = ["--mask", masks["llama"], "--data", root / "text.jsonl", *TRAIN]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    for out in (straight, resumed):
        assert run(["train", checkpoint_dirs["llama"], "--out", out, *common], capsys)[0] == 0
    # interrupt b after its first epoch: drop the last checkpoint and the final model
    (resumed / "model.safetensors").unlink()
    checkpoints = (resumed / "checkpoints").glob("checkpoint-*")
    last = max(checkpoints, key=lambda p: int(p.name.split("-")[1]))
    import shutil

    shutil.rmtree(last)
    code, _, err = run(
        ["train", checkpoint_dirs["llama"], "--out", resumed, *common, "--resume"], capsys
    )
    assert code == 0, err
    a, b = params(straight), params(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_trainer_with_accumulation_checkpointing_and_bf16(setup, checkpoint_dirs, tmp_path):
    from transformers import TrainingArguments

    from dowser.train.data import Collator, SupervisedDataset, load_examples

    root, masks = setup
    for optimizer in ("sparse-adamw", "masked-adamw"):
        model, tok, _ = load_model(checkpoint_dirs["llama"])
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        mask = dowser.Mask.load(masks["llama"], model=model)
        args = TrainingArguments(
            output_dir=str(tmp_path / optimizer),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            activation_checkpointing=True,
            bf16=True,
            learning_rate=1e-2,
            weight_decay=0.1,
            num_train_epochs=1,
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
            optimizer=optimizer,
            train_dataset=SupervisedDataset(load_examples(root / "text.jsonl"), tok),
            data_collator=Collator(tok.pad_token_id),
        )
        trainer.train()
        assert isinstance(trainer.optimizer.optimizer, dowser.SparseAdamW) == (
            optimizer == "sparse-adamw"
        )
        after = dict(model.named_parameters())
        for n, m in mask.items():
            assert torch.equal(after[n][~m], before[n][~m]), (optimizer, n)
            assert not torch.equal(after[n][m], before[n][m]), (optimizer, n)


def test_train_user_errors(setup, checkpoint_dirs, tmp_path, capsys):
    root, masks = setup
    llama, llava = checkpoint_dirs["llama"], checkpoint_dirs["llava"]
    out = tmp_path / "out"
    base = ["--out", out, "--quiet"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": "y"}\n{"prompt": "no answer"}\n')
    user_error(
        ["train", llama, "--mask", masks["llama"], "--data", bad, *base],
        capsys,
        "bad.jsonl:2: the record has no 'answer' field",
    )
    missing_img = tmp_path / "img.jsonl"
    missing_img.write_text('{"image": "gone.png", "prompt": "x", "answer": "y"}\n')
    user_error(
        ["train", llava, "--mask", masks["llava"], "--data", missing_img, *base],
        capsys,
        "image gone.png not found",
    )
    user_error(
        ["train", llama, "--mask", masks["llava"], "--data", root / "text.jsonl", *base],
        capsys,
        "does not fit this model",
    )
    user_error(
        ["train", llama, "--mask", masks["llama"], "--data", root / "vqa.jsonl", *base],
        capsys,
        "no image processor",
    )
    user_error(
        ["train", llama, "--mask", root / "nope.safetensors", "--data", root / "text.jsonl", *base],
        capsys,
        "does not exist",
    )
    user_error(
        [
            "train",
            llama,
            "--mask",
            masks["llama"],
            "--data",
            root / "text.jsonl",
            *base,
            "--resume",
        ],
        capsys,
        "no checkpoint to resume",
    )
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    user_error(
        ["train", llama, "--mask", masks["llama"], "--data", root / "text.jsonl", *base],
        capsys,
        "not empty",
    )
    assert (out / "keep.txt").read_text() == "mine"
    assert not (out / "checkpoints").exists()


def test_apply_delta_refuses_another_base(setup, checkpoint_dirs, tmp_path, capsys):
    root, masks = setup
    out = tmp_path / "out"
    train_llama(setup, checkpoint_dirs, out, capsys, "--save-delta")
    other = build_checkpoint("llama", tmp_path / "other", seed=5)
    user_error(
        ["apply-delta", other, out / "delta.safetensors", "--out", tmp_path / "m"],
        capsys,
        "another base model",
    )
    assert not (tmp_path / "m").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    user_error(
        ["apply-delta", checkpoint_dirs["llama"], out / "delta.safetensors", "--out", busy],
        capsys,
        "not empty",
    )


def test_resume_and_overwrite_never_mix_runs(setup, checkpoint_dirs, tmp_path, capsys):
    root, masks = setup
    llama = checkpoint_dirs["llama"]
    out = tmp_path / "out"
    common = ["--data", root / "text.jsonl", "--out", out, "--quiet"]
    assert (
        run(["train", llama, "--mask", masks["llama"], *common, "--save-steps", "1"], capsys)[0]
        == 0
    )
    old = {p.name for p in (out / "checkpoints").glob("checkpoint-*")}
    # another mask cannot resume this run
    other = tmp_path / "other.safetensors"
    assert (
        run(
            [
                "mask",
                root / "llama.scores.safetensors",
                "--model",
                llama,
                "--ratio",
                "0.3",
                "--out",
                other,
            ],
            capsys,
        )[0]
        == 0
    )
    user_error(["train", llama, "--mask", other, *common, "--resume"], capsys, "another mask")
    user_error(
        [
            "train",
            llama,
            "--mask",
            masks["llama"],
            *common,
            "--resume",
            "--optimizer",
            "masked-adamw",
        ],
        capsys,
        "another --optimizer",
    )
    # --overwrite starts afresh: no checkpoint of the old run survives
    assert (
        run(["train", llama, "--mask", other, *common, "--overwrite", "--batch-size", "6"], capsys)[
            0
        ]
        == 0
    )
    new = {p.name for p in (out / "checkpoints").glob("checkpoint-*")}
    assert new == {"checkpoint-1"} and old != new


def test_bad_data_is_caught_before_training(setup, checkpoint_dirs, tmp_path, capsys):
    root, masks = setup
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.png").write_bytes((root / "img" / "0.png").read_bytes())
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    rows = [{"image": "img/ok.png", "prompt": "q", "answer": "a"}] * 3
    rows.append({"image": "img/broken.png", "prompt": "q", "answer": "a"})
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    argv = ["train", checkpoint_dirs["llava"], "--mask", masks["llava"], "--out", out, "--quiet"]
    user_error([*argv, "--data", data], capsys, "cannot read image")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 200, "answer": "a"}) + "\n")
    llama = ["train", checkpoint_dirs["llama"], "--mask", masks["llama"], "--out", out, "--quiet"]
    user_error([*llama, "--data", long, "--max-length", "64"], capsys, "max-length")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "caf\xe9", "answer": "x"}'.encode("latin-1"))
    user_error([*llama, "--data", latin], capsys, "not UTF-8")
    assert not out.exists()  # nothing was started


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--scheduler", "foo"),
        ("--epochs", "0"),
        ("--warmup-ratio", "1"),
        ("--lr", "-1"),
        ("--logging-steps", "0"),
        ("--save-steps", "-1"),
        ("--device", "tpu"),
        # every numeric option is finite and bounded
        ("--lr", "inf"),
        ("--lr", "1e308"),
        ("--lr", "nan"),
        ("--weight-decay", "inf"),
        ("--epochs", "inf"),
        ("--max-grad-norm", "nan"),
        ("--seed", "-1"),
        ("--batch-size", "99999999999"),
    ],
)
def test_bad_training_settings_are_parser_errors(flag, value, capsys):
    from dowser.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "m", "--mask", "m", "--data", "d", "--out", "o", flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_cuda_without_a_gpu_is_a_clear_error(setup, checkpoint_dirs, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    root, masks = setup
    argv = [
        "train",
        checkpoint_dirs["llama"],
        "--mask",
        masks["llama"],
        "--data",
        root / "text.jsonl",
    ]
    user_error(
        [*argv, "--out", tmp_path / "o", "--device", "cuda", "--quiet"], capsys, "no CUDA device"
    )


def test_outputs_that_are_files(setup, checkpoint_dirs, tmp_path, capsys):
    root, masks = setup
    afile = tmp_path / "afile"
    afile.write_text("mine")
    user_error(["demo", "--out", afile, "--quiet"], capsys, "not a directory")
    out = tmp_path / "out"
    train_llama(setup, checkpoint_dirs, out, capsys, "--save-delta")
    user_error(
        [
            "apply-delta",
            checkpoint_dirs["llama"],
            out / "delta.safetensors",
            "--out",
            afile,
            "--overwrite",
        ],
        capsys,
        "not a directory",
    )
    assert afile.read_text() == "mine"
