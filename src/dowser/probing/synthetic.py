"""Self-generated probing inputs: the model writes its own probing data (no data set needed).

Each sample is BOS + 1..5 uniformly random non-special tokens, continued by the model's own
sampling (temperature 0.9, top-p 0.9, repetition penalty 1.05) until it holds `seq_len` text
tokens or stops. With `images="noise"` every sample starts with the model's image placeholder
(expanded by its processor) and gets its own Gaussian-noise pixels, N(0, 1) after the
processor's normalisation.

Generation runs on left-padded prompts (as `generate` needs); the probing batches are then
right-padded, so that every sample's text starts at position 0 and "the last position" is
simply its length - 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from dowser.errors import DowserError

MIN_PROMPT, MAX_PROMPT = 1, 5  # random tokens after BOS, drawn uniformly (reference)
SAMPLING = dict(do_sample=True, temperature=0.9, top_p=0.9, repetition_penalty=1.05)
GENERATION_CHUNK = 16  # samples generated together (memory grows with it; speed too)
# Per-token inputs besides input_ids/attention_mask: how new (generated) tokens fill them.
ZERO_FILLED = ("mm_token_type_ids",)  # generated text is never an image token


@dataclass
class Sample:
    """One synthetic sequence and the image inputs that go with it."""

    ids: list[int]
    per_token: dict[str, list[int]]  # e.g. mm_token_type_ids, same length as ids
    image: dict[str, torch.Tensor]  # e.g. pixel_values (noise), image_grid_thw; batch dim 1


def _tokenizer_of(tokenizer, processor):
    if tokenizer is not None:
        return tokenizer
    return getattr(processor, "tokenizer", None)


def _vocabulary(
    model: nn.Module, tok
) -> tuple[torch.Tensor, list[int], int | None, int | None, int]:
    """(ids that may be drawn, special ids, bos id, eos id, pad id) from the tokenizer, else
    the config. Special ids include image placeholders, which generation must never emit."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = emb.weight.shape[0] if emb is not None else getattr(text_config, "vocab_size", None)
    if n is None:
        raise DowserError("cannot tell the vocabulary size: pass a tokenizer or `batches`")
    special: set[int] = set()
    if tok is not None:
        n = min(n, len(tok))
        special.update(tok.all_special_ids)
        special.update(getattr(tok, "added_tokens_decoder", {}).keys())
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    else:
        bos = getattr(text_config, "bos_token_id", None)
        eos = getattr(text_config, "eos_token_id", None)
        pad = getattr(text_config, "pad_token_id", None)
    for cfg in (config, text_config):
        for key in ("image_token_id", "image_token_index", "video_token_id"):
            if isinstance(getattr(cfg, key, None), int):
                special.add(getattr(cfg, key))
    if isinstance(eos, list):
        special.update(eos)
        eos = eos[0]
    special.update(x for x in (bos, eos, pad) if x is not None)
    allowed = torch.tensor([i for i in range(n) if i not in special], dtype=torch.long)
    if allowed.numel() == 0:
        raise DowserError("the vocabulary has no ordinary tokens to draw from")
    if pad is None:
        pad = eos if eos is not None else 0
    return allowed, sorted(special), bos, eos, pad


def _image_prefix(processor) -> tuple[list[int], dict[str, list[int]], dict[str, torch.Tensor]]:
    """The processor's encoding of one image placeholder (+ BOS): ids, per-token keys, image keys."""
    from PIL import Image

    placeholder = getattr(processor, "image_token", None)
    if processor is None or placeholder is None or not hasattr(processor, "image_processor"):
        raise DowserError(
            'images="noise" needs the model\'s processor with an image token '
            "(AutoProcessor.from_pretrained(model_dir)); pass processor=..."
        )
    size = _image_size(processor.image_processor)
    image = Image.new("RGB", (size, size), (128, 128, 128))
    enc = processor(text=[placeholder], images=[image], return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    per_token, image_keys = {}, {}
    for key, value in enc.items():
        if key in ("input_ids", "attention_mask") or not isinstance(value, torch.Tensor):
            continue
        if value.dim() == 2 and value.shape == enc["input_ids"].shape:
            per_token[key] = value[0].tolist()
        else:
            image_keys[key] = value
    if "pixel_values" not in image_keys:
        raise DowserError(f"the processor gave no pixel_values for an image (keys: {list(enc)})")
    return ids, per_token, image_keys


def _image_size(image_processor) -> int:
    """A side length the image processor accepts as is (it resizes anyway)."""
    for attr in ("crop_size", "size"):
        size = getattr(image_processor, attr, None)
        if isinstance(size, dict):
            for key in ("height", "shortest_edge", "longest_edge", "width"):
                if isinstance(size.get(key), int):
                    return min(size[key], 448)
        elif isinstance(size, int):
            return min(size, 448)
    return 224


def synthetic_samples(
    model: nn.Module,
    *,
    tokenizer=None,
    processor=None,
    num_samples: int = 64,
    seq_len: int = 64,
    images: str = "off",
    generator: torch.Generator,
    device: torch.device,
    progress: bool = True,
) -> tuple[list[Sample], int]:
    """Generate `num_samples` probing sequences with the model itself (see module doc).

    Returns the samples and the pad id to batch them with.
    """
    if not hasattr(model, "generate"):
        raise DowserError(
            "synthetic probing needs a model that can generate (a Hugging Face generative model); "
            "for other models pass batches=..."
        )
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise DowserError(
            "synthetic probing covers decoder-only models and speech encoder-decoders (give "
            "their processor); for another encoder-decoder model pass "
            "batches=[{input_ids, decoder_input_ids, ...}] (Python API)"
        )
    if images not in ("off", "noise"):
        raise DowserError(f'images={images!r}: use "off" (text only) or "noise"')
    if seq_len < 2:
        raise DowserError(f"seq_len={seq_len}: need at least 2 tokens")
    tok = _tokenizer_of(tokenizer, processor)
    allowed, special, bos, eos, pad = _vocabulary(model, tok)
    # Sampling may emit any ordinary token or EOS, never an image placeholder, BOS or pad.
    suppress = [i for i in special if i != eos]
    if images == "noise":
        prefix, prefix_per_token, image_template = _image_prefix(processor)
    else:
        prefix, prefix_per_token, image_template = ([bos] if bos is not None else []), {}, {}
    # seq_len counts text tokens: BOS and text, not the image placeholder's expansion.
    n_text_prefix = int(bos is not None and len(prefix) > 0 and prefix[0] == bos)
    total_len = len(prefix) - n_text_prefix + seq_len

    prompts: list[Sample] = []
    for _ in range(num_samples):
        k = int(torch.randint(MIN_PROMPT, MAX_PROMPT + 1, (1,), generator=generator))
        pick = allowed[torch.randint(len(allowed), (k,), generator=generator)].tolist()
        ids = (prefix + pick)[:total_len]
        per_token = {key: v + [_fill(key, v)] * k for key, v in prefix_per_token.items()}
        per_token = {key: v[: len(ids)] for key, v in per_token.items()}
        image = {
            key: torch.randn(v.shape, generator=generator) if key == "pixel_values" else v.clone()
            for key, v in image_template.items()
        }
        prompts.append(Sample(ids, per_token, image))

    samples = []
    chunks = range(0, num_samples, GENERATION_CHUNK)
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # generate() samples from the global RNG
        for start in tqdm(chunks, desc="generating probes", disable=not progress, leave=False):
            chunk = prompts[start : start + GENERATION_CHUNK]
            samples.extend(_continue(model, chunk, total_len, eos, pad, suppress, device))
    return samples, pad


def _fill(key: str, values: list[int]) -> int:
    return 0 if key in ZERO_FILLED or not values else values[-1]


@torch.no_grad()
def _continue(
    model, prompts: list[Sample], total_len: int, eos, pad, suppress, device
) -> list[Sample]:
    """Let the model continue each prompt by sampling, up to total_len tokens or EOS."""
    width = max(len(p.ids) for p in prompts)
    new_tokens = total_len - min(len(p.ids) for p in prompts)
    if new_tokens <= 0:
        return prompts
    batch = to_model(_pad(prompts, width, pad=pad, left=True), model, device)
    out = model.generate(
        **batch,
        **SAMPLING,
        max_new_tokens=new_tokens,
        pad_token_id=pad,
        eos_token_id=eos,
        suppress_tokens=suppress or None,
    )
    generated = out[:, width:].tolist()
    result = []
    for p, gen in zip(prompts, generated, strict=True):
        gen = gen[: total_len - len(p.ids)]
        if eos is not None and eos in gen:
            gen = gen[: gen.index(eos) + 1]
        per_token = {key: v + [_fill(key, v)] * len(gen) for key, v in p.per_token.items()}
        result.append(Sample(p.ids + gen, per_token, p.image))
    return result


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go.

    A model placed with a device map (accelerate: `from_pretrained(device_map=...)`) moves
    activations between devices itself and keeps offloaded weights on "meta"; its inputs go
    to its first accelerator, or to the CPU when it has none. Otherwise: its weights' device.
    """
    placement = getattr(model, "hf_device_map", None)
    if placement:
        devices = [d for d in placement.values() if d not in ("cpu", "disk")]
        if not devices:
            return torch.device("cpu")
        first = devices[0]
        return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise DowserError("the model has no parameters") from None


def to_model(batch: dict, model: nn.Module, device) -> dict:
    """Move a batch to `device`; floating inputs (pixels) take the model's dtype."""
    dtype = next(model.parameters()).dtype
    return {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
        if isinstance(v, torch.Tensor)
        else v
        for k, v in batch.items()
    }


def _pad(samples: list[Sample], width: int, *, pad: int, left: bool) -> dict:
    """Model inputs for a batch of samples, padded to `width` on the left or the right."""

    def row(values: list[int], fill: int) -> list[int]:
        extra = [fill] * (width - len(values))
        return extra + values if left else values + extra

    batch = {
        "input_ids": torch.tensor([row(s.ids, pad) for s in samples]),
        "attention_mask": torch.tensor([row([1] * len(s.ids), 0) for s in samples]),
    }
    for key in samples[0].per_token:
        batch[key] = torch.tensor([row(s.per_token[key], 0) for s in samples])
    for key in samples[0].image:
        batch[key] = torch.cat([s.image[key] for s in samples])
    return batch


def probe_batches(samples: list[Sample], batch_size: int, pad: int) -> Iterator[dict]:
    """Right-padded model inputs (on the CPU), `batch_size` samples at a time."""
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        yield _pad(chunk, max(len(s.ids) for s in chunk), pad=pad, left=False)


def synthetic_batches(
    model: nn.Module,
    *,
    tokenizer=None,
    processor=None,
    num_samples: int = 64,
    batch_size: int = 4,
    seq_len: int = 64,
    images: str = "off",
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """The self-generated probing batches `dowser.probe` uses, as a list of model inputs.

    For baselines that need activations without data (e.g. a Wanda mask) on the same inputs.
    A speech encoder-decoder (Whisper, with its processor) gets noise audio and its own text
    (`dowser.probing.speech`).
    """
    device = input_device(model)
    generator = torch.Generator().manual_seed(seed)
    from dowser.probing.speech import is_speech_model, speech_batches, speech_samples

    if is_speech_model(model, processor):  # noise audio + the decoder's own text
        if images != "off":
            raise DowserError(
                f'images={images!r}: a speech model is probed with noise audio; use images="off"'
            )
        samples, pad = speech_samples(
            model,
            processor=processor,
            num_samples=num_samples,
            seq_len=seq_len,
            generator=generator,
            device=device,
            progress=progress,
        )
        return speech_batches(samples, batch_size, pad)
    samples, pad = synthetic_samples(
        model,
        tokenizer=tokenizer,
        processor=processor,
        num_samples=num_samples,
        seq_len=seq_len,
        images=images,
        generator=generator,
        device=device,
        progress=progress,
    )
    return list(probe_batches(samples, batch_size, pad))
