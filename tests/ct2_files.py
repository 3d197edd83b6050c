"""CTranslate2 model files written here, for importer tests: a Whisper model's weights under
CTranslate2's names, in its binary layout (format version 6, little-endian).

Written from the specification in `dowser.importers.ct2`'s docstring and CTranslate2's
variable names, independently of the importer's own mapping, so a round trip checks it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2}
DTYPE_CODES |= {np.dtype(np.int32): 3, np.dtype(np.float16): 4}


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_model_bin(
    path: Path,
    variables: dict[str, np.ndarray],
    *,
    spec: str = "WhisperSpec",
    version: int = 6,
    aliases: dict[str, str] | None = None,
) -> Path:
    """Write `variables` (name -> array) as a CTranslate2 model.bin."""
    out = [struct.pack("<I", version), _string(spec), struct.pack("<I", 3)]
    out.append(struct.pack("<I", len(variables)))
    for name, value in variables.items():
        value = np.ascontiguousarray(value)
        out.append(_string(name))
        out.append(struct.pack("<B", value.ndim) + struct.pack(f"<{value.ndim}I", *value.shape))
        out.append(struct.pack("<B", DTYPE_CODES[value.dtype]) + struct.pack("<I", value.nbytes))
        out.append(value.tobytes())
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out.append(_string(alias) + _string(target))
    path.write_bytes(b"".join(out))
    return path


def whisper_variables(model: torch.nn.Module, dtype=np.float32) -> dict[str, np.ndarray]:
    """A transformers Whisper's weights under CTranslate2's Whisper names (fused q/k/v)."""
    sd = {k: v.detach().numpy().astype(dtype) for k, v in model.state_dict().items()}
    cfg = model.config
    v: dict[str, np.ndarray] = {
        "decoder/activation": np.array(3, np.int8),
        "decoder/pre_norm": np.array(1, np.int8),
        "decoder/scale_embeddings": np.array(0, np.int8),
        "decoder/alibi": np.array(0, np.int8),
        "decoder/num_heads": np.array(cfg.decoder_attention_heads, np.int16),
        "encoder/num_heads": np.array(cfg.encoder_attention_heads, np.int16),
    }

    def norm(ct: str, hf: str) -> None:
        v[f"{ct}/gamma"], v[f"{ct}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def lin(ct: str, hf: str) -> None:
        v[f"{ct}/weight"], v[f"{ct}/bias"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    zeros = np.zeros(cfg.d_model, dtype)
    for side in ("encoder", "decoder"):
        hf_side = f"model.{side}"
        v[f"{side}/position_encodings/encodings"] = sd[f"{hf_side}.embed_positions.weight"]
        norm(f"{side}/layer_norm", f"{hf_side}.layer_norm")
        layers = cfg.encoder_layers if side == "encoder" else cfg.decoder_layers
        for i in range(layers):
            ct, hf = f"{side}/layer_{i}", f"{hf_side}.layers.{i}"
            att = f"{hf}.self_attn"
            v[f"{ct}/self_attention/linear_0/weight"] = np.concatenate(
                [sd[f"{att}.{p}_proj.weight"] for p in "qkv"]
            )
            v[f"{ct}/self_attention/linear_0/bias"] = np.concatenate(
                [sd[f"{att}.q_proj.bias"], zeros, sd[f"{att}.v_proj.bias"]]
            )
            lin(f"{ct}/self_attention/linear_1", f"{att}.out_proj")
            norm(f"{ct}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            if side == "decoder":
                cross = f"{hf}.encoder_attn"
                lin(f"{ct}/attention/linear_0", f"{cross}.q_proj")
                v[f"{ct}/attention/linear_1/weight"] = np.concatenate(
                    [sd[f"{cross}.k_proj.weight"], sd[f"{cross}.v_proj.weight"]]
                )
                v[f"{ct}/attention/linear_1/bias"] = np.concatenate(
                    [zeros, sd[f"{cross}.v_proj.bias"]]
                )
                lin(f"{ct}/attention/linear_2", f"{cross}.out_proj")
                norm(f"{ct}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
            lin(f"{ct}/ffn/linear_0", f"{hf}.fc1")
            lin(f"{ct}/ffn/linear_1", f"{hf}.fc2")
            norm(f"{ct}/ffn/layer_norm", f"{hf}.final_layer_norm")
    for conv in ("conv1", "conv2"):
        lin(f"encoder/{conv}", f"model.encoder.{conv}")
    v["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    return v


def write_whisper_ct2(model, processor, folder: Path, *, dtype=np.float32, **kwargs) -> Path:
    """A CTranslate2 Whisper folder (model.bin, tokenizer.json, config.json) for `model`."""
    folder.mkdir(parents=True, exist_ok=True)
    write_model_bin(
        folder / "model.bin",
        whisper_variables(model, dtype),
        aliases={"decoder/projection/weight": "decoder/embeddings/weight"},
        **kwargs,
    )
    processor.tokenizer.save_pretrained(folder / "_tok")
    (folder / "_tok" / "tokenizer.json").rename(folder / "tokenizer.json")
    eot = processor.tokenizer.eos_token_id
    config = {"suppress_ids": [3, 5], "suppress_ids_begin": [eot], "alignment_heads": [[1, 0]]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder
