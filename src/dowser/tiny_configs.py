"""The hand-written configs of the tiny models in `dowser.tiny`: one language decoder shared
by every architecture, a ViT for the vision towers, and one function per architecture that
puts them together with the tokenizer's special token ids."""

from __future__ import annotations

from transformers import (
    Idefics3Config,
    LlamaConfig,
    LlavaConfig,
    PaliGemmaConfig,
    Qwen2Config,
    Qwen2VLConfig,
)

IMAGE_SIZE = 32  # side in pixels of the square images the vision towers see
PATCH_SIZE = 8  # so an image is a 4x4 grid of patches
NUM_HEADS = 4  # attention heads of the language decoder, which has 2 key/value heads
VISION_WIDTH = 32
VISION_LAYERS = 2


def text_config(tok, vocab_size: int, hidden_size: int, num_layers: int) -> dict:
    """Language-decoder settings shared by all architectures."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=2,
        head_dim=hidden_size // NUM_HEADS,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _vit_config(vision: dict, **extra) -> dict:
    """A ViT over 8x8 patches of 32x32 images, for the CLIP, SigLIP and Idefics3 vision towers."""
    return dict(
        hidden_size=vision["width"],
        intermediate_size=2 * vision["width"],
        num_hidden_layers=vision["layers"],
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        **extra,
    )


def _llava_config(tok, text: dict, vision: dict) -> LlavaConfig:
    return LlavaConfig(
        vision_config=_vit_config(
            vision, model_type="clip_vision_model", projection_dim=vision["width"]
        ),
        text_config={"model_type": "llama", **text},
        image_token_index=tok.image_token_id,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",  # drop CLS, as the processor assumes
        vision_feature_layer=-1,  # the last layer, so that every vision weight matters
    )


def _qwen2_vl_config(tok, text: dict, vision_size: dict) -> Qwen2VLConfig:
    # M-RoPE splits each head's rotary frequencies between time, height and width; the three
    # sections must add up to head_dim / 2. Same 1/4, 3/8, 3/8 split as the real models.
    half = text["head_dim"] // 2
    t = half // 4
    h = (half - t) // 2
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [t, h, half - t - h]}
    vision = dict(
        depth=vision_size["layers"],
        embed_dim=vision_size["width"],
        hidden_size=text["hidden_size"],  # output width of the patch merger
        num_heads=2,
        mlp_ratio=2,
        patch_size=PATCH_SIZE,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return Qwen2VLConfig(
        text_config={**text, "rope_parameters": rope},
        vision_config=vision,
        image_token_id=tok.image_token_id,
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )


def _idefics3_config(tok, text: dict, vision: dict) -> Idefics3Config:
    return Idefics3Config(
        vision_config=_vit_config(vision),
        text_config={"model_type": "llama", **text},
        scale_factor=2,
        image_token_id=tok.image_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _paligemma_config(tok, text: dict, vision: dict) -> PaliGemmaConfig:
    return PaliGemmaConfig(
        vision_config=_vit_config(vision, model_type="siglip_vision_model", vision_use_head=False),
        text_config={"model_type": "gemma", **text},
        image_token_index=tok.image_token_id,
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        projection_dim=text["hidden_size"],  # the projector maps vision features to text width
    )


CONFIGS = {
    "llama": lambda tok, text, vision: LlamaConfig(**text),
    "qwen2": lambda tok, text, vision: Qwen2Config(**text),
    "llava": _llava_config,
    "qwen2_vl": _qwen2_vl_config,
    "idefics3": _idefics3_config,
    "paligemma": _paligemma_config,
}
