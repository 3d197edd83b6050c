"""Speech tasks encoded once: decoder sequences that listen to cached encoder states.

    data = SpeechEncoded.build(tokenizer, task.train, task.prompt, states)
    loss = speech_loss(model, data.batch(rows))          # what the training loop minimises

A sequence is `dowser.train.speech.sequence` (prefix, target text, <|endoftext|>), so the
benchmark trains on exactly what `dowser train` would build from the same records. A batch
carries the clips' encoder outputs instead of audio ("encoder_outputs", ready for the model's
forward), or, for runs that also tune the last `tail` encoder layers, the input of those
layers ("encoder_inner", with "encoder_tail" = tail), which `encoder_outputs` runs through
them with gradients.

The loss is the mean cross-entropy over target tokens, as transformers' Whisper loss, but the
output projection (51,864 x 384 for Whisper) is applied to target positions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from dowser.forgetting.speech.model import EncoderStates, tail_forward
from dowser.forgetting.speech.tasks import SpeechSplit
from dowser.train.data import IGNORE
from dowser.train.speech import inputs_and_labels, sequence


@dataclass
class SpeechEncoded:
    """Decoder sequences with their target spans and the clip each one hears."""

    ids: list[torch.Tensor]  # n x (L_i,) prefix + target + <|endoftext|>
    start: torch.Tensor  # (n,) index of each sequence's first target token
    clip_of: torch.Tensor  # (n,) row of `audio` each sequence hears
    audio: EncoderStates
    pad_id: int
    tail: int = 0  # > 0: batches carry the input of the last `tail` encoder layers

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(
        cls, tokenizer, split: SpeechSplit, prompt: str | None, audio: EncoderStates
    ) -> SpeechEncoded:
        """One sequence per clip: its target after `prompt`."""
        seqs = [sequence(tokenizer, t, prompt) for t in split.targets]
        return cls(
            [torch.tensor(ids) for ids, _ in seqs],
            torch.tensor([s for _, s in seqs]),
            torch.arange(len(seqs)),
            audio,
            tokenizer.eos_token_id,
        )

    def with_candidates(self, tokenizer, candidates: Sequence[str], prompt: str | None):
        """Every clip with every candidate target, clip-major (n * C sequences)."""
        seqs = [sequence(tokenizer, c, prompt) for c in candidates]
        n = len(self.audio.states)
        return replace(
            self,
            ids=[torch.tensor(ids) for _ in range(n) for ids, _ in seqs],
            start=torch.tensor([s for _ in range(n) for _, s in seqs]),
            clip_of=torch.arange(n).repeat_interleave(len(seqs)),
        )

    def with_tail(self, tail: int) -> SpeechEncoded:
        """The same sequences, batched for runs that tune the last `tail` encoder layers."""
        if tail and (self.audio.inner is None or self.audio.tail != tail):
            raise ValueError(f"these states were kept for tail={self.audio.tail}, not {tail}")
        return replace(self, tail=tail)

    def batch(self, rows: Sequence[int] | torch.Tensor) -> dict:
        """Model inputs and labels for `rows` (right-padded with <|endoftext|>)."""
        rows = torch.as_tensor(rows).tolist()
        pairs = [inputs_and_labels(self.ids[r].tolist(), int(self.start[r])) for r in rows]
        width = max(len(x) for x, _ in pairs)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (x, y) in enumerate(pairs):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = x, y, 1
        clips = self.clip_of[rows]
        out = {"decoder_input_ids": ids, "decoder_attention_mask": mask, "labels": labels}
        return {**out, **self.audio_inputs(clips)}

    def audio_inputs(self, clips: torch.Tensor) -> dict:
        """What the decoder listens to for these clips: their encoder outputs, or (tuning the
        last `tail` encoder layers) those layers' input and how many they are."""
        if self.tail:
            return {"encoder_inner": self.audio.inner[clips].float(), "encoder_tail": self.tail}
        return {"encoder_outputs": (self.audio.states[clips].float(),)}


def _base(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def encoder_outputs(model: nn.Module, batch: dict) -> tuple[torch.Tensor]:
    """The batch's encoder outputs, running the tuned tail layers when it carries their input."""
    if "encoder_inner" in batch:
        return (tail_forward(_base(model), batch["encoder_inner"], batch["encoder_tail"]),)
    return batch["encoder_outputs"]


def decoder_states(model: nn.Module, batch: dict) -> torch.Tensor:
    """Decoder outputs before the output projection, (B, T, d)."""
    base = _base(model)
    out = base.model(
        encoder_outputs=encoder_outputs(model, batch),
        decoder_input_ids=batch["decoder_input_ids"],
        decoder_attention_mask=batch["decoder_attention_mask"],
    )
    return out.last_hidden_state


def target_logits(
    model: nn.Module, batch: dict, tail: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at target positions (N, V) float32, their labels (N,))."""
    keep = batch["labels"] != IGNORE
    hidden = decoder_states(model, batch)[keep]
    return _base(model).proj_out(hidden).float(), batch["labels"][keep]


def speech_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens."""
    logits, labels = target_logits(model, batch)
    return nn.functional.cross_entropy(logits, labels)


def speech_forward(model: nn.Module, batch: dict):
    """The model's outputs on a batch (for hooks that read activations)."""
    inputs = {
        k: v for k, v in batch.items() if k not in ("labels", "encoder_inner", "encoder_tail")
    }
    inputs["encoder_outputs"] = encoder_outputs(model, batch)
    return model(**inputs)
