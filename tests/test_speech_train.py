"""Speech models through the whole pipeline: WAV reading, data-free probing of a Whisper (noise
audio + its own text), masks, `dowser train` on audio records, resume, deltas, user errors."""

from __future__ import annotations

import io
import json
import shutil
import wave

import numpy as np
import pytest
import torch
from test_cli import FAST, run

import dowser
from dowser.errors import DowserError
from dowser.hf import load_model
from dowser.tiny_whisper import build_whisper, build_whisper_checkpoint
from dowser.train.audio import decode_wav, load_audio
from dowser.train.speech import SpeechCollator, SpeechDataset, load_speech_examples, sequence

TRAIN = ["--epochs", "2", "--batch-size", "2", "--lr", "1e-2", "--weight-decay", "0.1", "--quiet"]


def wav_bytes(samples: np.ndarray, rate: int, width: int = 2, channels: int = 1) -> bytes:
    """A PCM WAV file of `samples` in [-1, 1] (repeated over `channels`)."""
    scale = 2 ** (8 * width - 1) - 1
    ints = np.round(np.repeat(samples[:, None], channels, 1) * scale).astype(np.int64)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    elif width == 3:
        raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints.reshape(-1))
    else:
        raw = ints.astype({2: np.int16, 4: np.int32}[width]).tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return buf.getvalue()


def tone(rate: int, seconds: float = 0.5, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_wav_of_every_pcm_width_and_channel_count_decodes(width):
    x = tone(8000)
    for channels in (1, 2):
        samples, rate = decode_wav(wav_bytes(x, 8000, width, channels), "t.wav")
        assert rate == 8000 and samples.shape == x.shape
        assert np.abs(samples - x).max() < 2.0 / 2 ** (8 * width - 1) + 1e-6


def test_float_wav_and_resampling(tmp_path):
    import scipy.io.wavfile

    x = tone(22050, 1.0)
    scipy.io.wavfile.write(tmp_path / "f.wav", 22050, x)
    y = load_audio(tmp_path / "f.wav", sampling_rate=16000)
    assert len(y) == 16000
    # still a 440 Hz tone: the strongest frequency of the resampled clip
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * 16000 / len(y) - 440) <= 2


def test_bad_audio_is_one_clear_error(tmp_path):
    (tmp_path / "not.wav").write_bytes(b"ID3\x03 an mp3 file")
    (tmp_path / "cut.wav").write_bytes(wav_bytes(tone(8000), 8000)[:30])
    (tmp_path / "empty.wav").write_bytes(wav_bytes(np.zeros(0, np.float32), 8000))
    for name, message in (
        ("not.wav", "not a WAV file"),
        ("cut.wav", "not a readable WAV"),
        ("empty.wav", "no audio samples"),
        ("missing.wav", "not found"),
    ):
        with pytest.raises(DowserError, match=message):
            load_audio(tmp_path / name, sampling_rate=16000)


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return build_whisper_checkpoint(tmp_path_factory.mktemp("whisper") / "tiny", seed=1)


@pytest.fixture(scope="module")
def speech_data(tmp_path_factory):
    """Six WAV clips (tones at 22.05 kHz, a rate the model does not use) and their records."""
    root = tmp_path_factory.mktemp("speech")
    (root / "clips").mkdir()
    rows = []
    for i in range(6):
        (root / "clips" / f"{i}.wav").write_bytes(wav_bytes(tone(22050, hz=300 + 100 * i), 22050))
        rows.append(
            {"audio": f"clips/{i}.wav", "text": f" the river ran {'low' if i % 2 else 'high'}"}
        )
    rows[0]["prompt"] = "Say it"
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_sequences_labels_and_batches(speech_data):
    _, processor = build_whisper(seed=1)
    tok = processor.tokenizer
    ids, start = sequence(tok, " the river", "Say it")
    assert ids[0] == tok.convert_tokens_to_ids("<|startofprev|>")
    assert ids[start - 2 : start] == tok.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|notimestamps|>"]
    )
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[start:-1]) == " the river"
    plain, start0 = sequence(tok, " the river")
    assert plain == tok(" the river").input_ids  # the tokenizer's own Whisper layout
    data = SpeechDataset(load_speech_examples(speech_data / "train.jsonl"), processor)
    data.check(progress=False)
    item = data[0]
    assert item["input_features"].shape == (16, 200)
    labels = item["labels"]
    kept = labels[labels != -100].tolist()
    assert kept == sequence(tok, " the river ran high", "Say it")[0][-len(kept) :]
    batch = SpeechCollator(pad_token_id=tok.eos_token_id)([data[0], data[1]])
    assert batch["decoder_input_ids"].shape == batch["labels"].shape
    assert batch["decoder_attention_mask"][1].sum() == len(data[1]["decoder_input_ids"])


def test_speech_records_are_checked_before_training(speech_data, tmp_path):
    cases = {
        "no_text": ({"audio": "clips/0.wav"}, '"text"'),
        "empty_text": ({"audio": "clips/0.wav", "text": "  "}, "text is empty"),
        "missing": ({"audio": "clips/nope.wav", "text": "hi"}, "not found"),
        "prompt": ({"audio": "clips/0.wav", "text": "hi", "prompt": 3}, '"prompt"'),
    }
    for name, (record, message) in cases.items():
        path = speech_data / f"{name}.jsonl"
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(DowserError, match=message):
            load_speech_examples(path)
    (speech_data / "clips" / "bad.wav").write_bytes(b"RIFF....WAVEjunk")
    path = speech_data / "bad.jsonl"
    path.write_text(json.dumps({"audio": "clips/bad.wav", "text": "hi"}) + "\n")
    _, processor = build_whisper(seed=1)
    data = SpeechDataset(load_speech_examples(path), processor)
    with pytest.raises(DowserError, match="bad.wav"):
        data.check(progress=False)


def test_probe_sees_noise_audio_and_seq_len_tokens_of_its_own_text(whisper_dir):
    from dowser.probing.synthetic import synthetic_batches

    model, _, processor = load_model(whisper_dir)
    batches = synthetic_batches(
        model, processor=processor, num_samples=6, batch_size=4, seq_len=12, progress=False
    )
    assert [len(b["decoder_input_ids"]) for b in batches] == [4, 2]
    sot, no_ts = processor.tokenizer.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|notimestamps|>"]
    )
    for b in batches:
        assert b["decoder_input_ids"].shape[1] == 12 and bool(b["decoder_attention_mask"].all())
        assert b["decoder_input_ids"][:, :2].tolist() == [[sot, no_ts]] * len(
            b["decoder_input_ids"]
        )
        assert b["input_features"].shape[1:] == (16, 200)
        # its own text: no special tokens after the start, no early <|endoftext|>
        assert bool((b["decoder_input_ids"][:, 2:] < processor.tokenizer.eos_token_id).all())
    again = synthetic_batches(
        model, processor=processor, num_samples=6, batch_size=4, seq_len=12, progress=False
    )
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, again, strict=True) for k in a)
    scores = dowser.probe(
        model, processor=processor, num_samples=4, batch_size=2, seq_len=10, progress=False
    )
    assert scores.meta["audio"] == "noise"
    assert {t.group for t in scores.targets.values()} == {"decoder"}
    assert any("encoder_attn.k_proj" in n for n in scores.names)  # cross-attention reads audio
    assert all(bool(scores.dense(n).gt(0).any()) for n in scores.names)
    both = dowser.probe(
        model,
        processor=processor,
        layers="decoder,encoder",
        num_samples=4,
        batch_size=2,
        seq_len=10,
        progress=False,
    )
    for name in scores.names:  # scoring the encoder too changes nothing for the decoder
        assert torch.equal(both.dense(name), scores.dense(name))
    with pytest.raises(DowserError, match="noise audio"):
        dowser.probe(model, processor=processor, images="noise", num_samples=2, progress=False)


@pytest.fixture(scope="module")
def whisper_mask(whisper_dir, tmp_path_factory):
    from dowser.cli import main

    root = tmp_path_factory.mktemp("mask")
    scores, mask = root / "s.safetensors", root / "m.safetensors"
    assert main(["probe", str(whisper_dir), "--out", str(scores), *FAST]) == 0
    assert (
        main(
            ["mask", str(scores), "--model", str(whisper_dir), "--ratio", "0.2", "--out", str(mask)]
        )
        == 0
    )
    return mask


def params(path):
    model, _, _ = load_model(path)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("optimizer", ["sparse-adamw", "masked-adamw"])
def test_train_on_audio_end_to_end(
    optimizer, whisper_dir, whisper_mask, speech_data, tmp_path, capsys
):
    out = tmp_path / "out"
    argv = ["train", whisper_dir, "--mask", whisper_mask, "--data", speech_data / "train.jsonl"]
    code, stdout, err = run(
        [*argv, "--out", out, *TRAIN, "--optimizer", optimizer, "--save-delta"], capsys
    )
    assert code == 0, err
    base, tuned = params(whisper_dir), params(out)
    mask = dowser.Mask.load(whisper_mask)
    for n, m in mask.items():
        assert torch.equal(tuned[n][~m], base[n][~m]), n  # frozen: bit-identical
    assert any(not torch.equal(tuned[n][m], base[n][m]) for n, m in mask.items())
    changed = {n for n in base if not torch.equal(base[n], tuned[n])} - set(mask)
    assert changed and all("layer_norm" in n and ".decoder.layers." in n for n in changed)
    assert (out / "processor_config.json").is_file()
    merged = tmp_path / "merged"
    assert (
        run(["apply-delta", whisper_dir, out / "delta.safetensors", "--out", merged], capsys)[0]
        == 0
    )
    again = params(merged)
    assert all(torch.equal(again[n], tuned[n]) for n in tuned)


def test_resume_on_audio_equals_uninterrupted(
    whisper_dir, whisper_mask, speech_data, tmp_path, capsys
):
    common = ["--mask", whisper_mask, "--data", speech_data / "train.jsonl", *TRAIN]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    for out in (straight, resumed):
        assert run(["train", whisper_dir, "--out", out, *common], capsys)[0] == 0
    (resumed / "model.safetensors").unlink()
    last = max(
        (resumed / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
    )
    shutil.rmtree(last)
    assert run(["train", whisper_dir, "--out", resumed, *common, "--resume"], capsys)[0] == 0
    a, b = params(straight), params(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_speech_user_errors_name_the_problem(
    whisper_dir, whisper_mask, speech_data, checkpoint_dirs, tmp_path, capsys
):
    (speech_data / "clips" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt junk")
    bad = speech_data / "broken.jsonl"
    bad.write_text(json.dumps({"audio": "clips/broken.wav", "text": "hi"}) + "\n")
    empty = speech_data / "emptytext.jsonl"
    empty.write_text(json.dumps({"audio": "clips/1.wav", "text": ""}) + "\n")
    missing = speech_data / "missing.jsonl"
    missing.write_text(json.dumps({"audio": "clips/none.wav", "text": "hi"}) + "\n")
    llama_mask = tmp_path / "llama.mask.safetensors"
    for data, message in (
        (bad, "broken.wav"),
        (empty, "text is empty"),
        (missing, "none.wav"),
    ):
        out = tmp_path / data.stem
        code, _, err = run(
            ["train", whisper_dir, "--mask", whisper_mask, "--data", data, "--out", out, *TRAIN],
            capsys,
        )
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() or not any(out.iterdir())
    # audio records for a text model, text records for a speech model
    scores = tmp_path / "llama.s.safetensors"
    assert run(["probe", checkpoint_dirs["llama"], "--out", scores, *FAST], capsys)[0] == 0
    assert (
        run(["mask", scores, "--model", checkpoint_dirs["llama"], "--out", llama_mask], capsys)[0]
        == 0
    )
    code, _, err = run(
        [
            "train",
            checkpoint_dirs["llama"],
            "--mask",
            llama_mask,
            "--data",
            speech_data / "train.jsonl",
            "--out",
            tmp_path / "x",
            *TRAIN,
        ],
        capsys,
    )
    assert code == 2 and "audio records" in err
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n")
    code, _, err = run(
        [
            "train",
            whisper_dir,
            "--mask",
            whisper_mask,
            "--data",
            text,
            "--out",
            tmp_path / "y",
            *TRAIN,
        ],
        capsys,
    )
    assert code == 2 and '"audio"' in err


def test_task_aware_mask_from_audio_data(whisper_dir, speech_data, tmp_path):
    from dowser.cli import main

    scores, mask = tmp_path / "s.safetensors", tmp_path / "m.safetensors"
    assert main(["probe", str(whisper_dir), "--out", str(scores), *FAST]) == 0
    argv = ["mask", str(scores), "--model", str(whisper_dir), "--out", str(mask)]
    argv += ["--task-data", str(speech_data / "train.jsonl"), "--task-examples", "4"]
    assert main(argv) == 0
    built = dowser.Mask.load(mask)
    assert built.meta["task_examples"] == 4 and built.meta["combine"] == "split"
    assert any("encoder_attn" in n for n in built)  # cross-attention is scored and masked
