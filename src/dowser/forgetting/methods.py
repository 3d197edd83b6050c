"""Every method of the benchmark, as a way to turn the pretrained model into a fine-tuned one.

All train through `dowser.forgetting.train.train_loop` with the same steps, batches and
learning rate, on the same decoder matrices (q/k/v/o/gate/up/down of the last N layers):

    zero-shot       no fine-tuning
    full-ft         every entry of those matrices, plus the norms of those layers
    lora            PEFT LoRA on those matrices, rank chosen so that it trains about the
                    update ratio's share of their entries (r = rho * sum(m n) / sum(m + n))
    random-mask     rho of each matrix trainable, chosen at random   (norms dense, as dowser)
    magnitude-mask  the rho smallest-|W| entries trainable
    wanda-mask      the rho smallest |W| * ||h|| entries, h from the downstream training data
    dowser          the rho lowest Dowser scores (probed without data, mean-abs estimator)
    dowser-rms      the same with the paper's root-mean-square estimator
    dowser-tokenwise, dowser-gradient, dowser-all-positions, dowser-log-probs,
    dowser-activation, dowser-wanda
                    the other estimators of `dowser.probe` (the estimator study,
                    `dowser bench estimators`; see PROBED)
    dowser-data     (analysis only) dowser probed on the pretraining data instead of
                    self-generated inputs: what the synthetic probe costs
    dowser-drift, dowser-sqrt-w, dowser-gradient-drift
                    the drift scores: |W|^gamma ||J|| |h| with gamma 0 or 0.5 (the recipe
                    study, `dowser bench recipes`; see PROBED)
    dowser-task-split, dowser-task-ratio, task-gradient-mask (and -n16, -n64: fewer examples)
                    task-aware masks: dowser's scores with the task gradients of the first
                    TASK_EXAMPLES downstream training examples (see TASK_AWARE)
    dowser-random-half
                    a random rho of each matrix drawn from its half with the lowest dowser
                    scores: avoid the important entries rather than pick the least
    dowser-rows, dowser-columns
                    whole output rows / input columns with the lowest summed dowser score
    dowser-spider, random-mask-spider
                    the dowser (random) mask's entries trained with SPIDER's hooks
    dowser-soft     a soft mask: the 2 rho lowest dowser scores train, each entry's update
                    scaled by 1 - rank / n (about rho's update budget; `dowser.train.soft`)
    spider          full-ft with SPIDER's per-step interpolation back towards W0
    model-tailor    full-ft, then keep rho of each matrix's entries by Model Tailor's
                    score, revert the rest, with OBS compensation from the task inputs
    dare            full-ft, then drop each change with probability 1 - rho, rescale survivors
    grafting        full-ft, then keep the rho largest |changes| of each matrix

The three merges (`merges.py`) post-process the full-ft model of the same setting, so their
update ratio is the same rho of each matrix the masks use.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from dowser.baselines.masks import magnitude_scores, random_scores, wanda_scores
from dowser.baselines.spider import spider
from dowser.errors import DowserError
from dowser.forgetting.encode import Encoded
from dowser.forgetting.train import Examples, train_loop
from dowser.mask import Mask, build_mask
from dowser.ranking import soft_scale
from dowser.scores import Scores
from dowser.targets import _block_lists, find_decoder_layers
from dowser.train.masking import mask_gradients, prepare_model
from dowser.train.soft import UpdateScale

METHODS: tuple[str, ...] = (
    "zero-shot",
    "full-ft",
    "lora",
    "random-mask",
    "magnitude-mask",
    "wanda-mask",
    "dowser",
    "dowser-rms",
    "spider",
    "model-tailor",
    "dare",
    "grafting",
)
# masks probed by dowser.probe: method -> its arguments (dowser-data: on the pretraining mix)
PROBED = {
    "dowser": {"estimator": "mean-abs"},
    "dowser-rms": {"estimator": "rms"},
    "dowser-tokenwise": {"estimator": "tokenwise"},
    "dowser-gradient": {"estimator": "gradient"},
    "dowser-all-positions": {"estimator": "mean-abs", "positions": "all"},
    "dowser-log-probs": {"estimator": "mean-abs", "output": "log-probs"},
    "dowser-activation": {"estimator": "activation"},
    "dowser-wanda": {"estimator": "wanda"},
    "dowser-data": {"estimator": "mean-abs"},
    "dowser-drift": {"estimator": "mean-abs", "weight_power": 0.0},
    "dowser-sqrt-w": {"estimator": "mean-abs", "weight_power": 0.5},
    "dowser-gradient-drift": {"estimator": "gradient", "weight_power": 0.0},
}
TASK_EXAMPLES = 256  # downstream training examples behind a task-aware mask's gradients
# task-aware masks: method -> (build_mask's combine rule, downstream examples, pool);
# 0 examples: uniform random "task" scores, i.e. a random mask inside the pool * rho least
# important entries (data-free: avoid the important entries instead of picking the least)
TASK_AWARE = {
    "dowser-task-split": ("split", TASK_EXAMPLES, 2.0),
    "dowser-task-ratio": ("ratio", TASK_EXAMPLES, 2.0),
    "task-gradient-mask": ("task", TASK_EXAMPLES, 2.0),
    "dowser-task-split-n16": ("split", 16, 2.0),
    "dowser-task-split-n64": ("split", 64, 2.0),
    "dowser-random-half": ("split", 0, 5.0),
}
STRUCTURED = {"dowser-rows": "row", "dowser-columns": "column"}
# soft masks: method -> pool (times rho) whose entries train with update scales 1 - rank / n
SOFT = {"dowser-soft": 2.0}
# a mask's entries trained with SPIDER's pull back towards W0: method -> the mask's method
WITH_SPIDER = {"dowser-spider": "dowser", "random-mask-spider": "random-mask"}
REFRESHED = ("dowser-refresh",)  # the dowser mask re-probed during training (refresh.py)
MASKED = (
    "random-mask",
    "magnitude-mask",
    "wanda-mask",
    *PROBED,
    *TASK_AWARE,
    *STRUCTURED,
    *SOFT,
    *WITH_SPIDER,
    *REFRESHED,
)
MERGED = ("model-tailor", "dare", "grafting")
ANALYSIS = ("dowser-data",)  # rows for finding out why, not among the compared methods
# learning-rate grid factor: a masked step changes rho = 0.1 of the entries (bench doc)
LR_SCALE = {m: 10.0 for m in MASKED} | {"lora": 3.0}
WANDA_EXAMPLES = 512  # downstream training examples for Wanda's input norms


@dataclass(frozen=True)
class Setting:
    """One fine-tuning run's knobs."""

    lr: float  # peak learning rate
    last_layers: int  # tune the last N decoder layers
    update_ratio: float  # rho, the fraction of each matrix that may change
    seed: int  # data order, random masks, LoRA init, DARE's drops
    steps: int  # optimizer steps
    batch_size: int  # examples per step
    encoder_layers: int = 0  # also tune the last E encoder layers (speech models)


class ScoreBank:
    """Importance scores of the pretrained model, computed once and reused by every run.

    Dowser's scores are probed without data (self-generated text, noise images); Wanda's
    need the downstream task's inputs, so they are kept per task.
    """

    def __init__(
        self,
        base: nn.Module,
        processor,
        *,
        probe_kwargs: dict | None = None,
        pretraining: Encoded | None = None,
    ):
        self.base, self.processor = base, processor
        self.probe_kwargs = probe_kwargs or {}
        self.pretraining = pretraining  # data for dowser-data
        self._cache: dict[tuple, Scores] = {}

    def get(
        self, method: str, *, seed: int, task: str, data: Examples, layers: str | None = None
    ) -> Scores:
        """Scores for `method` (cached); `layers` as `select_targets` (None: the decoder)."""
        key = {"random-mask": (method, seed), "wanda-mask": (method, task)}.get(method, (method,))
        key = (*key, layers)
        if key not in self._cache:
            self._cache[key] = self._compute(method, seed, data, layers)
        return self._cache[key]

    def _compute(self, method: str, seed: int, data: Examples, layers: str | None) -> Scores:
        if method == "random-mask":
            return random_scores(self.base, layers, seed=seed)
        if method == "magnitude-mask":
            return magnitude_scores(self.base, layers)
        if method == "wanda-mask":
            return wanda_scores(self.base, _input_batches(data, WANDA_EXAMPLES), layers)
        if method in WITH_SPIDER:
            return self.get(WITH_SPIDER[method], seed=seed, task="", data=data, layers=layers)
        if method in TASK_AWARE or method in STRUCTURED or method in SOFT or method in REFRESHED:
            return self.get("dowser", seed=seed, task="", data=data, layers=layers)
        args = dict(PROBED[method])
        gamma = args.pop("weight_power", None)
        if gamma is not None and method != "dowser-data":
            # the same probe as the method without weight_power, with another gamma
            same = next(m for m, a in PROBED.items() if a == args and m != "dowser-data")
            scores = self.get(same, seed=seed, task="", data=data, layers=layers)
            return scores.with_weight_power(gamma)
        from dowser.probing import probe

        kwargs = {"images": "noise", "progress": False, "layers": layers, **self.probe_kwargs}
        if method == "dowser-data":
            # as many sequences as the synthetic probe uses, drawn from the pretraining mix
            n = kwargs.get("num_samples", 64)
            rows = torch.randperm(len(self.pretraining), generator=torch.Generator().manual_seed(0))
            batch = kwargs.get("batch_size", 4)
            kwargs = {k: v for k, v in kwargs.items() if k in ("num_probes", "progress", "seed")}
            kwargs["batches"] = [
                {
                    k: v
                    for k, v in self.pretraining.batch(rows[i : i + batch]).items()
                    if k != "labels"
                }
                for i in range(0, n, batch)
            ]
        return probe(self.base, processor=self.processor, **PROBED[method], **kwargs)

    def mask_options(
        self,
        method: str,
        *,
        task: str,
        data: Examples,
        layers: str | None,
        seed: int = 0,
        loss_fn=None,
    ) -> dict:
        """Extra `build_mask` arguments of `method`: the structure, or the task gradients."""
        if method in STRUCTURED:
            return {"structure": STRUCTURED[method]}
        if method not in TASK_AWARE:
            return {}
        rule, n, pool = TASK_AWARE[method]
        key = ("task-gradients", task, n, layers)
        if n == 0:
            key = ("random", seed, layers)
            if key not in self._cache:
                self._cache[key] = random_scores(self.base, layers, seed=seed)
        elif key not in self._cache:
            from dowser.probing.task import task_gradients

            n = min(n, len(data))
            batches = [data.batch(range(i, min(i + 16, n))) for i in range(0, n, 16)]
            self._cache[key] = task_gradients(self.base, batches, layers=layers, loss_fn=loss_fn)
        return {"task_scores": self._cache[key], "combine": rule, "pool": pool}


def tuned_layers(model: nn.Module, setting: Setting) -> str | None:
    """`layers` (as `select_targets`) covering what `setting` tunes: None for the decoder
    alone; with encoder layers, a pattern over the decoder's and those layers' modules."""
    if not setting.encoder_layers:
        return None
    decoder, _ = find_decoder_layers(model)
    encoder = [p for p, _ in _block_lists(model) if p != decoder]
    if not encoder:
        raise DowserError("encoder_layers: the model has no encoder block stack")
    path = max(encoder, key=lambda p: len(model.get_submodule(p)))
    depth = len(model.get_submodule(path))
    if not 1 <= setting.encoder_layers <= depth:
        raise DowserError(f"encoder_layers={setting.encoder_layers}: the encoder has {depth}")
    tail = "|".join(str(i) for i in range(depth - setting.encoder_layers, depth))
    return rf"^{re.escape(decoder)}\.|^{re.escape(path)}\.({tail})\."


def tuned_mask(model: nn.Module, setting: Setting, scores: Scores | None = None, **options) -> Mask:
    """The mask over the tuned matrices: all-trainable without `scores`; `options` go to
    `build_mask` (structure, task_scores, combine)."""
    targets = "attn,mlp,encoder" if setting.encoder_layers else "attn,mlp"
    if scores is None:
        scores = magnitude_scores(model, tuned_layers(model, setting))
        ratio = 1.0
    else:
        ratio = setting.update_ratio
    return build_mask(
        model,
        scores,
        update_ratio=ratio,
        targets=targets,
        last_layers=setting.last_layers,
        **options,
    )


def lora_rank(mask: Mask, update_ratio: float) -> int:
    """Rank whose adapters hold about `update_ratio` of the masked matrices' entries."""
    entries = sum(m.numel() for m in mask.values())
    per_rank = sum(sum(m.shape) for m in mask.values())
    return max(1, round(update_ratio * entries / per_rank))


def fine_tune(
    method: str,
    base: nn.Module,
    data: Examples,
    setting: Setting,
    *,
    bank: ScoreBank,
    task: str,
    progress: bool = False,
    loss_fn: Callable | None = None,
) -> tuple[nn.Module, list[float]]:
    """A fine-tuned copy of `base` by `method` (not a merge), and its per-step losses.

    `loss_fn(model, batch)`: the training loss (default `model(**batch).loss`)."""
    if method in MERGED or method == "zero-shot":
        raise ValueError(f"{method} does not train; see `merge`")
    model = copy.deepcopy(base)
    full = tuned_mask(model, setting)
    attach: Callable | None = None
    on_step: Callable | None = None
    if method == "lora":
        from peft import get_peft_model

        from dowser.baselines.lora import lora_config

        r = lora_rank(full, setting.update_ratio)
        torch.manual_seed(setting.seed)  # LoRA's A matrices are drawn from the global RNG
        config = lora_config(model, last_layers=setting.last_layers, r=r, alpha=2 * r)
        config.target_modules = {n.removesuffix(".weight") for n in full}
        with warnings.catch_warnings():  # peft 0.21 calls a method transformers 5.24 renamed
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing")
            model = get_peft_model(model, config)
    elif method in MASKED:
        layers = tuned_layers(model, setting)
        scores = bank.get(method, seed=setting.seed, task=task, data=data, layers=layers)
        options = bank.mask_options(method, task=task, data=data, layers=layers, loss_fn=loss_fn)
        if method in SOFT:  # the pool of entries that may move, each at its own scale
            pool = min(1.0, SOFT[method] * setting.update_ratio)
            setting = replace(setting, update_ratio=pool)
        mask = tuned_mask(model, setting, scores, **options)
        handle = mask_gradients(model, mask)
        attach = handle.attach
        if method in SOFT:
            scaler = UpdateScale(
                model, {n: soft_scale(scores.dense(n), m) for n, m in mask.items()}
            )
            attach = lambda opt: _Both(handle.attach(opt), scaler.attach(opt))  # noqa: E731
        elif method in WITH_SPIDER:
            attach = lambda opt: _Both(handle.attach(opt), spider(model, opt))  # noqa: E731
        elif method in REFRESHED:
            on_step = _refresher(method, model, handle, setting, bank, data, layers)
    else:
        prepare_model(model, full)
        if method == "spider":
            attach = lambda opt: spider(model, opt)  # noqa: E731
        elif method != "full-ft":
            raise ValueError(f"unknown method {method!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    losses = train_loop(
        model,
        params,
        data,
        steps=setting.steps,
        batch_size=setting.batch_size,
        lr=setting.lr,
        seed=setting.seed,
        attach=attach,
        loss_fn=loss_fn,
        desc=method,
        progress=progress,
        on_step=on_step,
    )
    if method == "lora":
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), losses


def _refresher(method, model, handle, setting, bank, data, layers) -> Callable:
    """on_step for a refreshed mask: the current model probed with the bank's settings."""
    from dowser.forgetting.refresh import refresher

    def build(current: nn.Module) -> Mask:
        now = ScoreBank(current, bank.processor, probe_kwargs=bank.probe_kwargs)
        return tuned_mask(
            current, setting, now.get("dowser", seed=0, task="", data=data, layers=layers)
        )

    return refresher(method, model, handle, setting.steps, build)


class _Both:
    """Two hook handles removed together."""

    def __init__(self, *handles):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _input_batches(data: Examples, n: int, size: int = 32):
    """Model inputs (no labels) of the first `n` examples of `data`, `size` at a time."""
    n = min(n, len(data))
    for i in range(0, n, size):
        batch = data.batch(range(i, min(i + size, n)))
        batch.pop("labels")
        yield batch
