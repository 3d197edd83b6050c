"""build_mask(exclude=...) / `dowser mask --exclude`: entries earlier masks trained never train
again, the count per group is unchanged, too few free entries are refused; and the second
stage of a continual run (scores probed on the fine-tuned checkpoint, base scores refused)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, token_batches

import dowser
from dowser import DowserError, Mask, Scores
from dowser.cli import main
from dowser.hf import load_model
from dowser.ranking import lowest_k, round_half_up
from dowser.tiny import build_checkpoint
from dowser.train.artifacts import save_merged

Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def probed():
    model = tiny_llama(layers=2)
    scores = dowser.probe(model, batches=token_batches(64), num_probes=2, progress=False)
    return model, scores


def random_mask(model, scores, seed: int, ratio: float) -> Mask:
    """A mask of about `ratio` of every scored matrix, drawn at random."""
    g = torch.Generator().manual_seed(seed)
    return Mask({n: torch.rand(scores.shapes[n], generator=g) < ratio for n in scores.names})


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_excluded_entries_never_train_and_counts_are_unchanged(probed, seed):
    """Property over random exclusions and ratios: disjoint from every excluded mask, the
    same count per matrix as without exclusion, and the lowest scores among the free."""
    model, scores = probed
    g = torch.Generator().manual_seed(seed)
    ratio = float(torch.empty(1).uniform_(0.05, 0.4, generator=g))
    earlier = [random_mask(model, scores, 10 * seed + i, 0.2) for i in range(2)]
    plain = dowser.build_mask(model, scores, update_ratio=ratio)
    mask = dowser.build_mask(model, scores, update_ratio=ratio, exclude=earlier)
    assert list(mask) == list(plain)
    for name, m in mask.items():
        frozen = earlier[0][name] | earlier[1][name]
        assert not (m & frozen).any(), name
        assert int(m.sum()) == int(plain[name].sum()) == round_half_up(ratio * m.numel())
        s, free_frozen = scores.dense(name), ~m & ~frozen
        assert s[m].max() <= s[free_frozen].min(), name  # the usual ranking among the free
    entries = mask.meta["exclude"]["entries"]
    assert entries[Q0] == int((earlier[0][Q0] | earlier[1][Q0]).sum())
    assert len(mask.meta["exclude"]["masks"]) == 2


def test_no_exclusion_is_the_plain_mask_and_exclusion_picks_the_next_lowest(probed):
    model, scores = probed
    first = dowser.build_mask(model, scores, update_ratio=0.1)
    assert all(
        torch.equal(m, first[n])
        for n, m in dowser.build_mask(model, scores, update_ratio=0.1, exclude=()).items()
    )
    second = dowser.build_mask(model, scores, update_ratio=0.1, exclude=[first])
    for name in first:  # the k after the lowest k: together the lowest 2k (same order)
        k = int(first[name].sum())
        (both,) = lowest_k([scores.dense(name)], 2 * k)
        assert torch.equal(first[name] | second[name], both), name


@pytest.mark.parametrize(
    "options",
    [
        {"scope": "row"},
        {"scope": "layer"},
        {"scope": "global"},
        {"structure": "row"},
        {"structure": "column"},
    ],
)
def test_every_scope_and_structure_respects_the_exclusion(probed, options):
    model, scores = probed
    first = dowser.build_mask(model, scores, update_ratio=0.2, **options)
    plain = dowser.build_mask(model, scores, update_ratio=0.2, **options)
    second = dowser.build_mask(model, scores, update_ratio=0.2, exclude=[first], **options)
    assert all(not (second[n] & first[n]).any() for n in first)
    assert second.num_trainable() == plain.num_trainable()
    if options.get("scope") == "row":  # the count holds per row
        assert torch.equal(second[Q0].sum(1), plain[Q0].sum(1))


def test_a_task_aware_mask_respects_the_exclusion(probed):
    model, scores = probed
    batches = [{**b, "labels": b["input_ids"]} for b in token_batches(64)]
    grads = dowser.task_gradients(model, batches)
    first = dowser.build_mask(model, scores, update_ratio=0.1)
    for combine in ("split", "ratio", "task"):
        kw = {"update_ratio": 0.1, "task_scores": grads, "combine": combine}
        second = dowser.build_mask(model, scores, exclude=[first], **kw)
        plain = dowser.build_mask(model, scores, **kw)
        assert all(not (second[n] & first[n]).any() for n in first), combine
        assert second.num_trainable() == plain.num_trainable()


def test_too_few_free_entries_are_refused_with_a_ratio_that_fits(probed):
    model, scores = probed
    half = dowser.build_mask(model, scores, update_ratio=0.5)
    with pytest.raises(DowserError) as e:
        dowser.build_mask(model, scores, update_ratio=0.6, exclude=[half])
    message = str(e.value)
    assert message.startswith(f"{Q0} (and 13 more matrices): update_ratio=0.6 trains")
    assert "use update_ratio <= 0.5" in message and "\n" not in message
    dowser.build_mask(model, scores, update_ratio=0.5, exclude=[half])  # exactly what is left
    lines = dowser.build_mask(model, scores, update_ratio=0.2)  # entries in nearly every row
    with pytest.raises(DowserError, match="trains 3 rows but the excluded masks leave only 0 "):
        dowser.build_mask(model, scores, update_ratio=0.2, structure="row", exclude=[lines])


def test_masks_of_other_models_are_refused_and_uncovered_weights_are_fine(probed):
    model, scores = probed
    wide = Mask({"model.embed_tokens.weight": torch.ones(96, 16, dtype=torch.bool)})  # vocab 96
    with pytest.raises(DowserError, match="excluded mask 1 of 1 was built for another model: 1"):
        dowser.build_mask(model, scores, exclude=[wide])
    with pytest.raises(DowserError, match="1 missing weights \\(model.layers.5"):
        dowser.build_mask(model, scores, exclude=[Mask({"model.layers.5.x": torch.ones(2) > 0})])
    with pytest.raises(DowserError, match="exclude takes masks"):
        dowser.build_mask(model, scores, exclude=["mask.safetensors"])
    # a mask over the MLP excludes nothing from an attention-only mask
    mlp = dowser.build_mask(model, scores, update_ratio=0.5, targets="mlp")
    attn = dowser.build_mask(model, scores, update_ratio=0.1, targets="attn", exclude=[mlp])
    plain = dowser.build_mask(model, scores, update_ratio=0.1, targets="attn")
    assert all(torch.equal(attn[n], plain[n]) for n in plain)
    assert attn.meta["exclude"]["entries"] == {}


def ft_checkpoint(base_dir, mask: Mask, out):
    """The base with every trainable entry of `mask` moved: a fine-tuned checkpoint."""
    model, tok, _ = load_model(base_dir)
    with torch.no_grad():
        for name, m in mask.items():
            model.get_parameter(name)[m] += 0.05
    save_merged(model, out, preprocessors=[tok], source_dir=base_dir)
    return model


def test_second_stage_of_a_continual_run(tmp_path, capsys):
    """Probe the base, build mask 1, fine-tune; probe the fine-tuned checkpoint and build mask
    2 from it excluding mask 1 (works), while the base's scores are refused on it."""
    base_dir = build_checkpoint("llama", tmp_path / "base")
    base, _, _ = load_model(base_dir)
    batches = token_batches(512)
    base_scores = dowser.probe(base, batches=batches, num_probes=2, progress=False)
    first = dowser.build_mask(base, base_scores, update_ratio=0.1)
    first.save(tmp_path / "m1.safetensors")
    base_scores.save(tmp_path / "s0.safetensors")
    tuned = ft_checkpoint(base_dir, first, tmp_path / "ft")
    ft_scores = dowser.probe(tuned, batches=batches, num_probes=2, progress=False)
    ft_scores.save(tmp_path / "s1.safetensors")

    out = tmp_path / "m2.safetensors"
    argv = ["mask", tmp_path / "s1.safetensors", "--model", tmp_path / "ft", "--out", out]
    assert main([str(a) for a in [*argv, "--exclude", tmp_path / "m1.safetensors"]]) == 0
    ft, _, _ = load_model(tmp_path / "ft")
    second = Mask.load(out, model=ft)  # fits the fine-tuned model, not the base
    assert all(not (second[n] & first[n]).any() for n in first)
    assert second.num_trainable() == first.num_trainable()
    assert second.meta["exclude"]["entries"][Q0] == int(first[Q0].sum())
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0  # says what it keeps frozen, and from which mask
    said = capsys.readouterr().out
    n = first.num_trainable()
    assert (
        f"excludes {n:,} entries trained by 1 mask ({second.meta['exclude']['masks'][0]})" in said
    )

    # the base's scores on the fine-tuned model: refused, saying which weights differ
    with pytest.raises(DowserError) as e:
        dowser.build_mask(ft, Scores.load(tmp_path / "s0.safetensors"))
    assert "probed on another model (14 weights with other values (model.layers.0" in str(e.value)
    argv[1] = tmp_path / "s0.safetensors"
    argv[-1] = tmp_path / "m3.safetensors"
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dowser mask: error: these scores do not fit this model: they were ")
    assert "a fine-tuned checkpoint needs its own scores" in err
    assert not (tmp_path / "m3.safetensors").exists()

    # --exclude with a missing file, or a file that is not a mask: one line, nothing written
    for bad, needle in [
        (tmp_path / "none.safetensors", "none.safetensors does not exist"),
        (tmp_path / "s1.safetensors", "holds 'scores' data, not mask"),
    ]:
        argv = ["mask", tmp_path / "s1.safetensors", "--model", tmp_path / "ft", "--out", out]
        assert main([str(a) for a in [*argv, "--overwrite", "--exclude", bad]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("dowser mask: error:") and needle in err[-1]
    assert Mask.load(out).meta == second.meta  # the earlier output is untouched
