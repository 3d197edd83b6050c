"""Supervised fine-tuning data: JSON Lines or LLaVA conversations, loss on answers only.

Two formats, told apart by the file's content:

- JSON Lines, one record per line: {"image": "img/1.png" (optional), "prompt": "...",
  "answer": "..."};
- LLaVA JSON, a list of {"image": ... (optional), "conversations": [{"from": "human",
  "value": "<image>\\nWhat is ..."}, {"from": "gpt", "value": "..."}, ...]}.

Image paths are relative to the data file. Fields and image paths are checked when the file
is read; `SupervisedDataset.check()` then opens every image and measures every prompt, so a
bad record stops the run before training starts. Tokenisation happens when an example is read.

Text is built with the model's chat template when its processor or tokenizer has one
(images as {"type": "image"} content items), else as "prompt\\nanswer<eos>" with the image
placeholder in front. Labels are -100 everywhere except on each answer's tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from dowser.errors import DowserError

IGNORE = -100  # label of tokens that carry no loss
PLACEHOLDER = "<image>"  # how LLaVA data marks the image in a prompt


@dataclass
class Example:
    """One training record: an optional image and (user, assistant) turns."""

    turns: list[tuple[str, str]]
    image: Path | Any = None  # a file, a PIL image, or None for a text-only record
    where: str = ""  # "file:line" for error messages


def _require_str(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DowserError(f"{where}: the record has no {key!r} field")
    value = record[key]
    if not isinstance(value, str):
        raise DowserError(f"{where}: {key!r} must be a string, not {type(value).__name__}")
    return value


def _image(record: dict, base: Path, where: str) -> Path | None:
    name = record.get("image")
    if name is None:
        return None
    if not isinstance(name, str):
        raise DowserError(f"{where}: 'image' must be a path string")
    return existing_file(base, name, "image", where)


def existing_file(base: Path, name: str, what: str, where: str) -> Path:
    """`base / name` resolved, if it is a file; else a one-line DowserError naming the record.

    Names the OS cannot look up (too long, a NUL byte) and control characters (which would
    break the one-line message) are refused as such rather than raising OSError/ValueError.
    """
    if any(ord(c) < 32 for c in name):
        raise DowserError(f"{where}: the {what} path {name!r} holds a control character")
    try:
        path = (base / name).resolve()
        found = path.is_file()
    except (OSError, ValueError) as e:  # e.g. ENAMETOOLONG
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise DowserError(f"{where}: the {what} path {name!r} cannot be used ({reason})") from None
    if not found:
        raise DowserError(f"{where}: {what} {name} not found (looked for {path})")
    return path


def _from_llava(record: dict, base: Path, where: str) -> Example:
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DowserError(f"{where}: 'conversations' must be a non-empty list")
    turns, user = [], None
    for i, msg in enumerate(conv):
        if not isinstance(msg, dict):
            raise DowserError(f"{where}: conversations[{i}] is not an object")
        who = _require_str(msg, "from", f"{where} conversations[{i}]")
        text = _require_str(msg, "value", f"{where} conversations[{i}]")
        if who in ("human", "user"):
            user = text
        elif who in ("gpt", "assistant"):
            if user is None:
                raise DowserError(f"{where}: conversations[{i}] answers before any question")
            turns.append((user, text))
            user = None
        else:
            raise DowserError(f"{where}: conversations[{i}] has from={who!r}; use human or gpt")
    if not turns:
        raise DowserError(f"{where}: the conversation has no answer ('from': 'gpt')")
    return Example(turns, _image(record, base, where), where)


def load_examples(path: str | Path) -> list[Example]:
    """Read and check every record of a JSON Lines or LLaVA JSON file."""
    path = Path(path)
    if not path.is_file():
        raise DowserError(f"data file {path} does not exist")
    base = path.parent
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading BOM (Windows tools) is fine
    except UnicodeDecodeError as e:
        raise DowserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    stripped = text.lstrip()
    examples = []
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
            raise DowserError(f"{path} is not valid JSON: {e}") from None
        for i, rec in enumerate(records):
            where = f"{path} record {i}"
            if not isinstance(rec, dict):
                raise DowserError(f"{where} is not an object")
            examples.append(_from_llava(rec, base, where))
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: too deep
                raise DowserError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise DowserError(f"{where}: a record must be a JSON object")
            if "conversations" in rec:
                examples.append(_from_llava(rec, base, where))
            else:
                prompt = _require_str(rec, "prompt", where)
                answer = _require_str(rec, "answer", where)
                examples.append(Example([(prompt, answer)], _image(rec, base, where), where))
    if not examples:
        raise DowserError(f"{path} holds no records")
    return examples


class SupervisedDataset(Dataset):
    """Examples encoded for the model: input_ids, attention_mask, labels, image inputs.

    `processor` is the model's processor (vision-language models) or tokenizer (text).
    """

    def __init__(self, examples: list[Example], processor: Any, *, max_length: int = 1024):
        self.examples = examples
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.is_vlm = hasattr(processor, "image_processor")
        template = getattr(processor, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None
        )
        self.use_template = bool(template)
        for ex in examples:
            if ex.image is not None and not self.is_vlm:
                raise DowserError(
                    f"{ex.where}: the record has an image but the model has no image processor"
                )

    def __len__(self) -> int:
        return len(self.examples)

    def check(self, *, progress: bool = True) -> None:
        """Open every image and measure every prompt, so that a bad record stops the run
        before training starts (one processor call per record)."""
        from tqdm.auto import tqdm

        for ex in tqdm(self.examples, desc="checking data", disable=not progress, leave=False):
            image = _load_image(ex.image, ex.where) if ex.image is not None else None
            prefixes, _ = self._texts(ex)
            n = self._length(prefixes[0], image)
            if n >= self.max_length:
                raise DowserError(
                    f"{ex.where}: the prompt alone is {n} tokens, more than --max-length "
                    f"{self.max_length}; raise --max-length or shorten the record"
                )

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ex = self.examples[i]
        image = _load_image(ex.image, ex.where) if ex.image is not None else None
        prefixes, fulls = self._texts(ex)
        enc = self._encode(fulls[-1], image)
        ids = enc["input_ids"][0]
        labels = torch.full_like(ids, IGNORE)
        for prefix, full in zip(prefixes, fulls, strict=True):
            start, end = self._answer_span(ids, prefix, full, image)
            labels[start:end] = ids[start:end]
        first_answer = (
            int((labels != IGNORE).nonzero()[0]) if (labels != IGNORE).any() else len(ids)
        )
        if first_answer >= self.max_length:
            raise DowserError(
                f"{ex.where}: the prompt alone is {first_answer} tokens, more than --max-length "
                f"{self.max_length}; raise --max-length or shorten the record"
            )
        n = min(len(ids), self.max_length)
        item = {
            "input_ids": ids[:n],
            "attention_mask": torch.ones(n, dtype=torch.long),
            "labels": labels[:n],
        }
        for key, value in enc.items():
            if key in item or not isinstance(value, torch.Tensor):
                continue
            if value.dim() == 2 and value.shape == enc["input_ids"].shape:
                item[key] = value[0, :n]  # per-token inputs, e.g. mm_token_type_ids
            else:
                item[key] = value  # image inputs, batch dim kept
        return item

    def _texts(self, ex: Example) -> tuple[list[str], list[str]]:
        """For each turn: the text up to its answer, and the text through its answer."""
        prefixes, fulls = [], []
        if self.use_template:
            messages: list[dict] = []
            for k, (user, answer) in enumerate(ex.turns):
                messages.append({"role": "user", "content": self._user_content(user, ex, k)})
                prefixes.append(self._template(messages, add_generation_prompt=True))
                messages.append({"role": "assistant", "content": self._text_content(answer)})
                fulls.append(self._template(messages, add_generation_prompt=False))
            return prefixes, fulls
        eos = self.tokenizer.eos_token or ""
        text = ""
        for k, (user, answer) in enumerate(ex.turns):
            user = user.replace(PLACEHOLDER, "").strip() if self.is_vlm else user
            if k == 0 and ex.image is not None:
                user = f"{self.processor.image_token}{user}"
            text += f"{user}\n"
            prefixes.append(text)
            text += f"{answer}{eos}"
            fulls.append(text)
            text += "\n"  # separates turns; carries no loss
        return prefixes, fulls

    def _user_content(self, user: str, ex: Example, k: int) -> Any:
        text = user.replace(PLACEHOLDER, "").strip()
        if not self.is_vlm:
            return text
        items = [{"type": "image"}] if (k == 0 and ex.image is not None) else []
        return [*items, {"type": "text", "text": text}]

    def _text_content(self, text: str) -> Any:
        return [{"type": "text", "text": text}] if self.is_vlm else text

    def _template(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        return owner.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _encode(self, text: str, image) -> dict:
        if self.is_vlm:
            images = [image] if image is not None else None
            return self.processor(text=[text], images=images, return_tensors="pt")
        return self.tokenizer([text], return_tensors="pt")

    def _length(self, text: str, image) -> int:
        return int(self._encode(text, image)["input_ids"].shape[1])

    def _answer_span(self, ids: torch.Tensor, prefix: str, full: str, image) -> tuple[int, int]:
        """Token positions [start, end) of the answer that `full` adds to `prefix` in `ids`.

        Encoded separately, the prefix is matched against `ids` token by token: the answer
        starts where they part. Tokens of the prefix's encoding past that point are what the
        processor appends to every text (PaliGemma appends "\n"); the same count is taken off
        the end of `full`'s encoding, so those tokens never carry loss.
        """
        p = self._encode(prefix, image)["input_ids"][0]
        n = min(len(p), len(ids))
        differ = (p[:n] != ids[:n]).nonzero()
        start = int(differ[0]) if len(differ) else n
        appended = len(p) - start
        end = self._length(full, image) - appended
        return start, max(start, end)


def _load_image(path: Path, where: str = ""):
    """The image of a record as RGB; an unreadable one is a DowserError naming the record
    (`where`, "file:line") and the image file."""
    from PIL import Image

    if isinstance(path, Image.Image):  # an image already in memory
        return path.convert("RGB")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        # OSError: missing, unreadable, not an image or truncated; DecompressionBombError:
        # more pixels than PIL allows; ValueError: e.g. a mode PIL cannot convert
        where = f"{where}: " if where else ""
        raise DowserError(f"{where}cannot read image {path} ({e})") from None


@dataclass
class Collator:
    """Right-pads a list of examples into a batch; image inputs are concatenated."""

    pad_token_id: int
    per_token: tuple[str, ...] = field(default=("mm_token_type_ids", "token_type_ids"))

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        fills = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE}
        batch = {}
        for key, fill in fills.items():
            batch[key] = torch.stack([_pad(it[key], width, fill) for it in items])
        for key in self.per_token:
            if key in items[0]:
                batch[key] = torch.stack([_pad(it[key], width, 0) for it in items])
        image_keys = {k for it in items for k in it} - set(batch) - set(self.per_token)
        for key in sorted(image_keys):
            parts = [it[key] for it in items if key in it]
            batch[key] = torch.cat(parts)
        return batch


def _pad(t: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    return torch.cat([t, t.new_full((width - len(t),), fill)])
