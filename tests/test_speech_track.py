"""The forgetting benchmark's speech track on a tiny Whisper built in code: the tasks and their
splits, cached encoder states, batches, scoring, every method, the report, resume, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from forgetting_data import speech_env

from dowser.errors import DowserError
from dowser.forgetting.bench import BenchConfig, Runner, run_benchmark
from dowser.forgetting.methods import MASKED, METHODS, Setting, fine_tune
from dowser.forgetting.speech import tasks as T
from dowser.forgetting.speech.data import speech_loss, target_logits
from dowser.forgetting.speech.evaluate import candidate_logprobs, greedy_texts, token_accuracy
from dowser.forgetting.speech.model import EncoderStates, load_whisper, tail_forward
from dowser.forgetting.speech.synth import Voice, phonemes, speak
from dowser.forgetting.speech.track import prepare_speech
from dowser.train.speech import sequence


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech-track")
    with speech_env(root, seed=2) as model_dir:
        yield root, model_dir


def tiny_config(model_dir, **changes) -> BenchConfig:
    config = BenchConfig(
        model="whisper-tiny-en",
        model_dir=str(model_dir),
        downstream=("topic", "phonemes"),
        upstream_test=6,
        downstream_train=16,
        downstream_test=8,
        methods=METHODS,
        lrs=(3e-3,),
        seeds=(0,),
        last_layers=2,
        steps=3,
        batch_size=4,
        depths=(1,),
        depth_methods=("dowser",),
        ratios=(0.5,),
        ratio_methods=("random-mask",),
        sweep_tasks=("topic",),
        encoder_layers=1,
        encoder_methods=("full-ft", "lora", "random-mask", "dowser", "spider", "grafting"),
        probe={"num_samples": 4, "batch_size": 2, "num_probes": 2, "seq_len": 8},
    )
    return replace(config, **changes)


@pytest.fixture(scope="module")
def prep(env):
    return prepare_speech(tiny_config(env[1]), progress=False)


def test_espeak_speaks_16khz_and_phonemes_depend_on_the_accent():
    clip = speak("the cat sat on the mat", Voice("en-us", "m1", 150))
    assert clip.dtype == np.float32 and 0.5 < len(clip) / 16000 < 4 and np.abs(clip).max() > 0.05
    assert np.array_equal(clip, speak("the cat sat on the mat", Voice("en-us", "m1", 150)))
    assert len(speak("the cat sat on the mat", Voice("en-us", "m1", 200))) < len(clip)
    assert phonemes("water", "en-us") != phonemes("water", "en-gb")


def test_tasks_share_no_text_and_mix_voices(env):
    examples = T.wordnet_examples()
    up = T.transcribe(20, examples=examples)
    ph = T.phoneme_task(30, 10, examples=examples)
    topic = T.topic_task(32, 16)
    assert not set(up.test.texts) & set(ph.train.texts + ph.test.texts)
    assert not set(ph.train.texts) & set(ph.test.texts)
    assert not set(topic.train.texts) & set(topic.test.texts)
    assert all(t.startswith(" ") and t[1].isupper() and t.endswith(".") for t in up.test.targets)
    assert np.bincount(topic.test.labels).tolist() == [2] * 8  # balanced
    assert all(
        topic.test.targets[i] == topic.candidates[c] for i, c in enumerate(topic.test.labels)
    )
    assert (
        len({v.accent for v in up.test.voices}) == 4 and len({v.rate for v in ph.train.voices}) == 3
    )
    assert up.prompt is None and ph.prompt and topic.prompt
    with pytest.raises(DowserError, match="only"):
        T.transcribe(10**6, examples=examples)


def test_encoder_states_are_cached_and_match_the_encoder(env):
    model, processor = load_whisper(env[1])
    split = T.transcribe(5, examples=T.wordnet_examples()).test
    first = EncoderStates.compute(model, processor, split, tail=1, progress=False)
    files = list((env[0] / "cache" / "speech").glob("states-*.safetensors"))
    again = EncoderStates.compute(model, processor, split, tail=1, progress=False)
    assert torch.equal(first.states, again.states) and len(files) >= 1
    from dowser.forgetting.speech.synth import speak_all

    features = processor.feature_extractor(
        speak_all(split.texts, split.voices), sampling_rate=16000, return_tensors="pt"
    ).input_features
    with torch.no_grad():
        want = model.get_encoder()(features).last_hidden_state
        tail = tail_forward(model, first.inner.float(), 1)
    assert torch.allclose(first.states.float(), want, atol=2e-2, rtol=1e-2)  # float16 storage
    assert torch.allclose(tail, want, atol=2e-2, rtol=1e-2)


def test_batches_loss_and_scores_agree_with_plain_forwards(prep):
    model, tok = prep.base, prep.processor.tokenizer
    data = prep.train["topic"]
    batch = data.batch([0, 3, 5])
    with torch.no_grad():
        assert torch.allclose(speech_loss(model, batch), model(**batch).loss, atol=1e-5)
    # token accuracy: argmax of the full logits at the labelled positions
    test = prep.train["phonemes"]
    with torch.no_grad():
        rows = test.batch(range(len(test)))
        logits = model(**rows).logits
    keep = rows["labels"] != -100
    want = float((logits[keep].argmax(-1) == rows["labels"][keep]).float().mean())
    assert token_accuracy(model, test) == pytest.approx(want, abs=1e-6)
    # candidates: the cached-prompt path equals scoring each full sequence
    spec = prep.downstream["topic"]
    fast = candidate_logprobs(model, data, tok, spec.candidates, spec.prompt)
    every = data.with_candidates(tok, spec.candidates, spec.prompt)
    slow = torch.zeros(len(every))
    with torch.no_grad():
        for start in range(0, len(every), 32):
            rows = list(range(start, min(start + 32, len(every))))
            b = every.batch(rows)
            lg, lab = target_logits(model, b)
            lp = lg.log_softmax(-1).gather(1, lab[:, None]).squeeze(1)
            owner = (b["labels"] != -100).nonzero()[:, 0]
            slow[rows] = torch.zeros(len(rows)).index_add_(0, owner, lp)
    assert torch.allclose(fast, slow.view(fast.shape), atol=1e-4)
    # greedy output: a plain argmax loop (no <|endoftext|> first, as the generation config says)
    texts = greedy_texts(model, data, prep.processor, spec.prompt, max_new_tokens=5)
    head = torch.tensor(sequence(tok, "", spec.prompt)[0][:-1])
    want = []
    with torch.no_grad():
        for clip in range(len(data)):
            ids = head[None]
            states = (data.audio.states[clip : clip + 1].float(),)
            for step in range(5):
                logits = model(encoder_outputs=states, decoder_input_ids=ids).logits[0, -1]
                if step == 0:
                    logits[tok.eos_token_id] = -float("inf")
                nxt = int(logits.argmax())
                if nxt == tok.eos_token_id:
                    break
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
            want.append(tok.decode(ids[0, len(head) :], skip_special_tokens=True))
    assert texts == want


def test_encoder_phase_tunes_only_the_last_encoder_layers(prep):
    data = prep.train_data("topic", 1)
    base = {n: p.detach().clone() for n, p in prep.base.named_parameters()}
    for method in ("full-ft", "dowser", "lora"):
        setting = Setting(3e-2, 2, 0.1, 0, 3, 4, encoder_layers=1)
        model, losses = fine_tune(
            method, prep.base, data, setting, bank=prep.bank, task="topic", loss_fn=speech_loss
        )
        after = dict(model.named_parameters())
        changed = {n for n in base if not torch.equal(base[n], after[n])}
        assert any(n.startswith("model.encoder.layers.1.") for n in changed), method
        assert not any(
            n.startswith(("model.encoder.layers.0.", "model.encoder.conv")) for n in changed
        )
        assert len(losses) == 3 and all(np.isfinite(losses))


@pytest.mark.parametrize("method", [m for m in MASKED if m in METHODS])
def test_masked_methods_keep_frozen_entries_on_whisper(prep, method):
    from dowser.forgetting.methods import tuned_mask

    setting = Setting(1e-1, 2, 0.1, 0, 3, 4)
    data = prep.train_data("topic", 0)
    model, _ = fine_tune(
        method, prep.base, data, setting, bank=prep.bank, task="topic", loss_fn=speech_loss
    )
    scores = prep.bank.get(method, seed=0, task="topic", data=data)
    mask = tuned_mask(prep.base, setting, scores)
    tuned, base = dict(model.named_parameters()), dict(prep.base.named_parameters())
    for name, m in mask.items():
        assert torch.equal(tuned[name][~m], base[name][~m]), name
    assert any(not torch.equal(tuned[n][m], base[n][m]) for n, m in mask.items())


def test_benchmark_end_to_end_report_and_resume(env, prep, tmp_path):
    config = tiny_config(env[1])
    result = run_benchmark(config, tmp_path, prepared=prep, progress=False, log=lambda *_: None)
    rows = {m["name"]: m for m in result["methods"]}
    assert set(METHODS) <= set(rows)
    for m in rows.values():
        assert {"a_up", "a_down", "h_score", "wer"} <= set(m)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["upstream_tasks"] == ["transcribe"] and saved["test_sizes"]["topic"] == 8
    phases = {r["phase"] for r in saved["runs"]}
    assert phases == {"frontier", "depth", "ratio", "encoder"}
    assert all("cer" in r for r in saved["runs"] if r["task"] == "phonemes")
    enc = [r for r in saved["runs"] if r["phase"] == "encoder"]
    assert len(enc) == 6 and all(r["encoder_layers"] == 1 for r in enc)
    topic = saved["tasks"]["topic"]["methods"]
    assert topic["dowser"]["encoder"] and topic["dowser"]["encoder_frontier"]
    md = (tmp_path / "results.md").read_text()
    assert "WER" in md and "by encoder (E)" in md
    for plot in ("frontier-topic.png", "wer-topic.png", "frontier-encoder-topic.png"):
        assert (tmp_path / plot).is_file()
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    runner_calls = []
    original = Runner.execute
    Runner.execute = lambda self, run: runner_calls.append(run) or original(self, run)
    try:
        run_benchmark(
            config, tmp_path, resume=True, prepared=prep, progress=False, log=lambda *_: None
        )
    finally:
        Runner.execute = original
    assert runner_calls == [] and (tmp_path / "runs.jsonl").read_text().splitlines() == lines


def test_cli_speech_benchmark_errors(env, tmp_path, capsys, monkeypatch):
    from dowser.cli import main

    argv = ["bench", "forgetting", "--model", "whisper-tiny-en", "--out", str(tmp_path / "o")]
    assert main([*argv, "--preset", "demo"]) == 2
    assert "no 'demo' preset" in capsys.readouterr().err
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert main([*argv, "--quick"]) == 2
    err = capsys.readouterr().err
    assert "espeak-ng" in err and "apt-get install" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_runs_a_speech_preset(env, tmp_path, capsys, monkeypatch):
    from dowser.cli import main
    from dowser.forgetting.speech import track

    small = tiny_config(
        env[1],
        methods=("zero-shot", "full-ft", "random-mask", "dowser"),
        depth_methods=(),
        ratio_methods=(),
        encoder_methods=(),
        downstream=("topic",),
    )
    monkeypatch.setattr(track, "speech_presets", lambda: {"quick": small, "full": small})
    out = tmp_path / "q"
    assert (
        main(
            [
                "bench",
                "forgetting",
                "--model",
                "whisper-tiny-en",
                "--quick",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    result = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in result["methods"]]
    assert names == ["zero-shot", "full-ft", "random-mask", "dowser"]
    assert all(m["wer"] >= 0 for m in result["methods"])
    assert "WER" in capsys.readouterr().out
