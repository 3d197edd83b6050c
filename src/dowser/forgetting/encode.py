"""Tasks encoded once into token ids and pixel tensors, then batched for any number of runs.

A benchmark trains and evaluates dozens of models on the same examples, so the processor runs
once per task, in bulk: the images go through the image processor as one batch, the texts
through the tokenizer as one batch. The text layout is `dowser.train.data.SupervisedDataset`'s
for a model without a chat template,

    <bos> <image tokens> prompt "\n" answer <eos>

with loss on the answer and <eos> only, and `encode` checks on its first examples that it gives
exactly the ids SupervisedDataset gives (a different processor would be caught there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dowser.errors import DowserError
from dowser.train.data import IGNORE, Example, SupervisedDataset

CHECKED = 4  # examples compared with SupervisedDataset per encoding


@dataclass
class Encoded:
    """Sequences with their answer spans; image sequences point into a shared pixel tensor."""

    input_ids: list[torch.Tensor]  # n x (L_i,) int64
    answer_start: torch.Tensor  # (n,) first answer position of each sequence
    image_of: torch.Tensor  # (n,) row of `pixel_values` each sequence shows, -1 for none
    pixel_values: torch.Tensor | None  # (num_images, 3, S, S) float32
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, rows: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """The model inputs for `rows`: right-padded ids, attention mask, labels, pixels."""
        rows = torch.as_tensor(rows).tolist()
        width = max(len(self.input_ids[r]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            seq, start = self.input_ids[r], int(self.answer_start[r])
            ids[i, : len(seq)] = seq
            labels[i, start : len(seq)] = seq[start:]
            attention[i, : len(seq)] = 1
        out = {"input_ids": ids, "attention_mask": attention, "labels": labels}
        images = self.image_of[rows]
        if (images >= 0).any():
            out["pixel_values"] = self.pixel_values[images[images >= 0]]
        return out

    @staticmethod
    def cat(parts: Sequence[Encoded]) -> Encoded:
        """One encoding holding every sequence of `parts`, in order."""
        pixels = [p.pixel_values for p in parts if p.pixel_values is not None]
        offset, image_of = 0, []
        for p in parts:
            image_of.append(torch.where(p.image_of >= 0, p.image_of + offset, -1))
            offset += 0 if p.pixel_values is None else len(p.pixel_values)
        return Encoded(
            [s for p in parts for s in p.input_ids],
            torch.cat([p.answer_start for p in parts]),
            torch.cat(image_of),
            torch.cat(pixels) if pixels else None,
            parts[0].pad_id,
        )


def to_pil(images: np.ndarray) -> list:
    """(N, H, W) uint8 grey images as RGB PIL images."""
    from PIL import Image

    return [Image.fromarray(im).convert("RGB") for im in images]


def encode(
    processor: Any,
    prompts: Sequence[str],
    answers: Sequence[Sequence[str]],
    images: np.ndarray | None = None,
) -> Encoded:
    """Encode example i with each answer in `answers[i]` (one sequence per pair, in order).

    `images` (N, H, W) uint8 gives example i an image, shown before its prompt.
    """
    tok = getattr(processor, "tokenizer", processor)
    if getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None):
        raise DowserError("the benchmark's encoder expects a model without a chat template")
    pixel_values, image_text = None, ""
    if images is not None:
        pil = to_pil(images)
        pixel_values = torch.cat(
            [
                processor.image_processor(images=pil[i : i + 1024], return_tensors="pt")[
                    "pixel_values"
                ]
                for i in range(0, len(pil), 1024)
            ]
        )
        probe = processor(text=[processor.image_token], images=pil[:1], return_tensors="pt")
        n_image = int(
            (probe["input_ids"] == tok.convert_tokens_to_ids(processor.image_token)).sum()
        )
        image_text = processor.image_token * n_image
    eos = tok.eos_token or ""
    prefixes = [f"{image_text}{p}\n" for p in prompts]
    prefix_ids = tok(prefixes)["input_ids"]
    fulls = [
        f"{prefix}{a}{eos}" for prefix, group in zip(prefixes, answers, strict=True) for a in group
    ]
    full_ids = tok(fulls)["input_ids"]
    seqs, starts, image_of = [], [], []
    k = 0
    for i, group in enumerate(answers):
        p = prefix_ids[i]
        for _ in group:
            ids = full_ids[k]
            k += 1
            if ids[: len(p)] != p:
                raise DowserError(f"example {i}: the answer merges with the prompt's last token")
            seqs.append(torch.tensor(ids, dtype=torch.long))
            starts.append(len(p))
            image_of.append(i if images is not None else -1)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    enc = Encoded(seqs, torch.tensor(starts), torch.tensor(image_of), pixel_values, pad)
    _check(processor, prompts, answers, images, enc)
    return enc


def _check(processor, prompts, answers, images, enc: Encoded) -> None:
    """The first sequences must match SupervisedDataset's ids and labels exactly."""
    pil = to_pil(images[:CHECKED]) if images is not None else [None] * CHECKED
    examples = [
        Example([(prompts[i], answers[i][0])], pil[i]) for i in range(min(CHECKED, len(prompts)))
    ]
    rows = np.cumsum([0] + [len(a) for a in answers])[: len(examples)]
    data = SupervisedDataset(examples, processor)
    for i, r in enumerate(rows):
        want = data[i]
        got = enc.batch([int(r)])
        if not (
            torch.equal(want["input_ids"], got["input_ids"][0])
            and torch.equal(want["labels"], got["labels"][0])
        ):
            raise DowserError(
                "the benchmark's fast encoding differs from dowser.train.data for this processor"
            )
        if "pixel_values" in want and not torch.allclose(
            want["pixel_values"], got["pixel_values"], atol=1e-6
        ):
            raise DowserError("the benchmark's image encoding differs from the processor's")


@torch.no_grad()
def sequence_logprobs(model: nn.Module, enc: Encoded, *, batch_size: int = 128) -> torch.Tensor:
    """(n,) log p(answer | prompt) of every sequence: the sum over its answer tokens."""
    from dowser.eval.likelihood import answer_logprobs

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # sequences of similar length share a batch, so padding costs little
    order = torch.argsort(torch.tensor([len(s) for s in enc.input_ids]))
    out = torch.empty(len(enc))
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in enc.batch(rows).items()}
            out[rows] = answer_logprobs(model, batch).cpu()
    finally:
        model.train(was_training)
    return out
