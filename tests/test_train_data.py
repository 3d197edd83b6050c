"""Training data: both file formats, answer-only labels, chat templates, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dowser import DowserError
from dowser.tiny import build_model
from dowser.train.data import IGNORE, Collator, Example, SupervisedDataset, load_examples


@pytest.fixture
def files(tmp_path):
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "red.png")
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"image": "red.png", "prompt": "what colour?", "answer": "red"})
        + "\n\n"
        + json.dumps({"prompt": "say hi", "answer": "hi"})
        + "\n"
    )
    conv = [
        {
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "yes"},
            ],
        }
    ]
    (tmp_path / "b.json").write_text(json.dumps(conv))
    return tmp_path


def answer_text(tok, item) -> str:
    keep = item["labels"] != IGNORE
    return tok.decode(item["input_ids"][keep])


def test_jsonl_and_llava_formats(files):
    a = load_examples(files / "a.jsonl")
    assert [len(e.turns) for e in a] == [1, 1]
    assert a[0].image == (files / "red.png").resolve() and a[1].image is None
    b = load_examples(files / "b.json")
    assert b[0].turns == [("<image>\nWhat colour?", "red"), ("Sure?", "yes")]


def test_loss_only_on_answers_without_chat_template(files):
    model, processor = build_model("llava")
    ds = SupervisedDataset(load_examples(files / "b.json"), processor)
    item = ds[0]
    tok = processor.tokenizer
    assert answer_text(tok, item).replace(
        " ", ""
    ) == f"red{tok.eos_token}yes{tok.eos_token}".replace(" ", "")
    n_image = int((item["input_ids"] == model.config.image_token_id).sum())
    assert n_image == 16 and item["pixel_values"].shape[0] == 1
    out = model(**Collator(tok.pad_token_id)([item, item]))
    assert out.logits.shape[:2] == (2, len(item["input_ids"]))


def test_loss_only_on_answers_with_chat_template(files):
    _, tok = build_model("llama")
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    ds = SupervisedDataset(load_examples(files / "a.jsonl")[1:], tok)
    item = ds[0]
    assert answer_text(tok, item).replace(" ", "") == f"hi{tok.eos_token}".replace(" ", "")
    assert tok.decode(item["input_ids"]).replace(" ", "").startswith("<s><user>sayhi")


def test_collator_pads_and_concatenates_images(files):
    _, processor = build_model("llava")
    ds = SupervisedDataset(load_examples(files / "a.jsonl"), processor)
    batch = Collator(processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape[0] == 1  # only the first record has an image
    short = int(batch["attention_mask"][1].sum())
    assert (batch["labels"][1, short:] == IGNORE).all()


def test_truncation_and_too_long_prompt(files):
    _, tok = build_model("llama")
    examples = load_examples(files / "a.jsonl")[1:]
    full = SupervisedDataset(examples, tok)[0]
    first = int((full["labels"] != IGNORE).nonzero()[0])  # first answer token
    cut = SupervisedDataset(examples, tok, max_length=first + 1)[0]
    assert len(cut["input_ids"]) == first + 1
    assert torch.equal(cut["labels"], full["labels"][: first + 1])
    with pytest.raises(DowserError, match="max-length"):
        SupervisedDataset(examples, tok, max_length=first)[0]


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"prompt": "x"}', "no 'answer' field"),
        ('{"prompt": "x", "answer": 3}', "'answer' must be a string"),
        ('{"image": "nope.png", "prompt": "x", "answer": "y"}', "image nope.png not found"),
        ("not json", "not valid JSON"),
        ("", "holds no records"),
        ('[{"conversations": [{"from": "gpt", "value": "a"}]}]', "answers before any question"),
        ('[{"conversations": [{"from": "human", "value": "q"}]}]', "has no answer"),
        ('[{"conversations": [{"from": "bot", "value": "q"}]}]', "use human or gpt"),
    ],
)
def test_bad_records(tmp_path, content, match):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DowserError, match=match):
        load_examples(path)


def test_image_for_a_text_model_is_refused(files):
    _, tok = build_model("llama")
    with pytest.raises(DowserError, match="no image processor"):
        SupervisedDataset(load_examples(files / "a.jsonl"), tok)
    with pytest.raises(DowserError, match="does not exist"):
        load_examples(files / "missing.jsonl")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llava", "qwen2_vl", "idefics3", "paligemma"])
def test_exactly_the_answer_tokens_carry_loss(arch, files):
    """Regression: PaliGemma's processor appends "\\n" to every text; it must carry no loss."""
    _, processor = build_model(arch)
    tok = getattr(processor, "tokenizer", processor)
    image = files / "red.png" if hasattr(processor, "image_processor") else None
    ex = Example([("what colour?", "blue")], image.resolve() if image else None)
    item = SupervisedDataset([ex], processor)[0]
    labelled = item["input_ids"][item["labels"] != IGNORE].tolist()
    answer = tok("blue" + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert labelled == answer, (
        tok.convert_ids_to_tokens(labelled),
        tok.convert_ids_to_tokens(answer),
    )
