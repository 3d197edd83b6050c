"""Sparse fine-tuning under torchrun on the CPU (gloo backend): DDP and FSDP2.

Two processes at per-device batch 2 must give the weights one process gives at batch 4, with
frozen entries bit-identical, for both optimizers; every rank checks its own shard; FSDP2
checkpoints resume exactly; and the user errors of the distributed options.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from test_cli import run, user_error

import dowser
from dowser.errors import DowserError
from dowser.hf import load_model
from dowser.train import SparseAdamW, apply_delta
from dowser.train.trainer import DowserTrainer

WORKER = Path(__file__).with_name("dist_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# one thread per process: two processes share this machine's cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TRAIN = ["--lr", "1e-2", "--weight-decay", "0.1", "--device", "cpu", "--quiet", "--save-delta"]


# what `accelerate launch --use_fsdp --fsdp_version 2` sets (it cannot start several CPU
# processes itself; on GPUs it starts them with torchrun)
ACCELERATE_FSDP = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
}


def torchrun(*argv, env: dict | None = None) -> str:
    proc = subprocess.run(
        [*TORCHRUN, *map(str, argv)],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory, checkpoint_dirs):
    """Data (text for llama, images for llava) and a 10 % Dowser mask per architecture."""
    root = tmp_path_factory.mktemp("dist")
    text = [{"prompt": f"count to {i}", "answer": " ".join(map(str, range(i)))} for i in range(16)]
    (root / "llama.jsonl").write_text("\n".join(json.dumps(r) for r in text) + "\n")
    g = torch.Generator().manual_seed(0)
    (root / "img").mkdir()
    rows = []
    for i in range(8):
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "prompt": "what?", "answer": "x" * (i % 3) + "y"})
    (root / "llava.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for arch in ("llama", "llava"):
        model, tok, proc = load_model(checkpoint_dirs[arch])
        scores = dowser.probe(
            model,
            tokenizer=tok,
            processor=proc,
            num_samples=4,
            batch_size=2,
            num_probes=2,
            seq_len=8,
            images="noise" if arch == "llava" else "off",
            progress=False,
        )
        dowser.build_mask(model, scores, update_ratio=0.1).save(root / f"{arch}.mask.safetensors")
    return root


def train_argv(setup, checkpoint_dirs, arch: str, out: Path, optimizer: str) -> list:
    return [
        "train",
        checkpoint_dirs[arch],
        "--mask",
        setup / f"{arch}.mask.safetensors",
        "--data",
        setup / f"{arch}.jsonl",
        "--out",
        out,
        "--optimizer",
        optimizer,
        *TRAIN,
    ]


_single: dict[tuple[str, str], Path] = {}


def one_process(setup, checkpoint_dirs, capsys, arch: str, optimizer: str) -> Path:
    """The same run in this process at batch 4 (made once per architecture and optimizer)."""
    if (arch, optimizer) not in _single:
        out = setup / f"single-{arch}-{optimizer}"
        argv = train_argv(setup, checkpoint_dirs, arch, out, optimizer)
        code, _, err = run([*argv, "--batch-size", "4"], capsys)
        assert code == 0, err
        _single[(arch, optimizer)] = out
    return _single[(arch, optimizer)]


@pytest.mark.parametrize(
    "mode,optimizer,arch",
    [
        ("ddp", "sparse-adamw", "llama"),
        ("ddp", "masked-adamw", "llava"),
        ("fsdp", "sparse-adamw", "llava"),
        ("fsdp", "masked-adamw", "llama"),
    ],
)
def test_torchrun_equals_one_process(setup, checkpoint_dirs, capsys, mode, optimizer, arch):
    ref = one_process(setup, checkpoint_dirs, capsys, arch, optimizer)
    out = setup / f"{mode}-{arch}-{optimizer}"
    argv = train_argv(setup, checkpoint_dirs, arch, out, optimizer)
    stdout = torchrun(
        "-m", "dowser", *argv, "--batch-size", "2", *(["--fsdp"] if mode == "fsdp" else [])
    )
    assert stdout.count("on 2 processes") == 1  # rank 0 alone reports
    got, want, base = weights(out), weights(ref), weights(checkpoint_dirs[arch])
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    mask = dowser.Mask.load(setup / f"{arch}.mask.safetensors")
    moved = 0
    for name, m in mask.items():
        assert torch.equal(got[name][~m], base[name][~m]), f"frozen entries of {name} moved"
        moved += int((got[name][m] != base[name][m]).sum())
    assert moved > 0.5 * sum(int(m.sum()) for m in mask.values())
    untouched = [n for n in got if n not in mask and "norm" not in n]
    assert untouched and all(torch.equal(got[n], base[n]) for n in untouched)
    # the Trainer's checkpoint (end of the epoch) loads in one process, whole
    last = sorted((out / "checkpoints").glob("checkpoint-*"))[-1]
    assert all(torch.equal(p, got[n]) for n, p in weights(last).items())
    # the delta, written once by rank 0, rebuilds the output from the base
    model, _, _ = load_model(checkpoint_dirs[arch])
    apply_delta(model, out / "delta.safetensors")
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), got[name]), name


@pytest.mark.parametrize(
    "mode,optimizer",
    [
        ("ddp", "sparse-adamw"),
        ("fsdp", "masked-adamw"),
        ("accelerate-fsdp", "sparse-adamw"),
        ("callback-fsdp", "sparse-adamw"),
        ("callback-fsdp", "masked-adamw"),
        ("loop", "sparse-adamw"),
        ("loop", "masked-adamw"),
    ],
)
def test_every_rank_keeps_its_frozen_entries(setup, checkpoint_dirs, mode, optimizer):
    """The Python API under torchrun; each rank checks the part of each weight it holds.
    accelerate-fsdp: FSDP asked for by accelerate's environment, not TrainingArguments;
    callback-fsdp: a user's own Trainer with DowserCallback (no DowserTrainer);
    loop: a plain PyTorch loop over a model sharded with fully_shard by hand."""
    out = setup / f"api-{mode}-{optimizer}"
    out.mkdir()
    mask_path = setup / "llama.mask.safetensors"
    data = setup / "llama.jsonl"
    env = ACCELERATE_FSDP if mode == "accelerate-fsdp" else None
    ckpt = checkpoint_dirs["llama"]
    torchrun(WORKER, ckpt, mask_path, data, out, mode, optimizer, env=env)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    mask = dowser.Mask.load(mask_path)
    frozen = sum(int((~m).sum()) for m in mask.values())
    for r in reports:
        assert r["frozen_changed"] == 0 and r["frozen_checked"] > 0 and r["trainable_changed"] > 0
        assert r["blocks_match"]
    if mode == "ddp":  # every rank holds every weight whole
        assert all(r["sharded"] == 0 and r["frozen_checked"] == frozen for r in reports)
    else:  # each rank holds a block of rows of every weight: together, each entry once
        assert all(r["sharded"] == len(mask) for r in reports)
        assert sum(r["frozen_checked"] for r in reports) == frozen
    if mode == "loop":
        return
    assert (out / "merged" / "model.safetensors").is_file()
    model, _, _ = load_model(ckpt)
    apply_delta(model, out / "delta.safetensors")
    merged = weights(out / "merged")
    assert all(torch.equal(p.detach(), merged[n]) for n, p in model.named_parameters())


def test_fsdp_resume_equals_uninterrupted(setup, checkpoint_dirs):
    """An FSDP2 checkpoint (sharded SparseAdamW state gathered whole) resumes exactly."""
    argv = train_argv(setup, checkpoint_dirs, "llama", setup / "x", "sparse-adamw")
    common = [*argv[:6], "--batch-size", "2", "--fsdp", "--scheduler", "constant"]
    common += ["--warmup-ratio", "0", "--lr", "1e-2", "--weight-decay", "0.1", "--quiet"]
    common += ["--device", "cpu"]
    full, part = setup / "resume-full", setup / "resume-part"
    torchrun("-m", "dowser", *common, "--epochs", "2", "--out", full)
    torchrun("-m", "dowser", *common, "--epochs", "1", "--out", part)
    torchrun("-m", "dowser", *common, "--epochs", "2", "--out", part, "--resume")
    a, b = weights(full), weights(part)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_distributed_user_errors(setup, checkpoint_dirs, capsys, tmp_path):
    argv = train_argv(setup, checkpoint_dirs, "llama", tmp_path / "o", "sparse-adamw")
    user_error([*argv, "--fsdp"], capsys, "torchrun --nproc-per-node N")
    user_error([*argv, "--fsdp-config", tmp_path / "f.json"], capsys, "only with --fsdp")
    missing = tmp_path / "missing.json"
    user_error([*argv, "--fsdp", "--fsdp-config", missing], capsys, "no such file")
    (tmp_path / "bad.json").write_text("[1, 2]")
    user_error([*argv, "--fsdp", "--fsdp-config", tmp_path / "bad.json"], capsys, "JSON object")
    assert not (tmp_path / "o").exists()


def test_deepspeed_is_refused(llama):
    mask = dowser.Mask({n: torch.ones_like(p, dtype=torch.bool) for n, p in _linear(llama)})
    with pytest.raises(DowserError, match="FSDP2"):
        DowserTrainer(model=llama, args=SimpleNamespace(deepspeed="ds.json"), mask=mask)


def test_sparse_adamw_follows_replaced_weights(llama, token_batch):
    """A wrapper that swaps parameters after the optimizer was made (as FSDP2 does, in the
    model and in the optimizer's groups): the optimizer follows them where they sit in its
    groups, by itself at the step or by `bind`; a weight it no longer holds is refused."""
    mask = dowser.Mask({n: torch.rand_like(p) < 0.1 for n, p in _linear(llama)})
    dowser.prepare_model(llama, mask)
    opt = SparseAdamW(llama, mask, lr=1e-2)
    layer = llama.model.layers[0].mlp.up_proj
    old = layer.weight
    layer.weight = torch.nn.Parameter(old.detach().clone())
    group = next(g for g in opt.param_groups if any(p is old for p in g["params"]))
    group["params"] = [layer.weight if p is old else p for p in group["params"]]
    new = layer.weight
    layer.weight = torch.nn.Parameter(old.detach().clone())  # one the optimizer lacks
    with pytest.raises(DowserError, match="no longer holds"):
        opt.bind(llama)
    layer.weight = new
    llama(**token_batch, labels=token_batch["input_ids"]).loss.backward()
    before = new.detach().clone()
    opt.step()  # follows the replacement by itself
    assert opt.is_sparse(new) and not opt.is_sparse(old)
    m = mask["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(new.detach()[~m], before[~m])
    assert (new.detach()[m] != before[m]).any()


@pytest.fixture
def token_batch():
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def weights(model_dir) -> dict[str, torch.Tensor]:
    """A checkpoint's parameters by their names in the loaded model."""
    model, _, _ = load_model(model_dir)
    return {n: p.detach() for n, p in model.named_parameters()}


def _linear(model):
    return [(n, p) for n, p in model.named_parameters() if n.endswith("proj.weight")]
