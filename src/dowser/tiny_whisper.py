"""A tiny, randomly initialised Whisper (speech encoder + text decoder), built in code.

The same classes as a real Whisper checkpoint (`WhisperForConditionalGeneration`,
`WhisperProcessor` = feature extractor + `WhisperTokenizer`), shrunk so that tests run the
whole speech track in seconds: 2-second audio windows (200 log-mel frames, 100 encoder
positions), 16 mel bins, width 32, a byte-level BPE of about 400 entries trained on the
built-in corpus followed by Whisper's special tokens in Whisper's order.

    model, processor = build_whisper(seed=0)
    path = build_whisper_checkpoint("/tmp/tiny-whisper")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

SPECIALS = (  # Whisper's special tokens, in its order, right after the BPE vocabulary
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)
CHUNK_SECONDS = 2  # audio window: 2 s = 200 log-mel frames = 100 encoder positions
MEL_BINS = 16


def build_whisper_tokenizer(vocab_size: int = 400):
    """A WhisperTokenizer over a byte-level BPE trained on the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizer

    from dowser.tiny import _CORPUS

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS.split("\n\n"), trainer)
    bpe = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    return WhisperTokenizer(
        vocab=bpe["vocab"],
        merges=merges,
        extra_special_tokens=list(SPECIALS[1:]),
        pad_token=SPECIALS[0],
    )


def build_whisper(
    *,
    seed: int = 0,
    layers: int = 2,
    d_model: int = 32,
    heads: int = 4,
) -> tuple[torch.nn.Module, object]:
    """(model, processor): a tiny WhisperForConditionalGeneration in eval mode.

    `layers` encoder and decoder layers of width `d_model`; the same `seed` gives the same
    weights, and the global RNG state is untouched.
    """
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    tok = build_whisper_tokenizer()
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}
    frames = CHUNK_SECONDS * 100  # 10 ms hop
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=len(tok),
        num_mel_bins=MEL_BINS,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model,
        max_source_positions=frames // 2,  # the encoder's stride-2 convolution halves them
        max_target_positions=64,
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        is_multilingual=False,
        max_length=config.max_target_positions,
        suppress_tokens=[],
        begin_suppress_tokens=[eot],
    )
    features = WhisperFeatureExtractor(feature_size=MEL_BINS, chunk_length=CHUNK_SECONDS)
    return model.eval(), WhisperProcessor(feature_extractor=features, tokenizer=tok)


def build_whisper_checkpoint(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Save a tiny Whisper (weights, configs, processor) to `out_dir`; return the path."""
    model, processor = build_whisper(seed=seed)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
