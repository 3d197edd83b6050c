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

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from dowser.errors import DowserError
from dowser.probing.prompts import _image_prefix, _tokenizer_of, _vocabulary

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

    Returns the samples and the pad id to batch them with. `SampleStream` gives the same
    samples one generation chunk at a time, in bounded memory.
    """
    stream = SampleStream(
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
    bar = tqdm(stream, total=num_samples, desc="generating probes", disable=not progress)
    return list(bar), stream.pad


class SampleStream:
    """The samples of `synthetic_samples`, generated GENERATION_CHUNK at a time when iterated
    (each iteration gives the same samples): memory stays that of one chunk whatever
    `num_samples` (at most MAX_SAMPLES).

    The random stream is the one of drawing every prompt first: all prompts, then the seed of
    `generate`'s sampling, from `generator`. Construction replays the prompt draws without
    keeping them (to reach that seed and leave `generator` where drawing them leaves it);
    iteration draws them again, chunk by chunk, from a copy of the starting state.
    """

    def __init__(
        self,
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
    ):
        check_num_samples(num_samples)
        if not hasattr(model, "generate"):
            raise DowserError(
                "synthetic probing needs a model that can generate (a Hugging Face generative "
                "model); for other models pass batches=..."
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
        self.allowed, special, bos, self.eos, self.pad = _vocabulary(model, tok)
        # Sampling may emit any ordinary token or EOS, never an image placeholder, BOS or pad.
        self.suppress = [i for i in special if i != self.eos]
        if images == "noise":
            self.prefix, self.prefix_per_token, self.image = _image_prefix(processor)
        else:
            self.prefix, self.prefix_per_token, self.image = (
                ([bos] if bos is not None else []),
                {},
                {},
            )
        # seq_len counts text tokens: BOS and text, not the image placeholder's expansion.
        n_text_prefix = int(bos is not None and len(self.prefix) > 0 and self.prefix[0] == bos)
        self.total_len = len(self.prefix) - n_text_prefix + seq_len
        self.model, self.device, self.num_samples = model, device, num_samples
        self.start_state = generator.get_state()
        many = progress and num_samples > 10 * GENERATION_CHUNK**2
        for _ in tqdm(range(num_samples), desc="drawing prompts", disable=not many, leave=False):
            self._prompt(generator)
        self.seed = int(torch.randint(2**31 - 1, (1,), generator=generator))

    def __len__(self) -> int:
        return self.num_samples

    def _prompt(self, generator: torch.Generator) -> Sample:
        """BOS (or the image prefix) + 1..5 random ordinary tokens, and fresh pixel noise."""
        k = int(torch.randint(MIN_PROMPT, MAX_PROMPT + 1, (1,), generator=generator))
        pick = self.allowed[torch.randint(len(self.allowed), (k,), generator=generator)].tolist()
        ids = (self.prefix + pick)[: self.total_len]
        per_token = {key: v + [_fill(key, v)] * k for key, v in self.prefix_per_token.items()}
        per_token = {key: v[: len(ids)] for key, v in per_token.items()}
        image = {
            key: torch.randn(v.shape, generator=generator) if key == "pixel_values" else v.clone()
            for key, v in self.image.items()
        }
        return Sample(ids, per_token, image)

    def __iter__(self) -> Iterator[Sample]:
        prompts = torch.Generator().set_state(self.start_state)
        devices = [self.device] if self.device.type == "cuda" else []
        rng = None  # generate()'s global RNG state between chunks (the caller's is kept)
        for start in range(0, self.num_samples, GENERATION_CHUNK):
            n = min(GENERATION_CHUNK, self.num_samples - start)
            chunk = [self._prompt(prompts) for _ in range(n)]
            with torch.random.fork_rng(devices=devices):
                if rng is None:
                    torch.manual_seed(self.seed)  # generate() samples from the global RNG
                else:
                    _set_rng(rng, devices)
                done = _continue(
                    self.model,
                    chunk,
                    self.total_len,
                    self.eos,
                    self.pad,
                    self.suppress,
                    self.device,
                )
                rng = _get_rng(devices)
            yield from done


MAX_SAMPLES = 1_000_000  # synthetic sequences per probe (the reference uses 64)
# speech samples are all made up front (probing/speech.py), each with its log-mel window
# (Whisper large: 128 x 3000 float32 = 1.5 MB): 4,096 of them hold about 6 GB
MAX_SPEECH_SAMPLES = 4096


def check_num_samples(num_samples: int, limit: int = MAX_SAMPLES) -> None:
    """Refuse a sample count that is not an integer in [1, limit]."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise DowserError(f"num_samples={num_samples!r}: must be a positive integer")
    if not 1 <= num_samples <= limit:
        raise DowserError(
            f"num_samples={num_samples:,}: use 1 to {limit:,} synthetic sequences (the "
            "reference uses 64)"
        )


def _get_rng(devices: list) -> list[torch.Tensor]:
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in devices)]


def _set_rng(states: list[torch.Tensor], devices: list) -> None:
    torch.set_rng_state(states[0])
    for d, state in zip(devices, states[1:], strict=True):
        torch.cuda.set_rng_state(state, d)


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


def probe_batches(samples: Iterable[Sample], batch_size: int, pad: int) -> Iterator[dict]:
    """Right-padded model inputs (on the CPU), `batch_size` samples at a time, in order."""
    chunk: list[Sample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == batch_size:
            yield _pad(chunk, max(len(s.ids) for s in chunk), pad=pad, left=False)
            chunk = []
    if chunk:
        yield _pad(chunk, max(len(s.ids) for s in chunk), pad=pad, left=False)


class LazyBatches:
    """Probing batches made while iterated (`probe_batches` over a `SampleStream`): the
    memory of one generation chunk, however many samples. Sized; each iteration gives the
    same batches."""

    def __init__(self, stream: SampleStream, batch_size: int):
        self.stream, self.batch_size = stream, batch_size

    def __len__(self) -> int:
        return -(-len(self.stream) // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        return probe_batches(self.stream, self.batch_size, self.stream.pad)


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
    lazy: bool = False,
) -> list[dict] | LazyBatches:
    """The self-generated probing batches `dowser.probe` uses, as a list of model inputs
    (`lazy`: a `LazyBatches`, generated while iterated, as `dowser.probe` takes them).

    For baselines that need activations without data (e.g. a Wanda mask) on the same inputs.
    A speech encoder-decoder (Whisper, with its processor) gets noise audio and its own text
    (`dowser.probing.speech`): all its samples are made up front (at most MAX_SPEECH_SAMPLES).
    """
    device = input_device(model)
    generator = torch.Generator().manual_seed(seed)
    from dowser.probing.speech import is_speech_model, speech_batches, speech_samples

    if is_speech_model(model, processor):  # noise audio + the decoder's own text
        check_num_samples(num_samples, MAX_SPEECH_SAMPLES)
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
    stream = SampleStream(
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
    batches = LazyBatches(stream, batch_size)
    return batches if lazy else list(batches)
