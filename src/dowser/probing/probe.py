"""`dowser.probe`: score every target weight of a model once, without data.

f is the network output used for sensitivity: by default the logits at each sample's last
valid position, (B, V). Per batch one forward pass serves all `num_probes` Hutchinson probes:
each draws Rademacher xi (B, V) and backpropagates the scalar xi^T f (summed over samples)
to every target's output z only, never to parameters.

Estimators (g_t = d(xi^T f)/dz_t, h_t the input, at valid token t; S = |W| * C):
- "mean-abs" (the reference scripts, the default; also named "reference"): psi = mean over samples and tokens of
  |g_t|, with the scalar divided by the batch size B as the reference does; one psi per
  (batch, probe), paired with that batch's a = mean |h|; C averages psi a^T over all pairs.
- "rms" (the paper's equation): psi = sqrt(mean over samples, tokens and probes of g_t^2),
  which converges to sqrt(mean_t ||J_t||^2) per output unit since E[(xi^T J)^2] = ||J||^2;
  a = mean |h| over all tokens; C = psi a^T.
- "tokenwise": C = mean over tokens and probes of |g_t| |h_t|^T: the product is taken per
  token before averaging (still a sum of outer products, but kept dense: d_out x d_in fp32).
- "gradient": C = sqrt(mean over batches and probes of (sum_t g_t h_t^T)^2), the root mean
  square of d(xi^T f)/dW itself: the exact first-order per-weight sensitivity (its
  expectation over xi is sum over samples of ||J_s,ij||^2). Dense, d_out x d_in fp32.
- "activation": C = 1 a^T, a = mean |h| (no J term: what the J term adds, measured).
- "wanda": C = 1 a^T, a = sqrt(mean h^2) (Wanda's |W| ||h||, on the synthetic inputs).
- "magnitude": C = 1 (|W| alone; no forward pass).
The output head, when probed, gets psi = 1 (the reference).

f: `output` "logits" or "log-probs" (log-softmax: the sensitivity of the predicted
distribution), at `positions` "last" (each sample's last valid token, the reference) or
"all" (every valid token; the probe scalar sums over them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dowser.errors import DowserError
from dowser.fingerprint import model_fingerprints
from dowser.probing.capture import Recorder, TokenMask, recording, text_mask
from dowser.probing.outputs import probed_output, rademacher, samples_in
from dowser.probing.speech import is_speech_model
from dowser.probing.synthetic import input_device, synthetic_batches, to_model
from dowser.scores import Factors, Scores
from dowser.targets import Target, select_targets
from dowser.version import __version__

ESTIMATORS = (
    "mean-abs",
    "reference",  # the same as mean-abs: the released scripts' estimator, by that name
    "rms",
    "tokenwise",
    "gradient",
    "activation",
    "wanda",
    "magnitude",
)
OUTPUTS = ("logits", "log-probs")
_END = object()  # the end of the batches
POSITIONS = ("last", "all")


@dataclass(frozen=True)
class _Spec:
    """What an estimator gathers (see the module doc)."""

    grads: bool  # backpropagate probes (False: no J term)
    square_grads: bool = False  # rms: mean g^2 rather than mean |g|
    square_acts: bool = False  # wanda: mean h^2 rather than mean |h|
    dense: str | None = None  # "tokenwise" / "gradient": a d_out x d_in statistic
    per_batch: bool = False  # mean-abs: one (psi, a) pair per batch, as the reference


SPECS = {
    "mean-abs": _Spec(grads=True, per_batch=True),
    "reference": _Spec(grads=True, per_batch=True),
    "rms": _Spec(grads=True, square_grads=True),
    "tokenwise": _Spec(grads=True, dense="tokenwise"),
    "gradient": _Spec(grads=True, dense="gradient"),
    "activation": _Spec(grads=False),
    "wanda": _Spec(grads=False, square_acts=True),
    "magnitude": _Spec(grads=False),
}


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
    output: str = "logits",
    positions: str = "last",
    images: str = "off",
    layers: str | list[str] | None = None,
    include_lm_head: bool = True,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    weight_power: float = 1.0,
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
        estimator: "mean-abs" (reference scripts), "rms" (paper), "tokenwise", "gradient"
            (dense, exact per-weight), "activation", "wanda" or "magnitude" (module doc).
        output: "logits" or "log-probs": f is the logits or their log-softmax.
        positions: "last" (each sample's last valid token) or "all" valid tokens.
        images: "off" or "noise" (image placeholder + Gaussian-noise pixels).
        layers: None (language decoder), group names ("decoder,lm_head,encoder,vision,
            projector,all") or a regex over module paths.
        include_lm_head: also score the output head (psi = 1), unless tied to the embedding.
        output_fn: maps the model outputs to f (B, V), instead of `output` and `positions`.
        seed: seeds token draws, pixel noise, sampling and probe vectors.
        device / dtype: move / cast the model first (in place) when given. A model loaded
            with a device map (`from_pretrained(device_map="auto", ...)`, weights spread over
            GPUs, CPU and disk) is probed where it is: the scores equal an unsharded run's.
        progress: show progress bars.
        weight_power: gamma in S = |W|^gamma ||J_i|| |h_j|: 1 is the paper's score (the output
            change when W_ij is removed), 0 the drift score (the output change per unit step
            of W_ij, which is what Adam's steps of about the learning rate cause).

    Returns:
        Scores bound to `model`; `scores.dense(name)` is S for parameter `name`.
    """
    for label, value, allowed in (
        ("estimator", estimator, ESTIMATORS),
        ("output", output, OUTPUTS),
        ("positions", positions, POSITIONS),
    ):
        if value not in allowed:
            raise DowserError(f"{label}={value!r}: choose one of {', '.join(allowed)}")
    ok = isinstance(weight_power, (int, float)) and not isinstance(weight_power, bool)
    if not ok or not math.isfinite(weight_power) or not 0 <= weight_power <= 4:
        raise DowserError(
            f"weight_power={weight_power!r}: use a number in [0, 4] (1: the paper's score, "
            "0: the drift score without |W|)"
        )
    if output_fn is not None and (output, positions) != ("logits", "last"):
        raise DowserError("output_fn replaces output= and positions=: give one or the other")
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
        if estimator == "magnitude":
            batches = []  # |W| alone: nothing to run
        elif synthetic:
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
                lazy=True,  # generated while probed: one chunk in memory at a time
            )
        total = len(batches) if hasattr(batches, "__len__") else None
        # probe vectors: their own stream, the same whether the batches were made or given
        generator = torch.Generator().manual_seed(seed)
        run = _Run(targets, num_probes, estimator, generator, output_fn, (output, positions))
        if estimator != "magnitude":
            run.go(model, batches, device, progress, total)
    finally:
        model.train(was_training)
    meta = {
        "dowser_version": __version__,
        "estimator": estimator,
        "output": "custom" if output_fn is not None else output,
        "positions": "custom" if output_fn is not None else positions,
        "synthetic": synthetic,
        "num_samples": run.num_samples,
        "batch_size": batch_size if synthetic else None,
        "num_batches": run.num_batches,
        "num_probes": num_probes,
        "seq_len": seq_len if synthetic else None,
        "images": images if synthetic else None,
        "audio": "noise" if synthetic and is_speech_model(model, processor) else None,
        "seed": seed,
        "model_class": type(model).__name__,
        "weight_power": float(weight_power),
    }
    fingerprints = model_fingerprints(model, [t.param for t in targets])
    return Scores(run.factors(), {t.param: t for t in targets}, meta, fingerprints, model=model)


class _Run:
    """The probing loop and the per-target accumulators it fills."""

    def __init__(
        self,
        targets: list[Target],
        num_probes: int,
        estimator: str,
        generator: torch.Generator,
        output_fn: Callable | None = None,
        output: tuple[str, str] = ("logits", "last"),
    ):
        self.targets = targets
        self.num_probes = num_probes
        self.spec = SPECS[estimator]
        self.generator = generator
        self.output_fn = output_fn
        self.output = output
        self.num_batches = 0
        self.num_samples = 0
        # mean-abs: one (psi, a) pair per batch; the others: running sums over everything
        self.rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {
            t.param: [] for t in targets
        }
        self.sums: dict[str, list] = {t.param: [0.0, 0, 0.0, 0] for t in targets}
        self.dense: dict[str, list] = {t.param: [None, 0] for t in targets}

    def go(self, model, batches, device, progress, total) -> None:
        spec = self.spec
        with recording(
            model,
            self.targets,
            square=spec.square_grads,
            dense=spec.dense,
            grads=spec.grads,
            square_acts=spec.square_acts,
        ) as rec:
            stream = iter(tqdm(batches, total=total, desc="probing", disable=not progress))
            while True:
                # lazy synthetic batches run the model (generate) when the next one is made,
                # under these hooks: a neutral token mask then, and their sums forgotten
                rec.tokens = TokenMask()
                batch = next(stream, _END)
                if batch is _END:
                    break
                rec.reset()
                if not isinstance(batch, dict):
                    raise DowserError(
                        "each probing batch must be a dict of keyword inputs for the model"
                    )
                batch = to_model(batch, model, device)
                rec.tokens = TokenMask(text_mask(batch))
                self._batch(model, batch, rec)
                self._collect(rec)
                rec.reset()
            if spec.dense:  # the whole probe's sums, read once
                for t in self.targets:
                    if t.group != "lm_head" and spec.grads:
                        self.dense[t.param] = [
                            rec.dense_sums.get(t.module),
                            max(rec.dense_counts[t.module], 1),
                        ]
        if self.num_batches == 0:
            raise DowserError("no probing batches: `batches` was empty")

    def _batch(self, model, batch: dict, rec: Recorder) -> None:
        if not self.spec.grads:  # activations only
            with torch.no_grad():
                outputs = model(**batch)
            self.num_batches += 1
            self.num_samples += samples_in(outputs, batch)
            return
        with torch.enable_grad():
            outputs = model(**batch)
            if self.output_fn is not None:
                f = self.output_fn(outputs)
                if not isinstance(f, torch.Tensor) or f.dim() != 2:
                    raise DowserError("output_fn must return a (B, V) tensor")
                f = f.float()
                samples = f.shape[0]
            else:
                f = probed_output(outputs, batch, *self.output)
                samples = samples_in(outputs, batch)
            # the reference backpropagates (sum_b xi_b^T f_b) / B; the others keep the
            # per-sample scale (a constant factor per batch: no change to any ranking)
            scale = 1.0 / samples if self.spec.per_batch else 1.0
            for k in range(self.num_probes):
                xi = rademacher(tuple(f.shape), self.generator).to(f.device)
                rec.backward((f * xi).sum() * scale, retain_graph=k < self.num_probes - 1)
        self.num_batches += 1
        self.num_samples += samples

    def _collect(self, rec: Recorder) -> None:
        for t in self.targets:
            st = rec.stats[t.module]
            if st.act_sum is None:
                raise DowserError(
                    f"{t.module} was never called while probing; vision or encoder layers need "
                    'inputs that reach them (images="noise" or batches with pixel values)'
                )
            no_j = t.group == "lm_head" or not self.spec.grads  # psi = 1 (reference, or none)
            if no_j:
                grad_sum = torch.full((t.out_features,), float(st.act_n), device=st.act_sum.device)
                grad_n = st.act_n
            elif st.grad_sum is None:  # no path to f (or a dense estimator): zero
                grad_sum, grad_n = torch.zeros(t.out_features, device=st.act_sum.device), 1
            else:
                grad_sum, grad_n = st.grad_sum, st.grad_n
            if self.spec.per_batch:
                self.rows[t.param].append(
                    ((grad_sum / grad_n).cpu(), (st.act_sum / st.act_n).cpu())
                )
            else:
                acc = self.sums[t.param]
                acc[0] = grad_sum.cpu() + acc[0]
                acc[1] += grad_n
                acc[2] = st.act_sum.cpu() + acc[2]
                acc[3] += st.act_n

    def factors(self) -> dict[str, Factors]:
        return {t.param: self._factors(t) for t in self.targets}

    def _factors(self, t: Target) -> Factors:
        spec = self.spec
        ones = Factors(torch.ones(1, t.out_features), torch.ones(1, t.in_features), torch.ones(1))
        if self.num_batches == 0:  # magnitude: C = 1
            return ones
        no_j = t.group == "lm_head" or not spec.grads
        if spec.per_batch:
            psi, act = zip(*self.rows[t.param], strict=True)
            w = torch.full((len(psi),), float(self.num_probes))
            f = Factors(torch.stack(psi), torch.stack(act), w)
        elif spec.dense and not no_j:
            total, n = self.dense[t.param]
            if total is None:  # no path to f: zero sensitivity
                total = torch.zeros(t.out_features, t.in_features)
            full = (total / n).float().cpu()
            f = Factors(
                ones.psi, ones.act, ones.weight, full.sqrt() if spec.dense == "gradient" else full
            )
        else:
            g, gn, a, an = self.sums[t.param]
            psi = (
                ones.psi if no_j else (g / gn).sqrt()[None] if spec.square_grads else (g / gn)[None]
            )
            act = (a / an).sqrt() if spec.square_acts else a / an
            f = Factors(psi, act[None], torch.ones(1))
        finite = torch.isfinite(f.psi).all() and torch.isfinite(f.act).all()
        if not finite or (f.full is not None and not torch.isfinite(f.full).all()):
            raise DowserError(
                f"probing gave non-finite (NaN or inf) values for {t.param}: the model "
                "overflows in its dtype or its weights hold NaN; probe in float32 (--dtype float32)"
            )
        return f
