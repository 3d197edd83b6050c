"""Self-generated probing inputs for encoder-decoder speech models (Whisper), without data.

Each sample is a noise clip and text the model writes for it:

- audio: Gaussian white noise filling the model's whole audio window (30 s for Whisper) at a
  level drawn per sample between -40 and -10 dB of full scale, turned into log-mel features
  by the model's own feature extractor, as real audio would be;
- text: the decoder's start tokens (Whisper: <|startoftranscript|> <|notimestamps|>), then
  1..5 uniformly random ordinary tokens, continued by the model's own sampling (temperature
  0.9, top-p 0.9, repetition penalty 1.05, as for decoder-only models) to exactly `seq_len`
  decoder tokens. On noise Whisper ends its text after about one token, so <|endoftext|> is
  held back until `seq_len` is reached: otherwise the probe would see two or three tokens of
  text per sample instead of `seq_len`.

Batches hold `input_features` (B, mel bins, frames) and the right-padded
`decoder_input_ids` / `decoder_attention_mask`, so the probe's "last position" is each
sample's last decoder token.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from dowser.errors import DowserError
from dowser.probing.synthetic import (
    GENERATION_CHUNK,
    MAX_PROMPT,
    MIN_PROMPT,
    SAMPLING,
    Sample,
    _pad,
    _vocabulary,
    to_model,
)

NOISE_DB = (-40.0, -10.0)  # white-noise level range, dB of full scale (RMS)


def is_speech_model(model: nn.Module, processor) -> bool:
    """An encoder-decoder model whose processor turns audio into features (Whisper)."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False)) and hasattr(
        processor, "feature_extractor"
    )


def _start_tokens(model: nn.Module, tok) -> list[int]:
    """The decoder's fixed start: <|startoftranscript|> (+ <|notimestamps|>) for Whisper."""
    gen = getattr(model, "generation_config", None)
    start = getattr(gen, "decoder_start_token_id", None)
    if start is None:
        start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        raise DowserError("the model has no decoder_start_token_id to start its text from")
    no_timestamps = getattr(gen, "no_timestamps_token_id", None)
    return [start] + ([no_timestamps] if no_timestamps is not None else [])


def noise_features(processor, generator: torch.Generator) -> torch.Tensor:
    """(1, mel bins, frames) log-mel features of one white-noise clip (see module doc)."""
    extractor = processor.feature_extractor
    db = NOISE_DB[0] + (NOISE_DB[1] - NOISE_DB[0]) * float(torch.rand(1, generator=generator))
    level = math.sqrt(2) * 10 ** (db / 20)  # RMS -> the std of the noise samples
    audio = torch.randn(extractor.n_samples, generator=generator) * level / math.sqrt(2)
    return extractor(
        audio.numpy(), sampling_rate=extractor.sampling_rate, return_tensors="pt"
    ).input_features


def speech_samples(
    model: nn.Module,
    *,
    processor,
    num_samples: int,
    seq_len: int,
    generator: torch.Generator,
    device: torch.device,
    progress: bool = True,
) -> tuple[list[Sample], int]:
    """`num_samples` noise clips with the decoder's own text; returns them and the pad id."""
    if seq_len < 4:
        raise DowserError(f"seq_len={seq_len}: need at least 4 decoder tokens")
    tok = processor.tokenizer
    allowed, special, _, eos, pad = _vocabulary(model, tok)
    start = _start_tokens(model, tok)
    n_rows = model.get_output_embeddings().weight.shape[0]
    # never sampled: special tokens, ids past the tokenizer (Whisper's timestamps are added
    # tokens, so they are special here too); <|endoftext|> only until seq_len (min_new_tokens)
    suppress = [i for i in special if i != eos] + list(range(len(tok), n_rows))
    prompts = []
    for _ in range(num_samples):
        k = int(torch.randint(MIN_PROMPT, MAX_PROMPT + 1, (1,), generator=generator))
        pick = allowed[torch.randint(len(allowed), (k,), generator=generator)].tolist()
        ids = (start + pick)[:seq_len]
        prompts.append(Sample(ids, {}, {"input_features": noise_features(processor, generator)}))
    # prompts of one length generate together, so no decoder input is padded
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p.ids), []).append(i)
    chunks = [
        rows[j : j + GENERATION_CHUNK]
        for _, rows in sorted(groups.items())
        for j in range(0, len(rows), GENERATION_CHUNK)
    ]
    samples: list[Sample | None] = [None] * num_samples
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # generate() samples from the global RNG
        for rows in tqdm(chunks, desc="generating probes", disable=not progress, leave=False):
            done = _continue(model, [prompts[i] for i in rows], seq_len, pad, eos, suppress, device)
            for i, sample in zip(rows, done, strict=True):
                samples[i] = sample
    return samples, pad


@torch.no_grad()
def _continue(model, prompts: list[Sample], seq_len: int, pad, eos, suppress, device):
    """Sample the continuations of equally long prompts to exactly seq_len tokens (no early
    <|endoftext|>)."""
    from transformers import GenerationConfig
    from transformers.generation import GenerationMixin

    width = len(prompts[0].ids)
    need = seq_len - width
    if need <= 0:
        return prompts
    batch = to_model(_pad(prompts, width, pad=pad, left=False), model, device)
    config = GenerationConfig(  # lengths count the decoder's tokens, prompt included
        **SAMPLING,
        max_length=seq_len,
        min_length=seq_len,
        pad_token_id=pad,
        eos_token_id=eos,
        decoder_start_token_id=prompts[0].ids[0],
        suppress_tokens=suppress or None,
    )
    # transformers' generic generate: Whisper's own adds its timestamp and prompt logic
    features = batch["input_features"]  # (B, mel bins, frames)
    out = GenerationMixin.generate(
        model,
        input_features=features,
        # every frame is real audio; said outright, generate() does not guess it from pad ==
        # eos (and warn): Whisper's encoder reads the whole window anyway
        attention_mask=torch.ones(
            features.shape[0], features.shape[-1], dtype=torch.long, device=features.device
        ),
        decoder_input_ids=batch["input_ids"],
        generation_config=config,
    )
    result = []
    for p, gen in zip(prompts, out[:, width:].tolist(), strict=True):
        result.append(Sample(p.ids + gen[:need], {}, p.image))
    return result


def speech_batches(samples: list[Sample], batch_size: int, pad: int) -> list[dict]:
    """Right-padded decoder inputs with each sample's features, `batch_size` at a time."""
    out = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        b = _pad(chunk, max(len(s.ids) for s in chunk), pad=pad, left=False)
        out.append(
            {
                "input_features": b["input_features"],
                "decoder_input_ids": b["input_ids"],
                "decoder_attention_mask": b["attention_mask"],
            }
        )
    return out
