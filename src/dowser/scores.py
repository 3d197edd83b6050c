"""Importance scores S_ij = ||J_i|| |W_ij| |h_j|, kept as factors and formed on demand.

For each probed weight W (d_out x d_in) probing keeps K observations (psi_k, a_k, w_k):
psi_k (d_out) a sensitivity vector, a_k (d_in) a mean |input| vector, w_k the number of
(batch, probe) pairs behind them. The score is

    S = |W|^gamma * (sum_k w_k psi_k a_k^T) / sum_k w_k      (d_out, d_in), float32

with gamma = meta["weight_power"] (1, the paper's pruning score, unless the scores were probed
with another: 0 gives the drift score ||J_i|| |h_j|, the output change per unit step of W_ij
whatever its size), a rank-K sum of outer products, so nothing dense is stored: a file holds the vectors plus
metadata, and `dense(name)` forms one matrix when asked. The estimators that are not a
product of separate means ("tokenwise", "gradient") keep the whole factor matrix instead
(`Factors.full`, d_out x d_in float32: the size of the weight in fp32). Conv1D weights
(stored d_in x d_out) get their score in the same (transposed) layout as the parameter.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from dowser.errors import DowserError
from dowser.fingerprint import mismatches, parameter_values
from dowser.io import PathLike, corrupt, load_safetensors, save_safetensors
from dowser.targets import Target

FORMAT = 1


@dataclass
class Factors:
    """The K observations behind one weight's score (see module doc)."""

    psi: torch.Tensor  # (K, d_out) float32 sensitivities
    act: torch.Tensor  # (K, d_in) float32 mean |h|
    weight: torch.Tensor  # (K,) float32, observations behind each row
    full: torch.Tensor | None = None  # (d_out, d_in) float32: the factor itself, when not rank-K

    def outer(self) -> torch.Tensor:
        """(sum_k w_k psi_k a_k^T) / sum_k w_k, shape (d_out, d_in), float32 (or `full`)."""
        if self.full is not None:
            return self.full
        w = self.weight / self.weight.sum()
        return (self.psi * w[:, None]).T @ self.act


class Scores:
    """Probing results for a set of weights: `dense(name)` gives S for one of them.

    Names are parameter names as in `model.named_parameters()`. Scores returned by
    `dowser.probe` are bound to the probed model (its weights give |W|); loaded ones are bound
    with `Scores.load(path, model=...)` or `.bind(model)`, which also check that the model is
    the one that was probed.
    """

    def __init__(
        self,
        factors: dict[str, Factors],
        targets: dict[str, Target],
        meta: dict,
        fingerprints: dict[str, str],
        model: nn.Module | None = None,
    ):
        self.factors = factors
        self.targets = targets
        self.meta = meta  # estimator, counts, seed, version, ...
        self.fingerprints = fingerprints
        self._params: dict[str, torch.Tensor] | None = None
        if model is not None:
            self.bind(model, check=False)

    @property
    def names(self) -> list[str]:
        """The scored weight parameters, in model order."""
        return list(self.factors)

    def __len__(self) -> int:
        return len(self.factors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.factors)

    def __contains__(self, name: object) -> bool:
        return name in self.factors

    def __repr__(self) -> str:
        est = self.meta.get("estimator")
        return f"Scores({len(self)} weights, estimator={est!r}, bound={self._params is not None})"

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter shape of every scored weight."""
        return {n: _param_shape(t) for n, t in self.targets.items()}

    def bind(self, model: nn.Module, *, check: bool = True) -> Scores:
        """Use `model`'s weights for |W|; with `check`, refuse a model that was not probed."""
        if check:
            self.check(model)
        params = parameter_values(model)  # offloaded weights (device maps) included
        self._params = {n: params[n] for n in self.factors}
        return self

    def check(self, model: nn.Module) -> None:
        """Raise DowserError unless `model` has the probed weights (names, shapes, values)."""
        missing, wrong_shape, other = mismatches(self.fingerprints, model, self.shapes)
        problem = _describe(missing, wrong_shape, other)
        if problem:
            raise DowserError(
                f"these scores do not fit this model: they were probed on another model "
                f"({problem}); probe this model (a fine-tuned checkpoint needs its own scores) "
                "with `dowser probe` or dowser.probe"
            )

    def outer(self, name: str) -> torch.Tensor:
        """The sensitivity x activation factor without |W|, in the parameter's layout."""
        c = self._factors(name).outer()
        return c.T if self.targets[name].transposed else c

    @property
    def weight_power(self) -> float:
        """gamma in S = |W|^gamma * factor (1 unless probed with another)."""
        return float(self.meta.get("weight_power", 1.0))

    def with_weight_power(self, gamma: float) -> Scores:
        """The same probe with another gamma (no new probing: the factors do not depend on it);
        shares the factors, bound to the same model."""
        ok = isinstance(gamma, (int, float)) and not isinstance(gamma, bool)
        if not ok or not 0 <= gamma <= 4:
            raise DowserError(f"weight_power={gamma!r}: use a number in [0, 4]")
        other = Scores(
            self.factors,
            self.targets,
            {**self.meta, "weight_power": float(gamma)},
            self.fingerprints,
        )
        other._params = self._params
        return other

    def dense(self, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """S = |W|^gamma * factor for weight `name`: float32, the parameter's shape and device."""
        if weight is None:
            if self._params is None:
                raise DowserError(
                    "these scores are not bound to a model: use Scores.load(path, model=model) "
                    "or scores.bind(model), or pass weight="
                )
            weight = self._params[name]
        c = self.outer(name).to(weight.device)
        if tuple(c.shape) != tuple(weight.shape):
            raise DowserError(
                f"{name}: weight shape {tuple(weight.shape)} != score {tuple(c.shape)}"
            )
        gamma = self.weight_power
        if gamma == 0:  # a copy: the caller may change it in place
            return c.float().clone()
        w = weight.detach().abs().float()
        return (w if gamma == 1 else w.pow_(gamma)).mul_(c)

    def _factors(self, name: str) -> Factors:
        try:
            return self.factors[name]
        except KeyError:
            raise DowserError(
                f"no scores for {name!r}; scored weights look like {self.names[:3]}"
            ) from None

    def save(self, path: PathLike, *, overwrite: bool = False) -> Path:
        """Write the factors and metadata to a safetensors file (atomically)."""
        tensors = {}
        for name, f in self.factors.items():
            tensors[f"{name}::psi"] = f.psi
            tensors[f"{name}::act"] = f.act
            tensors[f"{name}::weight"] = f.weight
            if f.full is not None:
                tensors[f"{name}::full"] = f.full
        meta = {
            **self.meta,
            "kind": "scores",
            "format": FORMAT,
            "targets": {n: asdict(t) for n, t in self.targets.items()},
            "fingerprints": self.fingerprints,
        }
        return save_safetensors(tensors, path, meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: PathLike, model: nn.Module | None = None) -> Scores:
        """Read scores written by `save`; with `model`, bind to it after checking it fits.

        The file is checked first (`_check_factors`): every scored weight has a fingerprint
        and factors of matching sizes holding finite, non-negative values; a file that does
        not is refused with a DowserError naming the weight.
        """
        tensors, meta = load_safetensors(path, kind="scores")
        if meta.get("format") != FORMAT:
            raise DowserError(f"{path}: scores format {meta.get('format')} is not supported")
        try:
            targets = {str(n): Target(**t) for n, t in dict(meta.pop("targets")).items()}
            fingerprints = {str(n): str(f) for n, f in dict(meta.pop("fingerprints")).items()}
            factors = {
                n: Factors(
                    tensors[f"{n}::psi"],
                    tensors[f"{n}::act"],
                    tensors[f"{n}::weight"],
                    tensors.get(f"{n}::full"),
                )
                for n in targets
            }
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise corrupt(path, e) from None
        lacking = [n for n in targets if n not in fingerprints]
        if lacking or set(fingerprints) - set(targets):
            what = f"no fingerprint for {lacking[0]}" if lacking else "fingerprints of no target"
            raise DowserError(
                f"{path} is corrupt: {what}; it cannot be checked against a model "
                "(probe again with `dowser probe`)"
            )
        used = {f"{n}::{part}" for n in targets for part in ("psi", "act", "weight", "full")}
        if set(tensors) - used:
            extra = sorted(set(tensors) - used)[0]
            raise DowserError(f"{path} is corrupt: it holds {extra}, which no target lists")
        for n, f in factors.items():
            problem = _check_factors(f, targets[n])
            if problem:
                raise DowserError(f"{path} is corrupt: the factors of {n} {problem}")
        scores = cls(factors, targets, meta, fingerprints)
        if model is not None:
            scores.bind(model)
        return scores


def _check_factors(f: Factors, t: Target) -> str | None:
    """What is wrong with one weight's factors (see `Factors`), or None.

    psi (K, d_out), act (K, d_in), weight (K,) with K >= 1, full (d_out, d_in) or absent;
    all floating point, finite and >= 0 (the ranking assumes S >= 0), weights summing > 0.
    """
    sizes = (t.out_features, t.in_features)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in sizes):
        return f"have impossible sizes {sizes}"
    k = f.weight.shape[0] if f.weight.dim() == 1 else -1
    ok = k >= 1 and f.psi.dim() == 2 and f.act.dim() == 2
    ok = (
        ok
        and tuple(f.psi.shape) == (k, t.out_features)
        and tuple(f.act.shape) == (k, t.in_features)
    )
    ok = ok and (f.full is None or tuple(f.full.shape) == sizes)
    if not ok:
        full = "" if f.full is None else f", full {tuple(f.full.shape)}"
        return (
            f"do not match: psi {tuple(f.psi.shape)}, act {tuple(f.act.shape)}, weight "
            f"{tuple(f.weight.shape)}{full} for d_out={t.out_features}, d_in={t.in_features}"
        )
    for label, x in (("psi", f.psi), ("act", f.act), ("weight", f.weight), ("full", f.full)):
        if x is None:
            continue
        if not x.is_floating_point():
            return f"are not floating point ({label}: {x.dtype})"
        if not bool(torch.isfinite(x).all()):
            return f"hold NaN or inf ({label})"
        if bool((x < 0).any()):
            return f"hold negative values ({label}: min {float(x.min()):.3g}); scores must be >= 0"
    if not float(f.weight.sum()) > 0:
        return "have observation weights that sum to 0"
    return None


def _param_shape(t: Target) -> tuple[int, int]:
    return (t.in_features, t.out_features) if t.transposed else (t.out_features, t.in_features)


def _describe(missing: list[str], wrong_shape: list[str], other: list[str]) -> str:
    """One line naming what differs, for error messages."""
    parts = []
    for label, names in (
        ("missing weights", missing),
        ("weights of another shape", wrong_shape),
        ("weights with other values", other),
    ):
        if names:
            more = f" and {len(names) - 2} more" if len(names) > 2 else ""
            parts.append(f"{len(names)} {label} ({', '.join(names[:2])}{more})")
    return "; ".join(parts)
