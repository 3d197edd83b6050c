"""Scores of a speech model on encoded tasks: token accuracy, candidate accuracy, greedy text.

    token_accuracy(model, data)            teacher-forced: the fraction of target tokens
                                           (closing <|endoftext|> included) that are the
                                           model's most probable next token
    candidate_accuracy(model, data, ...)   the candidate target with the highest
                                           log p(candidate + <|endoftext|> | prompt, audio)
    greedy_texts(model, data, prompt)      free-running output (Whisper's generate: its
                                           suppressed tokens, greedy), decoded to text

Candidates share the clip and the prompt, so each clip's prompt is run once with a cache
(cross-attention keys and values over 1,500 audio positions are the expensive part) that
every candidate's tokens continue from.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from dowser.forgetting.speech.data import SpeechEncoded, _base, encoder_outputs, target_logits
from dowser.train.speech import prefix

BATCH = 32  # clips per forward pass


@torch.no_grad()
def token_accuracy(model: nn.Module, data: SpeechEncoded) -> float:
    """Teacher-forced accuracy over all target tokens of `data` (micro average)."""
    right = total = 0
    for start in range(0, len(data), BATCH):
        logits, labels = target_logits(
            model, data.batch(range(start, min(start + BATCH, len(data))))
        )
        right += int((logits.argmax(1) == labels).sum())
        total += len(labels)
    return right / total


@torch.no_grad()
def candidate_logprobs(
    model: nn.Module, data: SpeechEncoded, tokenizer, candidates: Sequence[str], prompt: str | None
) -> torch.Tensor:
    """(clips, C) log p(candidate tokens + <|endoftext|> | prompt, clip) for every clip of
    `data`'s audio (one row per clip, in order).

    The prompt runs once per clip; each candidate then continues from a copy of its
    self-attention cache, sharing the cross-attention cache (keys and values over the audio).
    """
    from transformers import EncoderDecoderCache

    base = _base(model)
    head = torch.tensor(prefix(tokenizer, prompt))
    eot = tokenizer.eos_token_id
    cands = [tokenizer(c, add_special_tokens=False)["input_ids"] + [eot] for c in candidates]
    n_clips = len(data.audio.states)
    out = torch.empty(n_clips, len(cands))
    for start in range(0, n_clips, BATCH):
        clips = torch.arange(start, min(start + BATCH, n_clips))
        enc = encoder_outputs(model, data.audio_inputs(clips))
        step = base(
            encoder_outputs=enc, decoder_input_ids=head.repeat(len(clips), 1), use_cache=True
        )
        first = step.logits[:, -1].float().log_softmax(-1)  # (b, V)
        for j, c in enumerate(cands):
            score = first[:, c[0]]
            if len(c) > 1:  # the candidate's tokens predict its next ones and <|endoftext|>
                cache = EncoderDecoderCache(
                    copy.deepcopy(step.cache.self_attention_cache), step.cache.cross_attention_cache
                )
                logits = (
                    base(
                        encoder_outputs=enc,
                        decoder_input_ids=torch.tensor(c[:-1]).repeat(len(clips), 1),
                        cache=cache,
                        use_cache=True,
                    )
                    .logits.float()
                    .log_softmax(-1)
                )
                score = score + logits.gather(
                    2, torch.tensor(c[1:]).repeat(len(clips), 1)[..., None]
                ).sum((1, 2))
            out[clips, j] = score
    return out


def candidate_accuracy(
    model: nn.Module,
    data: SpeechEncoded,
    tokenizer,
    candidates: Sequence[str],
    prompt: str | None,
    labels: np.ndarray,
) -> float:
    """Fraction of clips whose most probable candidate is `candidates[label]`."""
    logp = candidate_logprobs(model, data, tokenizer, candidates, prompt)
    return float((logp.argmax(1).numpy() == labels).mean())


@torch.no_grad()
def greedy_texts(
    model: nn.Module,
    data: SpeechEncoded,
    processor,
    prompt: str | None,
    *,
    max_new_tokens: int = 40,
) -> list[str]:
    """Each clip's greedy output (Whisper's generate with its generation config), as text."""
    from transformers.modeling_outputs import BaseModelOutput

    tok = processor.tokenizer
    prompt_ids = torch.tensor(prefix(tok, prompt)[:-2]) if prompt else None
    room = _base(model).config.max_target_positions - len(prefix(tok, prompt))
    max_new_tokens = min(max_new_tokens, room)
    texts = []
    n = len(data.audio.states)
    for start in range(0, n, BATCH):
        clips = torch.arange(start, min(start + BATCH, n))
        states = encoder_outputs(model, data.audio_inputs(clips))[0]
        kwargs = {"prompt_ids": prompt_ids} if prompt_ids is not None else {}
        with _quiet_transformers():  # its notes on max_length and masks, once per batch
            ids = model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=states),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                **kwargs,
            )
        texts += tok.batch_decode(ids, skip_special_tokens=True)
    return texts


@contextmanager
def _quiet_transformers():
    """transformers' log at error level only, for the duration."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
