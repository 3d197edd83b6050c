"""Mask baselines (random, magnitude, Wanda) and LoRA on the same matrices as Dowser."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, token_batches

import dowser
from dowser.baselines.lora import lora_config, tuned_modules
from dowser.baselines.masks import (
    magnitude_mask,
    magnitude_scores,
    random_mask,
    wanda_mask,
    wanda_scores,
)
from dowser.ranking import round_half_up


def test_magnitude_mask_trains_the_smallest_weights():
    model = tiny_llama(layers=3)
    mask = magnitude_mask(model, update_ratio=0.2, last_layers=2)
    params = dict(model.named_parameters())
    assert len(mask) == 14
    for name, m in mask.items():
        w = params[name].detach().abs()
        assert int(m.sum()) == round_half_up(0.2 * m.numel())
        assert w[m].max() <= w[~m].min()


def test_random_mask_is_seeded_exact_and_uncorrelated_with_magnitude():
    model = tiny_llama()
    a = random_mask(model, seed=1, update_ratio=0.3)
    b = random_mask(model, seed=1, update_ratio=0.3)
    c = random_mask(model, seed=2, update_ratio=0.3)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    for m in a.values():
        assert int(m.sum()) == round_half_up(0.3 * m.numel())
    mag = magnitude_mask(model, update_ratio=0.3)
    overlap = sum(int((a[n] & mag[n]).sum()) for n in a) / a.num_trainable()
    assert 0.15 < overlap < 0.45  # about 0.3 by chance, far from magnitude's own 1.0


def test_wanda_scores_are_weight_times_input_norm():
    model = tiny_llama()
    batches = token_batches(64)
    scores = wanda_scores(model, batches)
    seen = []
    module = model.model.layers[0].mlp.down_proj
    h = module.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    sq = sum(
        (x.pow(2) * b["attention_mask"][..., None]).sum((0, 1))
        for x, b in zip(seen, batches, strict=True)
    )
    n = sum(int(b["attention_mask"].sum()) for b in batches)
    expected = module.weight.detach().abs() * (sq / n).sqrt()[None, :]
    torch.testing.assert_close(scores.dense("model.layers.0.mlp.down_proj.weight"), expected)
    mask = wanda_mask(model, batches, update_ratio=0.1)
    assert mask.meta["estimator"] == "wanda" and len(mask) == 14


def test_magnitude_scores_equal_abs_weights():
    model = tiny_llama()
    s = magnitude_scores(model)
    w = dict(model.named_parameters())
    for n in s.names:
        assert torch.equal(s.dense(n), w[n].detach().abs())


def test_wanda_on_synthetic_batches():
    from dowser.probing.synthetic import synthetic_batches
    from dowser.tiny import build_model

    model, tok = build_model("llama")
    batches = synthetic_batches(
        model, tokenizer=tok, num_samples=4, batch_size=2, seq_len=8, progress=False
    )
    assert len(batches) == 2 and batches[0]["input_ids"].shape[0] == 2
    mask = wanda_mask(model, batches, update_ratio=0.1, targets="mlp")
    assert len(mask) == 6


def test_lora_adapts_the_same_matrices_as_the_mask():
    import peft

    model = tiny_llama(layers=3)
    mods = tuned_modules(model, targets="attn,mlp", last_layers=2)
    mask = magnitude_mask(model, last_layers=2)
    assert sorted(m + ".weight" for m in mods) == sorted(mask)
    wrapped = peft.get_peft_model(model, lora_config(model, last_layers=2, r=2))
    lora = {n for n, _ in wrapped.named_modules() if n.endswith("lora_A")}
    assert len(lora) == len(mods)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(dowser.DowserError, match="last_layers"):
        tuned_modules(model, last_layers=9)


def test_random_scores_are_not_saved(tmp_path):
    from dowser.baselines.masks import random_scores

    with pytest.raises(dowser.DowserError, match="not saved"):
        random_scores(tiny_llama(), seed=3).save(tmp_path / "r.safetensors")
    assert not (tmp_path / "r.safetensors").exists()
