"""Hostile input for the loaders and writers: incomplete or truncated checkpoints, full disks,
crafted scores and masks, bad images, absurd sample counts. Each gives one DowserError line
(the CLI: one line, exit 2) and leaves nothing half-written."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import dowser
from dowser import Mask, Scores, build_mask
from dowser.cli import main
from dowser.errors import DowserError
from dowser.hf import load_model
from dowser.io import check_writable, load_safetensors, save_safetensors
from dowser.ranking import lowest_k, lowest_per_row
from dowser.scores import Factors
from dowser.tiny import build_checkpoint, build_model

FAST = ["--num-samples", "4", "--batch-size", "2", "--num-probes", "1", "--seq-len", "6", "--quiet"]
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def cli(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(argv, capsys, *needles):
    code, _, err = cli(argv, capsys)
    assert code == 2, err
    # one error line, last (progress bars aside), and no traceback or load report before it
    assert "Traceback" not in err and "LOAD REPORT" not in err, err
    assert err.count("error:") == 1 and err.endswith("\n"), err
    assert err.rstrip("\n").split("\n")[-1].startswith(f"dowser {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "llama")


@pytest.fixture(scope="module")
def scores_file(llama_dir, tmp_path_factory):
    model, tok, _ = load_model(llama_dir)
    scores = dowser.probe(
        model, tokenizer=tok, num_samples=4, batch_size=2, num_probes=1, seq_len=6, progress=False
    )
    return scores.save(tmp_path_factory.mktemp("scores") / "scores.safetensors")


def copy_checkpoint(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rewrite(path, tensors=None, meta=None):
    """Re-save a safetensors file with changed tensors and/or dowser metadata."""
    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata() or {})
    tensors = load_file(path) if tensors is None else tensors
    if meta is not None:
        metadata["dowser"] = json.dumps(meta)
    save_file(tensors, path, metadata=metadata)


# --- checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dropped", ["model.layers.0.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight"]
)
def test_a_checkpoint_missing_weights_is_refused(llama_dir, tmp_path, capsys, dropped):
    ckpt = copy_checkpoint(llama_dir, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    tensors = load_file(weights)
    del tensors[dropped]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(DowserError, match=f"1 weights missing \\({dropped}\\)"):
        load_model(ckpt)
    out = tmp_path / "s.safetensors"
    one_line_error(["probe", ckpt, "--out", out, *FAST], capsys, dropped, "incomplete")
    assert not out.exists()


def test_tied_weights_are_not_missing(tmp_path):
    model, tok = build_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "tied")
    tok.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    loaded, _, _ = load_model(tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_a_truncated_checkpoint_is_one_line(llama_dir, tmp_path, capsys, keep):
    ckpt = copy_checkpoint(llama_dir, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DowserError, match="truncated or corrupt"):
        load_model(ckpt)
    one_line_error(["probe", ckpt, "--out", tmp_path / "s.safetensors", *FAST], capsys, "truncated")


# --- full disks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        ENOSPC,
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        SafetensorError('Error while serializing: I/O error: No space left (os error 28) at "x"'),
    ],
)
def test_a_full_disk_leaves_nothing_and_says_so(monkeypatch, tmp_path, error):
    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")  # what a real full disk leaves behind
        raise error

    monkeypatch.setattr("dowser.io.save_file", full)
    with pytest.raises(DowserError, match="free space and retry") as e:
        save_safetensors({"a": torch.zeros(3)}, tmp_path / "x.safetensors", {"kind": "test"})
    assert str(tmp_path / "x.safetensors") in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_folder_is_one_line(monkeypatch, tmp_path):
    def denied(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("dowser.io.save_file", denied)
    with pytest.raises(DowserError, match="read-only file system; write to a folder"):
        save_safetensors({"a": torch.zeros(3)}, tmp_path / "x.safetensors", {"kind": "test"})
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_keep_their_traceback(monkeypatch, tmp_path):
    def bug(*args, **kwargs):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr("dowser.io.save_file", bug)
    with pytest.raises(OSError, match="Invalid argument"):
        save_safetensors({"a": torch.zeros(3)}, tmp_path / "x.safetensors", {"kind": "test"})
    assert list(tmp_path.iterdir()) == []


def test_probe_and_mask_on_a_full_disk(monkeypatch, llama_dir, scores_file, tmp_path, capsys):
    monkeypatch.setattr("dowser.io.save_file", lambda *a, **k: (_ for _ in ()).throw(ENOSPC))
    out = tmp_path / "out"
    out.mkdir()
    one_line_error(
        ["probe", llama_dir, "--out", out / "s.safetensors", *FAST],
        capsys,
        str(out / "s.safetensors"),
        "free space and retry",
    )
    one_line_error(
        ["mask", scores_file, "--model", llama_dir, "--out", out / "m.safetensors"],
        capsys,
        "free space and retry",
    )
    assert list(out.iterdir()) == []


def test_the_cli_turns_a_stray_disk_error_into_one_line(monkeypatch, scores_file, capsys):
    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/x.json")

    monkeypatch.setattr("dowser.cli.describe.run", full)
    one_line_error(["inspect", scores_file], capsys, "/data/x.json", "free space and retry")

    def bug(args):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr("dowser.cli.describe.run", bug)
    with pytest.raises(OSError, match="Bad file descriptor"):
        main(["inspect", str(scores_file)])


# --- the --overwrite hint ---------------------------------------------------------------------


def test_overwrite_hint_names_the_flag_of_its_interface(llama_dir, scores_file, tmp_path, capsys):
    with pytest.raises(DowserError) as e:
        check_writable(scores_file)
    assert "overwrite=True" in str(e.value) and "--overwrite" not in str(e.value)
    for argv in (
        ["probe", llama_dir, "--out", scores_file, *FAST],
        ["mask", scores_file, "--model", llama_dir, "--out", scores_file],
    ):
        err = one_line_error(argv, capsys, "already exists; pass --overwrite")
        assert "overwrite=True" not in err


# --- crafted scores and masks -----------------------------------------------------------------

Q = "model.layers.0.self_attn.q_proj.weight"


def crafted_scores(scores_file, tmp_path, change):
    tensors, meta = load_safetensors(scores_file, kind="scores")
    change(tensors, meta)
    path = tmp_path / "crafted.safetensors"
    save_file(tensors, path, metadata={"dowser": json.dumps(meta)})
    return path


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda t, m: m.pop("fingerprints"), "corrupt"),
        (lambda t, m: m["fingerprints"].pop(Q), f"no fingerprint for {Q}"),
        (lambda t, m: t.update({f"{Q}::act": torch.ones(3, 64)}), f"factors of {Q} do not match"),
        (lambda t, m: t.update({f"{Q}::weight": torch.ones(1, 1)}), f"factors of {Q} do not"),
        (lambda t, m: t[f"{Q}::psi"].mul_(-1), f"factors of {Q} hold negative values"),
        (lambda t, m: t[f"{Q}::act"].view(-1)[0].fill_(float("nan")), "hold NaN or inf (act)"),
        (lambda t, m: t.update({f"{Q}::psi": t[f"{Q}::psi"].long()}), "not floating point"),
        (lambda t, m: t.update({"extra::psi": torch.ones(1)}), "holds extra::psi"),
    ],
)
def test_crafted_scores_are_one_line(scores_file, llama_dir, tmp_path, capsys, change, needle):
    path = crafted_scores(scores_file, tmp_path, change)
    with pytest.raises(DowserError, match="corrupt"):
        Scores.load(path)
    one_line_error(
        ["mask", path, "--model", llama_dir, "--out", tmp_path / "m.safetensors"], capsys, needle
    )
    one_line_error(["inspect", path], capsys, needle)


def test_negative_or_nan_scores_never_rank(llama_dir):
    model, _, _ = load_model(llama_dir)
    scores = dowser.probe(model, estimator="magnitude", progress=False)
    scores.factors[Q] = Factors(-torch.ones(1, 64), torch.ones(1, 64), torch.ones(1))
    for scope in ("tensor", "row", "layer", "global"):
        with pytest.raises(DowserError, match=f"scores for {Q} hold negative values"):
            build_mask(model, scores, update_ratio=0.5, scope=scope)
    # the ranking itself refuses them too; -0.0 is zero
    with pytest.raises(DowserError, match="negative"):
        lowest_k([torch.tensor([0.5, -0.1, 0.2])], 1)
    with pytest.raises(DowserError, match="NaN"):
        lowest_k([torch.tensor([0.5, float("nan"), 0.2])], 1)
    with pytest.raises(DowserError, match="NaN or negative"):
        lowest_per_row(torch.tensor([[0.5, -0.1]]), 0.5, False)
    (m,) = lowest_k([torch.tensor([0.5, -0.0, 0.2, float("inf")])], 2)
    assert m.tolist() == [False, True, True, False]


def test_a_mask_whose_tensors_do_not_fit_its_metadata(llama_dir, tmp_path, capsys):
    model, _, _ = load_model(llama_dir)
    mask = Mask({Q: torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) < 0.1})
    path = mask.save(tmp_path / "m.safetensors")
    meta = json.loads(safe_open(path, "pt").metadata()["dowser"])
    meta["shapes"][Q] = [64, 65]
    rewrite(path, meta=meta)
    with pytest.raises(DowserError, match="corrupt"):
        Mask.load(path)
    one_line_error(["inspect", path], capsys, "corrupt")


# --- synthetic probing: sample counts --------------------------------------------------------


def test_huge_sample_counts_are_refused_at_once(llama_dir, tmp_path, capsys):
    model, tok = build_model("llama")
    with pytest.raises(DowserError, match="num_samples=1,000,000,000: use 1 to 1,000,000"):
        dowser.probe(model, tokenizer=tok, num_samples=10**9, progress=False)
    with pytest.raises(SystemExit) as e:
        main(["probe", str(llama_dir), "--out", str(tmp_path / "s"), "--num-samples", "1e9"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["probe", str(llama_dir), "--out", str(tmp_path / "s"), "--num-samples", "1000000000"])
    assert "more than 1,000,000" in capsys.readouterr().err


def test_synthetic_batches_are_made_while_probing(monkeypatch):
    """One generation chunk at a time, and the same scores as batches made up front (the
    model runs under the probe's hooks while a batch is generated: never counted)."""
    from dowser.probing import synthetic

    model, tok = build_model("llama")
    kwargs = dict(num_samples=20, batch_size=4, seq_len=6, seed=2, progress=False)
    calls = []
    real = synthetic._continue
    monkeypatch.setattr(
        synthetic, "_continue", lambda m, p, *a: calls.append(len(p)) or real(m, p, *a)
    )
    lazy = synthetic.synthetic_batches(model, tokenizer=tok, lazy=True, **kwargs)
    assert len(lazy) == 5 and calls == []
    first = next(iter(lazy))
    assert first["input_ids"].shape[0] == 4 and calls == [synthetic.GENERATION_CHUNK]
    upfront = synthetic.synthetic_batches(model, tokenizer=tok, **kwargs)
    a = dowser.probe(model, tokenizer=tok, num_probes=2, **kwargs)
    b = dowser.probe(model, batches=upfront, num_probes=2, seed=2, progress=False)
    for n in a.names:
        assert torch.equal(a.dense(n), b.dense(n)), n


# --- training data: bad images name their record -----------------------------------------------


@pytest.mark.parametrize("content", [b"not an image", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_an_unreadable_image_names_its_line(tmp_path, content):
    from dowser.train.data import SupervisedDataset, load_examples

    _, processor = build_model("llava")
    Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(content)
    lines = [{"image": "ok.png", "prompt": "a", "answer": "b"}] * 2
    lines.append({"image": "bad.png", "prompt": "a", "answer": "b"})
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    dataset = SupervisedDataset(load_examples(data), processor)
    for read in (lambda: dataset.check(progress=False), lambda: dataset[2]):
        with pytest.raises(DowserError, match=f"^{data}:3: cannot read image .*bad.png"):
            read()
