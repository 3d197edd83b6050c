"""What synthetic probing prompts are made of: the tokens that may be drawn, and the model's
image placeholder with the inputs its processor makes for one image (`dowser.probing.synthetic`
draws the prompts; `dowser.probing.speech` those of speech models)."""

from __future__ import annotations

import torch
from torch import nn

from dowser.errors import DowserError


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
