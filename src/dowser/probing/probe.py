"""`dowser.probe`: score every target weight of a model once, without data.

f is the network output used for sensitivity: by default the logits at each sample's last
valid position, (B, V). Per batch one forward pass serves all `num_probes` Hutchinson probes:
each draws Rademacher xi (B, V) and backpropagates the scalar xi^T f (summed over samples)
to every target's output z only, never to parameters.

Estimators of the sensitivity psi (d_out) of z:
- "mean-abs" (the reference scripts): psi = mean over samples and tokens of |d(xi^T f)/dz|,
  with the scalar divided by the batch size B as the reference does; one psi per (batch,
  probe), paired with that batch's a = mean |h|; S averages psi a^T over all pairs.
- "rms" (the paper's equation): psi = sqrt(mean over samples, tokens and probes of
  (d(xi^T f)/dz)^2), which converges to sqrt(mean_t ||J_t||^2) per output unit since
  E[(xi^T J)^2] = ||J||^2; a = mean |h| over all tokens; S = |W| * psi a^T.
The output head, when probed, gets psi = 1 (the reference).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dowser.errors import DowserError
from dowser.fingerprint import model_fingerprints
from dowser.probing.capture import Recorder, TokenMask, recording
from dowser.probing.synthetic import input_device, synthetic_batches, to_model
from dowser.scores import Factors, Scores
from dowser.targets import Target, select_targets
from dowser.version import __version__

ESTIMATORS = ("mean-abs", "rms")


def probe(
    model: nn.Module,
    *,
    tokenizer: Any = None,
    processor: Any = None,
    batches: Iterable[dict] | None = None,
    num_samples: int = 64,
    batch_size: int = 4,
    num_probes: int = 8,
    seq_len: int = 64,
    estimator: str = "mean-abs",
    images: str = "off",
    layers: str | list[str] | None = None,
    include_lm_head: bool = True,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Scores:
    """Probe `model` and return its importance scores (see the module doc for the math).

    Args:
        model: a Hugging Face model (synthetic probing needs `generate`) or any nn.Module
            (then pass `batches`).
        tokenizer / processor: the model's; used to draw random tokens and, with
            images="noise", to build the image placeholder. Optional for text models.
        batches: probe on these keyword dicts for `model(**batch)` instead of synthetic data
            (the user's data, any modality, encoder-decoder models).
        num_samples, batch_size, seq_len: synthetic data size (reference: 64, 4, 64).
        num_probes: Hutchinson probes per batch (reference: 8).
        estimator: "mean-abs" (reference scripts) or "rms" (paper).
        images: "off" or "noise" (image placeholder + Gaussian-noise pixels).
        layers: None (language decoder), group names ("decoder,lm_head,encoder,vision,
            projector,all") or a regex over module paths.
        include_lm_head: also score the output head (psi = 1), unless tied to the embedding.
        output_fn: maps the model outputs to f (B, V); default last-position logits.
        seed: seeds token draws, pixel noise, sampling and probe vectors.
        device / dtype: move / cast the model first (in place) when given. A model loaded
            with a device map (`from_pretrained(device_map="auto", ...)`, weights spread over
            GPUs, CPU and disk) is probed where it is: the scores equal an unsharded run's.
        progress: show progress bars.

    Returns:
        Scores bound to `model`; `scores.dense(name)` is S for parameter `name`.
    """
    if estimator not in ESTIMATORS:
        raise DowserError(f"estimator={estimator!r}: choose one of {', '.join(ESTIMATORS)}")
    for label, value in (
        ("num_samples", num_samples),
        ("batch_size", batch_size),
        ("num_probes", num_probes),
    ):
        if not isinstance(value, int) or value < 1:
            raise DowserError(f"{label}={value!r}: must be a positive integer")
    if device is not None or dtype is not None:
        if getattr(model, "hf_device_map", None):
            raise DowserError(
                "this model was placed with a device map: probe it where it is (give no device "
                "or dtype; choose them when loading it)"
            )
        model.to(device=device, dtype=dtype)
    device = input_device(model)
    targets = select_targets(model, layers, include_lm_head=include_lm_head)
    synthetic = batches is None
    was_training = model.training
    model.eval()
    try:
        if synthetic:
            batches = synthetic_batches(
                model,
                tokenizer=tokenizer,
                processor=processor,
                num_samples=num_samples,
                batch_size=batch_size,
                seq_len=seq_len,
                images=images,
                seed=seed,
                progress=progress,
            )
        total = len(batches) if hasattr(batches, "__len__") else None
        # probe vectors: their own stream, the same whether the batches were made or given
        generator = torch.Generator().manual_seed(seed)
        run = _Run(targets, num_probes, estimator, output_fn, generator)
        run.go(model, batches, device, progress, total)
    finally:
        model.train(was_training)
    meta = {
        "dowser_version": __version__,
        "estimator": estimator,
        "synthetic": synthetic,
        "num_samples": run.num_samples,
        "batch_size": batch_size if synthetic else None,
        "num_batches": run.num_batches,
        "num_probes": num_probes,
        "seq_len": seq_len if synthetic else None,
        "images": images if synthetic else None,
        "seed": seed,
        "model_class": type(model).__name__,
    }
    fingerprints = model_fingerprints(model, [t.param for t in targets])
    return Scores(run.factors(), {t.param: t for t in targets}, meta, fingerprints, model=model)


def peak_memory() -> dict[str, int]:
    """Peak memory of this process so far, in bytes: {"cuda:0": ..., "host": ...}.

    GPUs: the most ever allocated by torch on each; host: the peak resident set (Linux).
    """
    import resource

    peaks = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            peaks[f"cuda:{i}"] = torch.cuda.max_memory_allocated(i)
    peaks["host"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return peaks


def last_logits(outputs: Any, batch: dict) -> torch.Tensor:
    """Logits at each sample's last valid position, (B, V).

    The last valid position is the last 1 of the attention mask (left or right padding);
    when no mask matches the logits (encoder-decoder, no mask), it is the last position.
    """
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise DowserError(
            "cannot find (B, T, V) logits in the model outputs; pass output_fn=... that maps "
            "the outputs to the (B, V) tensor to probe"
        )
    mask = batch.get("decoder_attention_mask", batch.get("attention_mask"))
    b, t, _ = logits.shape
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == (b, t):
        # index of the last 1 in each row: T - 1 - (first 1 in the flipped row)
        last = t - 1 - mask.flip(1).to(torch.long).argmax(1)
    else:
        last = torch.full((b,), t - 1, dtype=torch.long)
    return logits[torch.arange(b, device=logits.device), last.to(logits.device)]


def rademacher(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Entries +1 or -1 with equal probability (drawn on the CPU: same on every device)."""
    return torch.randint(0, 2, shape, generator=generator).mul_(2).sub_(1).float()


class _Run:
    """The probing loop and the per-target accumulators it fills."""

    def __init__(
        self, targets: list[Target], num_probes: int, estimator: str, output_fn, generator
    ):
        self.targets = targets
        self.num_probes = num_probes
        self.rms = estimator == "rms"
        self.output_fn = output_fn
        self.generator = generator
        self.num_batches = 0
        self.num_samples = 0
        # mean-abs: one (psi, a) pair per batch; rms: running sums over everything
        self.rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {
            t.param: [] for t in targets
        }
        self.sums: dict[str, list] = {t.param: [0.0, 0, 0.0, 0] for t in targets}

    def go(self, model, batches, device, progress, total) -> None:
        with recording(model, self.targets, square=self.rms) as rec:
            for batch in tqdm(batches, total=total, desc="probing", disable=not progress):
                if not isinstance(batch, dict):
                    raise DowserError(
                        "each probing batch must be a dict of keyword inputs for the model"
                    )
                batch = to_model(batch, model, device)
                rec.tokens = TokenMask(batch.get("attention_mask"))
                self._batch(model, batch, rec)
                self._collect(rec)
                rec.reset()
        if self.num_batches == 0:
            raise DowserError("no probing batches: `batches` was empty")

    def _batch(self, model, batch: dict, rec: Recorder) -> None:
        with torch.enable_grad():
            outputs = model(**batch)
            f = self.output_fn(outputs) if self.output_fn else last_logits(outputs, batch)
            if not isinstance(f, torch.Tensor) or f.dim() != 2:
                raise DowserError("output_fn must return a (B, V) tensor")
            f = f.float()
            # the reference backpropagates (sum_b xi_b^T f_b) / B; rms keeps per-sample scale
            scale = 1.0 if self.rms else 1.0 / f.shape[0]
            for k in range(self.num_probes):
                xi = rademacher(tuple(f.shape), self.generator).to(f.device)
                rec.backward((f * xi).sum() * scale, retain_graph=k < self.num_probes - 1)
        self.num_batches += 1
        self.num_samples += f.shape[0]

    def _collect(self, rec: Recorder) -> None:
        for t in self.targets:
            st = rec.stats[t.module]
            if st.act_sum is None:
                raise DowserError(
                    f"{t.module} was never called while probing; vision or encoder layers need "
                    'inputs that reach them (images="noise" or batches with pixel values)'
                )
            if t.group == "lm_head":  # psi = 1 (reference)
                grad_sum = torch.full((t.out_features,), float(st.act_n), device=st.act_sum.device)
                grad_n = st.act_n
            elif st.grad_sum is None:  # no path to f: zero sensitivity
                grad_sum, grad_n = torch.zeros(t.out_features, device=st.act_sum.device), 1
            else:
                grad_sum, grad_n = st.grad_sum, st.grad_n
            if self.rms:
                acc = self.sums[t.param]
                acc[0] = grad_sum.cpu() + acc[0]
                acc[1] += grad_n
                acc[2] = st.act_sum.cpu() + acc[2]
                acc[3] += st.act_n
            else:
                self.rows[t.param].append(
                    ((grad_sum / grad_n).cpu(), (st.act_sum / st.act_n).cpu())
                )

    def factors(self) -> dict[str, Factors]:
        out = {}
        for t in self.targets:
            if self.rms:
                g, gn, a, an = self.sums[t.param]
                psi = (
                    (g / gn).sqrt()[None] if t.group != "lm_head" else torch.ones(1, t.out_features)
                )
                f = Factors(psi, (a / an)[None], torch.ones(1))
            else:
                psi, act = zip(*self.rows[t.param], strict=True)
                w = torch.full((len(psi),), float(self.num_probes))
                f = Factors(torch.stack(psi), torch.stack(act), w)
            if not (torch.isfinite(f.psi).all() and torch.isfinite(f.act).all()):
                raise DowserError(
                    f"probing gave non-finite (NaN or inf) values for {t.param}: the model "
                    "overflows in its dtype or its weights hold NaN; probe in float32 (--dtype float32)"
                )
            out[t.param] = f
        return out
