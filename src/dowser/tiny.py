"""Tiny, randomly initialised Hugging Face checkpoints, built from config without any download.

The tokenizer is a byte-level BPE trained in milliseconds on the short corpus below, and each
model is built from a hand-written config under a fixed seed. The models are useless as language
models but have the real module structure (token embeddings, decoder layers with q/k/v/o and
gate/up/down projections, vision tower, projector, lm head), so tests and demos exercise the same
code paths as they would on the full-size checkpoints, in well under a second each.

    model, processor = build_model("llava", seed=0)
    path = build_checkpoint("qwen2", "/tmp/tiny-qwen2")
    model, tokenizer = load_checkpoint(path)

`ARCHS` lists the architectures. For the vision-language ones, `IMAGE_PLACEHOLDER[arch]` is the
text to put in a prompt for one image (the processor expands it into the image tokens), and
`IMAGE_SIZE` is the side of the square images the vision towers see (any image is resized to it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Idefics3Processor,
    LlavaProcessor,
    PaliGemmaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLProcessor,
)

# From their modules: the PIL image processors (the default ones need torchvision) and the regex
# of Qwen2's pre-tokenizer.
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
from transformers.utils import is_torchvision_available

from dowser.tiny_configs import (
    CONFIGS,
    IMAGE_SIZE,
    NUM_HEADS,
    PATCH_SIZE,
    VISION_LAYERS,
    VISION_WIDTH,
    text_config,
)

ARCHS: tuple[str, ...] = ("llama", "qwen2", "llava", "qwen2_vl", "idefics3", "paligemma")
TEXT_ARCHS: tuple[str, ...] = ("llama", "qwen2")
VLM_ARCHS: tuple[str, ...] = ("llava", "qwen2_vl", "idefics3", "paligemma")

# The text that stands for one image in a prompt; the processor expands it into image tokens.
# (PaliGemma's processor also accepts a prompt without it, and then puts it in front itself.)
IMAGE_PLACEHOLDER: dict[str, str] = {
    "llava": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "idefics3": "<image>",
    "paligemma": "<image>",
}


# The token each processor expands the placeholder into, and the other special tokens it looks up.
_IMAGE_TOKEN: dict[str, str] = {
    "llava": "<image>",
    "qwen2_vl": "<|image_pad|>",
    "idefics3": "<image>",
    "paligemma": "<image>",
}
_EXTRA_SPECIAL_TOKENS: dict[str, list[str]] = {
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|video_pad|>"],
    "idefics3": ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
}
# Like the real Qwen2 and Qwen2-VL tokenizers, ours for them have no BOS token.
_NO_BOS: tuple[str, ...] = ("qwen2", "qwen2_vl")

_CORPUS = """\
The river ran low through the valley that summer, and the old mill stood quiet for the first
time in years. Children came down from the village in the mornings to look for stones with holes
in them, because their grandmother had told them such stones were lucky. Most of what they found
was ordinary grey rock, but now and then one of them would shout and hold up a small white
pebble against the sky, and the others would run over to see.

A dowser walked along the bank in the afternoon with a forked hazel stick held loosely in both
hands. He said the stick would dip when it passed over hidden water. Nobody in the village quite
believed him, yet everyone watched. The farmer who owned the upper field wanted a new well, and
he was willing to pay for a good guess, since digging in the wrong place would cost him a week.

Maps are small models of large places. A good map leaves out almost everything and keeps only what
a traveller needs: the roads, the rivers, the bridges, the names of towns. A model of language is
a little like that. It cannot hold the whole world, so it keeps patterns instead, and from those
patterns it tries to guess the next word in a sentence, one word at a time.

The cat sat on the warm stone step and watched a bird in the apple tree. The bird watched the
cat. Neither of them moved for a long while. Then a door opened somewhere in the house, the smell
of bread came out into the yard, and both of them forgot about each other entirely.

In the picture there is a red boat on a blue lake. Behind the boat are green hills and a white
house with a black roof. A dog is standing at the front of the boat, looking at the water. The
sky is bright and there are only a few small clouds. What colour is the boat? The boat is red.
How many dogs are in the picture? There is one dog. Describe the image in one sentence.

Numbers are words too: one, two, three, four, five, six, seven, eight, nine, ten. On Monday the
market opened at eight. On Tuesday it rained. On Wednesday the baker sold forty loaves before
noon and closed early, and on Thursday the whole street smelled of oranges from the south.

Questions are often easier than answers. Why is the sea salty? Where does the wind go when it
stops? How does a seed know which way is up? A patient teacher once said that every good answer
starts with looking carefully, and that most mistakes come from looking quickly instead.

When the lamps were lit, the travellers sat together at the long table and told stories. One
spoke of a city built on water, another of a mountain road so narrow that carts had to be taken
apart to pass. The youngest said nothing at all, but listened, and remembered every word.
"""


def build_tokenizer(
    *,
    vocab_size: int = 512,
    image_token: str | None = None,
    bos: bool = True,
    extra_special_tokens: Sequence[str] = (),
    corpus: Iterable[str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer on `corpus` (texts; default the built-in one).

    Special tokens: unk "<unk>", bos "<s>" (only if `bos`, and then prepended to every encoded
    text), eos "</s>", pad "<pad>", and as additional special tokens `image_token` (also exposed as
    `tokenizer.image_token`) and `extra_special_tokens`. They have the lowest ids and are never
    split. Padding is on the left, as batched generation needs. `len(tokenizer) == vocab_size` up
    to about 950 with the built-in corpus, all it allows. The same arguments always give the same tokenizer.
    """
    specials = ["<unk>"] + (["<s>"] if bos else []) + ["</s>", "<pad>"]
    specials += ([image_token] if image_token else []) + list(extra_special_tokens)
    if vocab_size <= len(specials) + 256:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for merges after the 256 bytes")

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    # Qwen2's normaliser and pre-tokenizer: AutoTokenizer rebuilds the tokenizer of any qwen2
    # checkpoint with them, so using them everywhere makes every tokenizer survive a reload.
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus or _CORPUS.split("\n\n"), trainer)

    # A named `image_token` becomes an attribute of the tokenizer, which the processors look for.
    named = {"image_token": image_token} if image_token else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>" if bos else None,
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=list(extra_special_tokens),
        add_bos_token=bos,
        padding_side="left",
        **named,
    )


# --- processors: each takes the tokenizer and may add tokens to it ------------------------------


def _llava_processor(tok: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    # CLIP puts a CLS token in front of the patches (+1) and the "default" feature-selection
    # strategy drops it again (-1), leaving one image token per patch.
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


class _Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without the video processor, which needs torchvision.

    It saves itself as a plain "Qwen2VLProcessor" with a matching video processor config, so the
    checkpoint is a standard one that `AutoProcessor` loads wherever torchvision is installed.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # ProcessorMixin takes the list of sub-processors from this signature, so the
        # `video_processor=None` that Qwen2VLProcessor passes on is ignored, not type-checked.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict:
        image = self.image_processor.to_dict()
        keys = ("size", "patch_size", "temporal_patch_size", "merge_size")
        video = {key: image[key] for key in keys}
        video["video_processor_type"] = "Qwen2VLVideoProcessor"
        return super().to_dict() | {"processor_class": "Qwen2VLProcessor", "video_processor": video}


def _qwen2_vl_processor(tok: PreTrainedTokenizerFast) -> Qwen2VLProcessor:
    # min_pixels == max_pixels: every image is resized to 32x32, i.e. 4x4 patches that the
    # vision tower merges 2x2 into 4 image tokens.
    pixels = IMAGE_SIZE * IMAGE_SIZE
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=PATCH_SIZE,
        temporal_patch_size=2,
        merge_size=2,
    )
    return _Qwen2VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tok)


def _idefics3_processor(tok: PreTrainedTokenizerFast) -> Idefics3Processor:
    # No splitting into tiles: each image is resized to one 32x32 view, whose 4x4 patches the
    # connector's pixel shuffle (scale factor 2) turns into 4 image tokens.
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False,
    )
    image_seq_len = (IMAGE_SIZE // PATCH_SIZE // 2) ** 2
    return Idefics3Processor(image_processor, tokenizer=tok, image_seq_len=image_seq_len)


def _paligemma_processor(tok: PreTrainedTokenizerFast) -> PaliGemmaProcessor:
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = (IMAGE_SIZE // PATCH_SIZE) ** 2  # the processor needs it
    # Adds 1152 <locXXXX>/<segXXX> tokens to the tokenizer and stops it from adding BOS: the
    # processor itself puts BOS between the image tokens and the text.
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)


_PROCESSORS = {
    "llava": _llava_processor,
    "qwen2_vl": _qwen2_vl_processor,
    "idefics3": _idefics3_processor,
    "paligemma": _paligemma_processor,
}


# --- public API ----------------------------------------------------------------------------------


def build_model(
    arch: str,
    *,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 64,
    vocab_size: int | None = None,
    tokenizer_vocab: int = 512,
    corpus: Iterable[str] | None = None,
    vision_width: int = VISION_WIDTH,
    vision_layers: int = VISION_LAYERS,
) -> tuple[torch.nn.Module, object]:
    """Build a tiny, randomly initialised model of architecture `arch` (one of `ARCHS`).

    Returns `(model, processor)` for the vision-language models and `(model, tokenizer)` for the
    text ones, with the model in eval mode. The language decoder has `num_layers` layers of width
    `hidden_size` (a multiple of 8); the vision towers have `vision_layers` layers of width
    `vision_width`. The tokenizer is a BPE of `tokenizer_vocab` entries trained on `corpus`
    (default: the built-in paragraphs; see `build_tokenizer`). `vocab_size`,
    the model's vocabulary size, defaults to `len(tokenizer)` and may be larger (padded
    embeddings). The same `seed` gives bit-identical weights; the global RNG state is untouched.
    """
    if arch not in CONFIGS:
        raise ValueError(f"unknown arch {arch!r}, expected one of {ARCHS}")
    if hidden_size % (2 * NUM_HEADS):
        raise ValueError(f"hidden_size must be a multiple of {2 * NUM_HEADS}, got {hidden_size}")
    tok = build_tokenizer(
        image_token=_IMAGE_TOKEN.get(arch),
        bos=arch not in _NO_BOS,
        extra_special_tokens=_EXTRA_SPECIAL_TOKENS.get(arch, ()),
        vocab_size=tokenizer_vocab,
        corpus=corpus,
    )
    processor = _PROCESSORS[arch](tok) if arch in _PROCESSORS else tok
    if vocab_size is None:
        vocab_size = len(tok)  # measured after the processor, which may have added tokens
    elif vocab_size < len(tok):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tok)})")
    text = text_config(tok, vocab_size, hidden_size, num_layers)
    config = CONFIGS[arch](tok, text, {"width": vision_width, "layers": vision_layers})

    auto = AutoModelForCausalLM if arch in TEXT_ARCHS else AutoModelForImageTextToText
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, name, getattr(tok, name))
    return model.eval(), processor


def save_checkpoint(
    model: torch.nn.Module, processor_or_tokenizer, out_dir: str | os.PathLike
) -> Path:
    """Save `model` (safetensors weights) and its processor or tokenizer to `out_dir`."""
    out = Path(out_dir)
    model.save_pretrained(out)
    processor_or_tokenizer.save_pretrained(out)
    return out


def build_checkpoint(
    arch: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 64,
) -> Path:
    """Build a tiny `arch` model with `build_model`, save it to `out_dir` and return that path."""
    model, processor = build_model(arch, seed=seed, num_layers=num_layers, hidden_size=hidden_size)
    return save_checkpoint(model, processor, out_dir)


def load_checkpoint(path: str | os.PathLike) -> tuple[torch.nn.Module, object]:
    """Load a local checkpoint of one of `ARCHS` with the `Auto*` classes.

    Returns `(model, processor)` or `(model, tokenizer)`, like `build_model`. Without torchvision,
    `AutoProcessor` cannot load a Qwen2-VL processor (it insists on the video processor, which
    needs torchvision), so those are loaded without video support.
    """
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type in TEXT_ARCHS:
        return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    if model_type == "qwen2_vl" and not is_torchvision_available():
        return model, _Qwen2VLImageOnlyProcessor.from_pretrained(path)
    return model, AutoProcessor.from_pretrained(path)
