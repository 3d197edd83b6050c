"""The continual benchmark's Whisper sequence on a tiny Whisper built in code: the split topic
halves, every method through three speech tasks, frozen entries, the CLI's --model."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from forgetting_data import speech_env

from dowser.errors import DowserError
from dowser.forgetting import continual as C
from dowser.forgetting.speech import tasks as T
from dowser.forgetting.speech.continual import SPEECH_SEQUENCE, speech_subset


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual-speech")
    with speech_env(root, seed=3) as model_dir:
        yield model_dir


def tiny(model_dir, **changes) -> C.ContinualConfig:
    config = replace(
        C.CONTINUAL_PRESETS["whisper"],
        model_dir=str(model_dir),
        upstream_test=4,
        downstream_train=16,
        downstream_test=8,
        lrs=(3e-3,),
        seeds=(0,),
        last_layers=2,
        steps=2,
        batch_size=4,
        probe={"num_samples": 4, "batch_size": 2, "num_probes": 2, "seq_len": 8},
    )
    return replace(config, **changes)


@pytest.fixture(scope="module")
def prep(env):
    return C.prepare_continual(tiny(env), progress=False)


def test_topic_halves_split_the_categories():
    full = T.SpeechTask(
        "topic",
        "classify",
        T.TOPIC_PROMPT,
        T.SpeechSplit(
            list("abcdef"),
            [None] * 6,
            [f" w{c}" for c in (0, 5, 3, 7, 4, 1)],
            np.array([0, 5, 3, 7, 4, 1]),
        ),
        T.SpeechSplit(list("gh"), [None] * 2, [" w2", " w6"], np.array([2, 6])),
        tuple(f" w{i}" for i in range(8)),
    )
    low = speech_subset(full, (0, 1, 2, 3), "topic-a")
    high = speech_subset(full, (4, 5, 6, 7), "topic-b")
    assert low.candidates == (" w0", " w1", " w2", " w3")
    assert high.candidates == (" w4", " w5", " w6", " w7")
    assert low.test.texts == ["a", "c", "f"] and high.test.texts == ["b", "d", "e"]
    # every clip keeps its own answer: the renumbered label points at the same word
    for half in (low, high):
        for split in (half.test, half.train):
            words = [half.candidates[label] for label in split.labels]
            assert words == split.targets
    assert low.train.texts == ["g"] and high.train.texts == ["h"]


def test_every_method_runs_the_whisper_sequence(env, prep, tmp_path):
    assert list(prep.tests) == ["transcribe", *SPEECH_SEQUENCE]
    assert prep.downstream["topic-a"].candidates == (
        " act",
        " animal",
        " artifact",
        " communication",
    )
    out = tmp_path / "w"
    result = C.run_continual(tiny(env), out, prepared=prep, log=lambda *_: None)
    saved = json.loads((out / "results.json").read_text())
    assert saved["tasks"] == ["transcribe", *SPEECH_SEQUENCE] and saved["upstream"] == [
        "transcribe"
    ]
    by = {m["name"]: m for m in saved["methods"]}
    assert list(by) == list(C.CONTINUAL_METHODS) and len(result["methods"]) == 9
    for m in by.values():
        acc = np.array(m["accuracy"])
        assert acc.shape == (4, 4) and ((acc >= 0) & (acc <= 1)).all()
        assert m["accuracy"][0] == by["full-ft"]["accuracy"][0]
    # stage 0 is the base's own score on each task
    base = C.evaluate_all(prep.base, prep)
    assert by["full-ft"]["accuracy"][0] == [round(a, 4) for a in base]
    assert by["dowser-static"]["mask_reused"] == [0.0, 1.0, 1.0]
    assert by["dowser-reprobe-exclude"]["mask_reused"] == [0.0, 0.0, 0.0]


def test_masked_stage_moves_only_the_mask_with_the_speech_loss(prep, env):
    seq = C.Sequencer(tiny(env), prep)
    setting = seq.setting(1e-2, 0)
    mask = seq.base_mask(setting)
    assert any(".encoder_attn." in n for n in mask) and all(".decoder." in n for n in mask)
    before = {n: p.clone() for n, p in prep.base.named_parameters()}
    tuned, losses = seq.train(prep.base, mask, "phonemes", setting)
    assert len(losses) == 2 and all(np.isfinite(losses))
    params = dict(tuned.named_parameters())
    for n, m in mask.items():
        assert torch.equal(params[n][~m], before[n][~m])
        assert not torch.equal(params[n][m], before[n][m])
    # and what moved changes the speech scores
    assert C.evaluate_all(tuned, prep) != C.evaluate_all(prep.base, prep)


def test_whisper_sequence_errors(env):
    with pytest.raises(DowserError, match="once each"):
        C.prepare_continual(tiny(env, sequence=("topic-a", "digits-low")))
    with pytest.raises(DowserError, match="use llava or whisper-tiny-en"):
        C.prepare_continual(tiny(env, model="whisper-base"))


def test_cli_bench_continual_whisper(env, tmp_path, capsys, monkeypatch):
    from dowser.cli import main

    quick = tiny(env, methods=("full-ft", "dowser-reprobe"))
    monkeypatch.setitem(C.CONTINUAL_PRESETS, "whisper-quick", quick)
    out = tmp_path / "cw"
    argv = ["bench", "continual", "--model", "whisper-tiny-en", "--quick", "--out", str(out)]
    assert main([*argv, "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "| dowser-reprobe |" in stdout and "topic-a -> phonemes -> topic-b" in stdout
    assert json.loads((out / "results.json").read_text())["sequence"] == list(SPEECH_SEQUENCE)
