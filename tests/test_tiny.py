"""Tests for dowser.tiny: tiny random checkpoints that reload offline and run end to end."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Idefics3Processor,
    LlavaProcessor,
    PaliGemmaProcessor,
    PreTrainedTokenizerBase,
    Qwen2VLProcessor,
)
from transformers.utils import is_torchvision_available

from dowser import tiny

# How many image tokens one image becomes, given the tiny vision configs (32x32 images, 8x8
# patches): LLaVA and PaliGemma keep all 16 patches, Qwen2-VL and Idefics3 merge them 2x2.
NUM_IMAGE_TOKENS = {"llava": 16, "qwen2_vl": 4, "idefics3": 4, "paligemma": 16}
PROCESSOR_CLASS = {
    "llava": LlavaProcessor,
    "qwen2_vl": Qwen2VLProcessor,
    "idefics3": Idefics3Processor,
    "paligemma": PaliGemmaProcessor,
}
SAMPLE_TEXT = "The dowser's stick dipped twice: naïve, 42 wells,\n\tand   水!"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Each architecture built once (seed 0) and saved: arch -> (model, processor, path)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch in tiny.ARCHS:
        model, processor = tiny.build_model(arch)
        out[arch] = model, processor, tiny.save_checkpoint(model, processor, root / arch)
    return out


def image(width: int = 40, height: int = 30) -> Image.Image:
    """A small RGB image that is not the size the processors resize to."""
    return Image.linear_gradient("L").resize((width, height)).convert("RGB")


def tokenizer_of(processor_or_tokenizer):
    return getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def assert_padding_is_masked(batch_logits: torch.Tensor, single_logits: torch.Tensor) -> None:
    """The left-padded first prompt of a batch predicts the same next token as it does alone."""
    torch.testing.assert_close(batch_logits[0, -1], single_logits[0, -1], atol=1e-5, rtol=0)


def assert_generates(model, inputs, prompt_len: int) -> None:
    out = model.generate(**inputs, max_new_tokens=5, do_sample=True)
    assert out.shape[0] == inputs["input_ids"].shape[0]
    assert prompt_len < out.shape[1] <= prompt_len + 5


# --- tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_is_deterministic_and_full_size():
    a, b = tiny.build_tokenizer(), tiny.build_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert len(a) == 512
    assert len(tiny.build_tokenizer(vocab_size=700)) == 700


def test_tokenizer_special_tokens():
    tok = tiny.build_tokenizer(image_token="<image>", extra_special_tokens=["<extra>"])
    specials = tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token
    assert specials == ("<s>", "</s>", "<pad>", "<unk>")
    assert tok.image_token == "<image>"
    assert tok.convert_ids_to_tokens(tok.image_token_id) == "<image>"
    assert tok.padding_side == "left"
    ids = tok("a river<image>in the<extra> valley").input_ids
    assert ids[0] == tok.bos_token_id  # BOS is prepended
    tokens = tok.convert_ids_to_tokens(ids)
    assert "<image>" in tokens and "<extra>" in tokens  # special tokens are kept whole
    assert tok.eos_token_id not in ids


def test_tokenizer_without_bos_round_trips():
    tok = tiny.build_tokenizer(bos=False)
    assert tok.bos_token is None and "<s>" not in tok.get_vocab()
    ids = tok(SAMPLE_TEXT).input_ids
    assert ids == tok(SAMPLE_TEXT, add_special_tokens=False).input_ids  # nothing prepended
    assert tok.decode(ids) == SAMPLE_TEXT


def test_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError):
        tiny.build_tokenizer(vocab_size=260)


# --- building ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_structure_and_size(arch):
    model, processor = tiny.build_model(arch, num_layers=3)
    assert not model.training
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 500_000
    decoder = model.get_decoder()
    assert len(decoder.layers) == model.config.get_text_config().num_hidden_layers == 3
    names = {name for name, _ in decoder.named_modules()}
    for i in range(3):
        for proj in PROJECTIONS:
            kind = "self_attn" if proj in PROJECTIONS[:4] else "mlp"
            assert f"layers.{i}.{kind}.{proj}" in names
    tok = tokenizer_of(processor)
    assert model.config.get_text_config().vocab_size == len(tok)
    assert model.get_input_embeddings().num_embeddings == len(tok)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_seed(arch):
    rng = torch.get_rng_state()
    a, b, c = (tiny.build_model(arch, seed=seed)[0] for seed in (1, 1, 2))
    assert_same_weights(a, b)
    a, c = a.state_dict(), c.state_dict()
    assert not all(torch.equal(a[name], c[name]) for name in a)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone


def test_vocab_size_argument():
    model, tok = tiny.build_model("llama", vocab_size=600)
    assert model.config.vocab_size == 600 and len(tok) == 512
    with pytest.raises(ValueError):
        tiny.build_model("llama", vocab_size=100)
    with pytest.raises(ValueError):
        tiny.build_model("gpt2")


def test_other_sizes():
    model, processor = tiny.build_model("qwen2_vl", num_layers=1, hidden_size=32)
    inputs = processor(
        text=[tiny.IMAGE_PLACEHOLDER["qwen2_vl"] + "Hi"], images=[image()], return_tensors="pt"
    )
    assert model(**inputs).logits.shape[-1] == len(processor.tokenizer)


# --- saving and reloading ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_reload_model(checkpoints, arch):
    model, _, path = checkpoints[arch]
    assert (path / "model.safetensors").is_file()
    auto = AutoModelForCausalLM if arch in tiny.TEXT_ARCHS else AutoModelForImageTextToText
    reloaded = auto.from_pretrained(path)
    assert type(reloaded) is type(model)
    assert_same_weights(model, reloaded)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_reload_tokenizer(checkpoints, arch):
    _, processor, path = checkpoints[arch]
    tok = tokenizer_of(processor)
    reloaded = AutoTokenizer.from_pretrained(path)
    assert len(reloaded) == len(tok)
    for text in (SAMPLE_TEXT, "Hello <image> 12345 ünïcode 你好 <pad></s>"):
        assert reloaded(text).input_ids == tok(text).input_ids


@pytest.mark.parametrize("arch", tiny.VLM_ARCHS)
def test_reload_processor(checkpoints, arch):
    if arch == "qwen2_vl" and not is_torchvision_available():
        pytest.skip("AutoProcessor needs torchvision for Qwen2-VL's video processor")
    _, processor, path = checkpoints[arch]
    reloaded = AutoProcessor.from_pretrained(path)
    prompts = [tiny.IMAGE_PLACEHOLDER[arch] + "What is this?"]
    a = processor(text=prompts, images=[image()], return_tensors="pt")
    b = reloaded(text=prompts, images=[image()], return_tensors="pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_load_checkpoint(checkpoints, arch):
    model, processor, path = checkpoints[arch]
    reloaded, reloaded_processor = tiny.load_checkpoint(path)
    assert_same_weights(model, reloaded)
    assert not reloaded.training
    assert isinstance(reloaded_processor, PROCESSOR_CLASS.get(arch, PreTrainedTokenizerBase))
    ids = tokenizer_of(processor)(SAMPLE_TEXT).input_ids
    assert tokenizer_of(reloaded_processor)(SAMPLE_TEXT).input_ids == ids


def test_qwen2_vl_checkpoint_is_standard(checkpoints):
    """Saved as a plain Qwen2VLProcessor, with a video processor config for AutoProcessor."""
    config = json.loads((checkpoints["qwen2_vl"][2] / "processor_config.json").read_text())
    assert config["processor_class"] == "Qwen2VLProcessor"
    assert config["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"


# --- running -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", tiny.TEXT_ARCHS)
def test_text_generate(checkpoints, arch):
    _, _, path = checkpoints[arch]
    model, tok = tiny.load_checkpoint(path)
    ids = tok("The river").input_ids
    if arch == "llama":
        assert ids[0] == tok.bos_token_id
    else:  # like the real Qwen2, no BOS
        assert tok.bos_token is None and ids == tok("The river", add_special_tokens=False).input_ids
    inputs = tok(["The river", "A dowser walked along the bank"], return_tensors="pt", padding=True)
    assert inputs["attention_mask"][0, 0] == 0  # left padding
    T = inputs["input_ids"].shape[1]
    logits = model(**inputs).logits
    assert logits.shape == (2, T, len(tok))
    assert_padding_is_masked(logits, model(**tok(["The river"], return_tensors="pt")).logits)
    assert_generates(model, inputs, T)


@pytest.mark.parametrize("arch", tiny.VLM_ARCHS)
def test_vlm_forward_and_generate(checkpoints, arch):
    _, _, path = checkpoints[arch]
    model, processor = tiny.load_checkpoint(path)
    vocab = len(processor.tokenizer)
    prompt = tiny.IMAGE_PLACEHOLDER[arch] + "What is in the picture?"
    inputs = processor(text=[prompt], images=[image()], return_tensors="pt")
    ids = inputs["input_ids"]
    assert (ids == model.config.image_token_id).sum() == NUM_IMAGE_TOKENS[arch]
    logits = model(**inputs).logits
    assert logits.shape == (1, ids.shape[1], vocab) and torch.isfinite(logits).all()
    assert_generates(model, inputs, ids.shape[1])

    # A batch of two prompts of different lengths, left-padded.
    prompts = [tiny.IMAGE_PLACEHOLDER[arch] + "Hi", prompt + " Describe it in one sentence."]
    batch = processor(
        text=prompts, images=[image(), image(24, 48)], return_tensors="pt", padding=True
    )
    T = batch["input_ids"].shape[1]
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1].all()
    logits = model(**batch).logits
    assert logits.shape == (2, T, vocab)
    single = processor(text=prompts[:1], images=[image()], return_tensors="pt")
    assert_padding_is_masked(logits, model(**single).logits)
    assert_generates(model, batch, T)
