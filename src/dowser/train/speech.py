"""Speech fine-tuning data for encoder-decoder speech models (Whisper): audio in, text out.

JSON Lines, one record per line: {"audio": "clips/1.wav", "text": "what is said"}, with an
optional "prompt" (text given to the decoder as Whisper's previous-text context, e.g. an
instruction; it carries no loss). Audio paths are relative to the data file; any sampling rate
(resampled to the feature extractor's). Records are checked when the file is read (fields,
files exist, text not empty); `SpeechDataset.check()` then decodes every clip and measures
every text, so a bad record stops the run before training starts.

The decoder sequence is Whisper's:

    [<|startofprev|> prompt]  <|startoftranscript|> <|notimestamps|>  text  <|endoftext|>

(English-only models; `prefix` gives the tokens before the text). Labels follow transformers'
Whisper convention: aligned with the logits (position t predicts token t + 1, no shift inside
the model), -100 everywhere except on the text and the closing <|endoftext|>.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dowser.errors import DowserError
from dowser.train.audio import load_audio
from dowser.train.data import IGNORE, existing_file

SOT, NO_TIMESTAMPS, PREV = "<|startoftranscript|>", "<|notimestamps|>", "<|startofprev|>"


def is_speech_processor(processor: Any) -> bool:
    """A speech model's processor: a feature extractor and a tokenizer (Whisper's)."""
    return hasattr(processor, "feature_extractor") and hasattr(processor, "tokenizer")


def prefix(tokenizer: Any, prompt: str | None = None) -> list[int]:
    """Decoder tokens before the text: [prev, prompt...] + <|startoftranscript|> <|notimestamps|>."""
    ids = tokenizer.convert_tokens_to_ids([SOT, NO_TIMESTAMPS])
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        raise DowserError("the tokenizer has no Whisper start tokens: is this a Whisper model?")
    if not prompt:
        return ids
    context = tokenizer(" " + prompt.strip(), add_special_tokens=False)["input_ids"]
    return [tokenizer.convert_tokens_to_ids(PREV), *context, *ids]


def sequence(tokenizer: Any, text: str, prompt: str | None = None) -> tuple[list[int], int]:
    """(decoder token ids, index of the first text token) for `text` after `prompt`."""
    head = prefix(tokenizer, prompt)
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [*head, *body, tokenizer.eos_token_id], len(head)


def inputs_and_labels(ids: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """decoder_input_ids = ids[:-1]; labels[t] = ids[t + 1] from the text on, else -100."""
    seq = torch.tensor(ids, dtype=torch.long)
    labels = seq[1:].clone()
    labels[: start - 1] = IGNORE
    return seq[:-1], labels


def is_speech_data(path: str | Path) -> bool:
    """True when the data file's first record has an "audio" field (JSON Lines)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    return isinstance(record, dict) and "audio" in record
    except (OSError, ValueError, RecursionError):
        return False  # the record loaders report what is wrong with the file
    return False


@dataclass
class SpeechExample:
    """One record: a clip (file or samples at the feature extractor's rate) and its text."""

    audio: Path | np.ndarray
    text: str
    prompt: str | None = None
    where: str = ""  # "file:line" for error messages


def load_speech_examples(path: str | Path) -> list[SpeechExample]:
    """Read and check every record of a speech JSON Lines file (see module doc)."""
    path = Path(path)
    if not path.is_file():
        raise DowserError(f"data file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DowserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    examples = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
            raise DowserError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise DowserError(f"{where}: a record must be a JSON object")
        for key in ("audio", "text"):
            if not isinstance(rec.get(key), str):
                raise DowserError(
                    f'{where}: a speech record needs "{key}" as a string ({{"audio": "clip.wav",'
                    ' "text": "..."}})'
                )
        if not rec["text"].strip():
            raise DowserError(f"{where}: the text is empty")
        prompt = rec.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise DowserError(f'{where}: "prompt" must be a string')
        audio = existing_file(path.parent, rec["audio"], "audio", where)
        examples.append(SpeechExample(audio, rec["text"], prompt, where))
    if not examples:
        raise DowserError(f"{path} holds no records")
    return examples


class SpeechDataset(Dataset):
    """Examples encoded for a Whisper model: input_features, decoder_input_ids, labels."""

    def __init__(self, examples: list[SpeechExample], processor: Any, *, max_length: int = 448):
        if not is_speech_processor(processor):
            raise DowserError("speech data needs the model's processor (feature extractor)")
        self.examples = examples
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.features = processor.feature_extractor
        self.max_length = max_length  # decoder tokens (Whisper: max_target_positions)

    def __len__(self) -> int:
        return len(self.examples)

    def _audio(self, ex: SpeechExample) -> np.ndarray:
        rate = self.features.sampling_rate
        if isinstance(ex.audio, np.ndarray):
            return ex.audio
        try:
            samples = load_audio(ex.audio, sampling_rate=rate)
        except DowserError as e:  # name the record too, not only the clip
            raise DowserError(f"{ex.where}: {e}") from None
        if len(samples) > self.features.n_samples:
            raise DowserError(
                f"{ex.where}: the clip is {len(samples) / rate:.1f} s, longer than the model's "
                f"{self.features.n_samples / rate:.0f} s window; cut it into shorter clips"
            )
        return samples

    def check(self, *, progress: bool = True) -> None:
        """Decode every clip and measure every text before training starts."""
        from tqdm.auto import tqdm

        for ex in tqdm(self.examples, desc="checking data", disable=not progress, leave=False):
            self._audio(ex)
            self._sequence(ex)

    def _sequence(self, ex: SpeechExample) -> tuple[list[int], int]:
        ids, start = sequence(self.tokenizer, ex.text, ex.prompt)
        if len(ids) - 1 > self.max_length:
            raise DowserError(
                f"{ex.where}: the text and prompt are {len(ids) - 1} tokens, more than the "
                f"decoder's {self.max_length}; shorten the record"
            )
        return ids, start

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ex = self.examples[i]
        features = self.features(
            self._audio(ex), sampling_rate=self.features.sampling_rate, return_tensors="pt"
        ).input_features[0]
        inputs, labels = inputs_and_labels(*self._sequence(ex))
        return {"input_features": features, "decoder_input_ids": inputs, "labels": labels}


@dataclass
class SpeechCollator:
    """Stacks features; right-pads decoder ids (with `pad_token_id`) and labels (-100)."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(it["decoder_input_ids"]) for it in items)

        def pad(t: torch.Tensor, fill: int) -> torch.Tensor:
            return torch.cat([t, t.new_full((width - len(t),), fill)])

        return {
            "input_features": torch.stack([it["input_features"] for it in items]),
            "decoder_input_ids": torch.stack(
                [pad(it["decoder_input_ids"], self.pad_token_id) for it in items]
            ),
            "decoder_attention_mask": torch.stack(
                [pad(torch.ones_like(it["decoder_input_ids"]), 0) for it in items]
            ),
            "labels": torch.stack([pad(it["labels"], IGNORE) for it in items]),
        }
