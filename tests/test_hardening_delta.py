"""Deltas: what `apply_delta` checks (every entry of every tensor it writes, format 2), crafted
delta files, and merged checkpoints on a full disk."""

from __future__ import annotations

import errno
import json
import warnings

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from dowser import Mask
from dowser.cli import main
from dowser.errors import DowserError
from dowser.fingerprint import SAMPLES, model_digests, model_fingerprints, tensor_digest
from dowser.hf import load_model
from dowser.io import load_safetensors
from dowser.tiny import build_checkpoint
from dowser.train.artifacts import apply_delta, save_delta, save_merged

UP = "model.layers.1.mlp.up_proj.weight"  # 128 x 64 = 8,192 entries: more than SAMPLES
NORM = "model.layers.1.post_attention_layernorm.weight"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "llama")


def fine_tune(model, mask, dense):
    """A stand-in for training: every trainable entry and dense tensor moves."""
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, m in mask.items():
            params[name][m] += 0.5
        for name in dense:
            params[name] += 0.25


def make_delta(model_dir, path, *, digests=True, dtype=None):
    """(delta path, fine-tuned model, mask) from the checkpoint loaded in `dtype`: 10% of UP
    sparse, NORM dense."""
    model, _, _ = load_model(model_dir, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    mask = Mask({UP: torch.rand(128, 64, generator=g) < 0.1})
    names = [UP, NORM]
    fps = model_fingerprints(model, names)
    dig = model_digests(model, names) if digests else None
    fine_tune(model, mask, [NORM])
    save_delta(model, mask, path, base_fingerprints=fps, dense=[NORM], base_digests=dig)
    return path, model, mask


def unsampled(numel):
    """Flat indices the sampled fingerprint never reads."""
    seen = torch.linspace(0, numel - 1, SAMPLES, dtype=torch.float64).round().long()
    free = torch.ones(numel, dtype=torch.bool)
    free[seen] = False
    return free.nonzero().squeeze(1)


def test_a_delta_round_trips_bit_for_bit(llama_dir, tmp_path):
    path, tuned, _ = make_delta(llama_dir, tmp_path / "d.safetensors")
    base, _, _ = load_model(llama_dir)
    apply_delta(base, path)
    for name, p in tuned.named_parameters():
        assert torch.equal(p, dict(base.named_parameters())[name]), name


@pytest.mark.parametrize("touched", [True, False])
def test_a_change_outside_the_sample_is_caught(llama_dir, tmp_path, touched):
    """Format 2 checks every entry of a written tensor: one the delta overwrites, or one it
    keeps, and one the 4,096-entry sample never reads; format 1 cannot (and says so)."""
    strong, _, mask = make_delta(llama_dir, tmp_path / "strong.safetensors")
    weak, _, _ = make_delta(llama_dir, tmp_path / "weak.safetensors", digests=False)
    candidates = unsampled(128 * 64)
    flat = mask[UP].reshape(-1)
    i = int(candidates[flat[candidates] == touched][0])
    base, _, _ = load_model(llama_dir)
    with torch.no_grad():
        base.get_parameter(UP).view(-1)[i] += 1e-3
    before = {n: p.clone() for n, p in base.named_parameters()}
    with pytest.raises(
        DowserError, match=f"another base model: 1 weights with other values \\({UP}"
    ):
        apply_delta(base, strong)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())  # untouched
    with pytest.warns(UserWarning, match="format-1 delta .* sampled fingerprints only"):
        apply_delta(base, weak)


@pytest.mark.parametrize(
    "trained, applied", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
)
def test_digests_hold_across_load_dtypes(llama_dir, tmp_path, trained, applied):
    """A bfloat16 checkpoint trained in one dtype, its delta applied to it loaded in another:
    the digests compare in the dtype trained from."""
    model, _, _ = load_model(llama_dir)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    path, _, _ = make_delta(tmp_path / "bf16", tmp_path / "d.safetensors", dtype=trained)
    _, meta = load_safetensors(path, kind="delta")
    name = str(trained).removeprefix("torch.")
    assert meta["format"] == 2 and meta["base_digests"][UP].startswith(f"{name}:")
    base, _, _ = load_model(tmp_path / "bf16", dtype=applied)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_delta(base, path)
    base, _, _ = load_model(tmp_path / "bf16", dtype=applied)
    with torch.no_grad():
        base.get_parameter(NORM)[0] += 1.0
    with pytest.raises(DowserError, match=f"1 weights with other values \\({NORM}"):
        apply_delta(base, path)


def test_tensor_digest_sees_every_entry_and_the_shape():
    t = torch.randn(70, 70)
    d = tensor_digest(t)
    for i in range(0, t.numel(), 611):
        u = t.clone()
        u.view(-1)[i] = torch.nextafter(u.view(-1)[i], torch.tensor(float("inf")))
        assert tensor_digest(u) != d, i
    assert tensor_digest(t.reshape(49, 100)) != d
    assert tensor_digest(t.bfloat16(), torch.float32) == tensor_digest(t.bfloat16().float())


def craft(path, tmp_path, change):
    tensors, meta = load_safetensors(path, kind="delta")
    change(tensors, meta)
    out = tmp_path / "crafted.safetensors"
    save_file(tensors, out, metadata={"dowser": json.dumps(meta)})
    return out


EMBED = "model.embed_tokens.weight"
CRAFTED = [
    (lambda t, m: m.pop("shapes"), "corrupt"),
    (lambda t, m: m["shapes"].pop(UP), f"no shape for {UP}"),
    (lambda t, m: m["shapes"].update({UP: [64, 64]}), f"indices or values of {UP} do not fit"),
    (lambda t, m: m["shapes"].update({NORM: [32]}), f"tensor of {NORM} does not have its shape"),
    (lambda t, m: m["base_fingerprints"].pop(UP), f"no base fingerprint for {UP}"),
    (lambda t, m: m.pop("base_fingerprints"), "corrupt"),
    (lambda t, m: m["base_digests"].pop(NORM), f"no base digest for {NORM}"),
    (lambda t, m: t[f"{UP}::indices"].__setitem__(0, 10**6), f"indices or values of {UP}"),
    (lambda t, m: t.update({f"{UP}::values": t[f"{UP}::values"][:-1]}), "indices or values"),
    (lambda t, m: t.pop(f"{NORM}::dense"), "do not match its metadata"),
    (lambda t, m: t.update({"x::dense": torch.ones(2)}), "do not match its metadata"),
    (lambda t, m: m.update({"sparse": "abc"}), "corrupt"),
    (lambda t, m: m.update({"dense": [NORM, NORM]}), "listed twice"),
    (lambda t, m: m.update({"format": 7}), "format 7 is not supported"),
    # a tensor written without a fingerprint of the base (the embedding, say)
    (
        lambda t, m: (
            m["dense"].append(EMBED),
            m["shapes"].update({EMBED: [512, 64]}),
            t.update({f"{EMBED}::dense": torch.zeros(512, 64)}),
        ),
        f"no base fingerprint for {EMBED}",
    ),
]


@pytest.mark.parametrize("change, needle", CRAFTED)
def test_crafted_deltas_are_one_line(llama_dir, tmp_path, capsys, change, needle):
    path, _, _ = make_delta(llama_dir, tmp_path / "d.safetensors")
    crafted = craft(path, tmp_path, change)
    base, _, _ = load_model(llama_dir)
    before = {n: p.clone() for n, p in base.named_parameters()}
    with pytest.raises(DowserError) as e:
        apply_delta(base, crafted)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    for argv in (
        ["inspect", crafted],
        ["apply-delta", llama_dir, crafted, "--out", tmp_path / "m"],
    ):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "m").exists()


def test_inspect_says_what_a_delta_checks(llama_dir, tmp_path, capsys):
    strong, _, _ = make_delta(llama_dir, tmp_path / "strong.safetensors")
    weak, _, _ = make_delta(llama_dir, tmp_path / "weak.safetensors", digests=False)
    assert main(["inspect", str(strong)]) == 0
    assert "format: 2; base check: every entry" in capsys.readouterr().out
    assert main(["inspect", str(weak)]) == 0
    assert "format: 1; base check: sampled fingerprints only" in capsys.readouterr().out


def full_disk(*args, **kwargs):
    raise SafetensorError(
        'Error while serializing: I/O error: No space left on device (os error 28) at path "x"'
    )


def test_a_merged_checkpoint_on_a_full_disk(llama_dir, tmp_path, monkeypatch, capsys):
    model, tok, _ = load_model(llama_dir)
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full_disk)
    new = tmp_path / "a" / "b" / "merged"
    with pytest.raises(DowserError, match=f"cannot write {new}: no space .*free space and retry"):
        save_merged(model, new, preprocessors=[tok], source_dir=llama_dir)
    assert not (tmp_path / "a").exists()  # every folder it made is gone
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(DowserError, match="free space and retry"):
        save_merged(model, mine, preprocessors=[tok], source_dir=llama_dir)
    assert [f.name for f in mine.iterdir()] == ["notes.txt"]  # and nothing else
    # through the command line
    path, _, _ = make_delta(llama_dir, tmp_path / "d.safetensors")
    out = tmp_path / "merged"
    assert main(["apply-delta", str(llama_dir), str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "free space and retry" in err and "Traceback" not in err
    assert not out.exists()


def test_a_full_disk_while_writing_a_delta(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "dowser.io.save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    with pytest.raises(DowserError, match="free space and retry"):
        make_delta(llama_dir, tmp_path / "d.safetensors")
    assert list(tmp_path.iterdir()) == []
