"""Scores files: round trip, binding to the right model only, corrupt input."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, token_batches

import dowser
from dowser import DowserError, Scores


@pytest.fixture(scope="module")
def scored():
    model = tiny_llama()
    return model, dowser.probe(model, batches=token_batches(64), num_probes=2, progress=False)


def test_round_trip(scored, tmp_path):
    model, scores = scored
    path = scores.save(tmp_path / "s.safetensors")
    back = Scores.load(path, model=model)
    assert back.names == scores.names
    assert back.meta["estimator"] == "mean-abs" and back.meta["num_probes"] == 2
    for n in scores.names:
        assert torch.equal(back.dense(n), scores.dense(n))
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temp file left


def test_unbound_scores_need_a_model(scored, tmp_path):
    model, scores = scored
    back = Scores.load(scores.save(tmp_path / "s.safetensors"))
    with pytest.raises(DowserError, match="not bound"):
        back.dense(scores.names[0])
    w = dict(model.named_parameters())[scores.names[0]]
    torch.testing.assert_close(back.dense(scores.names[0], weight=w), scores.dense(scores.names[0]))


def test_other_model_is_refused(scored, tmp_path):
    _, scores = scored
    path = scores.save(tmp_path / "s.safetensors")
    with pytest.raises(DowserError, match="do not fit this model.*other values"):
        Scores.load(path, model=tiny_llama(seed=3))
    with pytest.raises(DowserError, match="missing weights"):
        Scores.load(path, model=tiny_llama(layers=1))


def test_same_weights_in_bfloat16_still_fit(scored, tmp_path):
    model, scores = scored
    path = scores.save(tmp_path / "s.safetensors")
    half = tiny_llama().to(torch.bfloat16)
    back = Scores.load(path, model=half)  # fingerprints round to bf16
    weights = dict(half.named_parameters())
    for n in scores.names:  # bound to the bf16 weights: S = |W_bf16| * the same factor
        expected = weights[n].detach().abs().float() * scores.outer(n)
        assert torch.equal(back.dense(n), expected), n
        torch.testing.assert_close(back.dense(n), scores.dense(n), rtol=2**-8, atol=0)


def test_bad_files(scored, tmp_path):
    model, scores = scored
    with pytest.raises(DowserError, match="does not exist"):
        Scores.load(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DowserError, match="not a readable safetensors"):
        Scores.load(junk)
    mask_path = dowser.build_mask(model, scores).save(tmp_path / "m.safetensors")
    with pytest.raises(DowserError, match="holds 'mask' data, not scores"):
        Scores.load(mask_path)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(DowserError, match="not one written by dowser"):
        Scores.load(foreign)


def test_existing_file_is_not_overwritten(scored, tmp_path):
    _, scores = scored
    path = tmp_path / "s.safetensors"
    path.write_text("precious")
    with pytest.raises(DowserError, match="already exists"):
        scores.save(path)
    assert path.read_text() == "precious"
    scores.save(path, overwrite=True)
    assert Scores.load(path).names == scores.names
