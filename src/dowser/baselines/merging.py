"""Post-hoc merging baselines: fine-tune normally, then pull most of the weights back to W_pre.

All three work on named weight tensors (a `state_dict`, or any name -> tensor mapping), so they
apply to any torch model, Hugging Face or not:

    dare          delta' = m * delta / (1 - p),  m_ij ~ Bernoulli(1 - p)    (random drop + rescale)
    graft         keep the largest |delta| fine-tuned, revert the rest      (magnitude grafting)
    model_tailor  keep the entries with the best salience/sensitivity fusion score, revert the
                  rest, and let the kept ones compensate (OBS) for the reverted ones, using the
                  input covariance H = 2 X X^T / n of each linear layer on task data

with delta = W_ft - W_pre. Each returns {name: merged tensor} for the names it covers; load
it over the fine-tuned (or base) model:

    base = {n: t.clone() for n, t in base_model.state_dict().items()}
    tuned = tuned_model.state_dict()
    tuned_model.load_state_dict(dare(base, tuned, drop=0.9), strict=False)

Model Tailor first needs H for each linear layer, from forward passes on task data through
the fine-tuned model (its layer outputs W_ft X are what the compensation tries to keep):

    with InputCovariance(tuned_model) as cov:          # every nn.Linear unless names are given
        for batch in task_batches:
            cov.attention_mask = batch.get("attention_mask")  # padding does not count
            tuned_model(**batch)
    merged = model_tailor(base, tuned, cov.hessians(), keep=0.1)

H takes d_in^2 float32 per distinct layer input (q/k/v share one, gate/up share one): for a
7B decoder (d = 4096, d_ff = 11008) about 0.13 GB for attention and 0.55 GB for the MLP per
decoder layer, some 22 GB for 32 layers. There, collect the Hessians a few layers at a time
and merge those layers before collecting the next (each round runs the task batches again):

    projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    num_layers = tuned_model.config.num_hidden_layers
    merged = {}
    for first in range(0, num_layers, 4):                  # 4 layers: about 2.7 GB of H
        modules = [f"model.layers.{i}.{p}" for i in range(first, min(first + 4, num_layers))
                   for p in projections]
        with InputCovariance(tuned_model, modules) as cov:
            for batch in task_batches:
                cov.attention_mask = batch.get("attention_mask")
                tuned_model(**batch)
        merged.update(model_tailor(base, tuned, cov.hessians(), keep=0.1,
                                   names=[f"{m}.weight" for m in modules]))
        del cov                                            # frees these layers' sums
    tuned_model.load_state_dict(merged, strict=False)      # last: H is of the fine-tuned model

Which names are processed (all three): by default every name present in both mappings whose
tensors differ. Element-wise methods (dare, graft) apply to any tensor shape, but by default a
differing tensor with fewer than 2 dimensions (norm weights, biases) is returned fine-tuned,
untouched; name it in `names` to have it dropped/grafted too. Model Tailor processes only 2-D
weights (d_out x d_in, the nn.Linear layout) that have a Hessian; every other selected tensor
is returned fine-tuned. Non-floating tensors (integer buffers) are always returned fine-tuned.

Tied weights: names whose fine-tuned tensors are one tensor (same storage, offset, shape and
strides, e.g. `model.embed_tokens.weight` and `lm_head.weight` of a tied model) are merged once,
and every such name gets the same merged tensor, so loading the result cannot leave the tie
holding whichever name was loaded last. Their base tensors must be equal. DARE draws that
tensor's mask under the first of the names in sorted order; Model Tailor uses the sum of the
Hessians given under the names (a weight read by two layers answers for both outputs), and
reverts none of it when none of them has one. Base tensors are converted to the fine-tuned
tensor's dtype and device one at a time, as each is merged.

Outputs have the fine-tuned tensor's dtype and device; a tensor returned untouched is the
fine-tuned tensor itself (not a copy). Counts of kept entries are exactly round(keep * numel)
per tensor (halves round up, as in `dowser.mask`), ties broken by the lower flat index.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from dowser.errors import DowserError

__all__ = ["InputCovariance", "dare", "graft", "model_tailor"]


# --------------------------------------------------------------------------------------------
# DARE and grafting


def dare(
    base: Mapping[str, Tensor],
    tuned: Mapping[str, Tensor],
    *,
    drop: float = 0.9,
    names: Iterable[str] | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """DARE (Drop And REscale): randomly drop fine-tuning deltas and rescale the survivors.

    Per tensor, element-wise:

        delta  = W_ft - W_pre
        m_ij   ~ Bernoulli(1 - drop)                    (independent per entry)
        W_ij   = W_pre_ij + m_ij * delta_ij / (1 - drop)

    so E[W - W_pre] = delta (the rescale keeps the expected delta unbiased). Dropped entries are
    exactly W_pre; drop=0 returns the fine-tuned tensors unchanged.

    Args:
        base: name -> pretrained tensor W_pre.
        tuned: name -> fine-tuned tensor W_ft (same shapes); sets dtype and device of outputs.
        drop: probability p in [0, 1) of dropping each delta entry (DARE's default 0.9).
        names: tensors to process (see the module doc for the default).
        seed: the mask of a tensor depends only on (seed, name, shape): drawn on the CPU, so
            the same seed gives the same merged model on any device and in any name order
            (tied weights: one mask, see the module doc).

    Returns:
        name -> merged tensor, for every selected name.
    """
    p = _fraction(drop, "drop", low_open=False, high_open=True, hint="e.g. 0.9")
    out = {}
    for group, w_pre, w_ft, process in _pairs(base, tuned, names):
        if not process or p == 0.0:
            out.update((n, tuned[n]) for n in group)
            continue
        work = _work_dtype(w_ft)
        delta = w_ft.to(work) - w_pre.to(work)
        g = torch.Generator().manual_seed(_seed_for(seed, group[0]))
        survive = (torch.rand(w_ft.shape, generator=g) >= p).to(w_ft.device)
        rescaled = (w_pre.to(work) + delta / (1.0 - p)).to(w_ft.dtype)
        out.update(dict.fromkeys(group, torch.where(survive, rescaled, w_pre)))
    return out


def graft(
    base: Mapping[str, Tensor],
    tuned: Mapping[str, Tensor],
    *,
    keep: float = 0.1,
    names: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """Magnitude grafting: keep the largest fine-tuning changes, revert every other entry.

    Per tensor with k = round(keep * numel):

        delta = W_ft - W_pre
        M     = the k entries with the largest |delta| (ties: lower flat index first)
        W     = W_ft on M, W_pre elsewhere (bit-exact copies of both)

    The grafting paper can also learn M; this is its magnitude initialisation, the usual
    post-hoc baseline.

    Args:
        base: name -> pretrained tensor W_pre.
        tuned: name -> fine-tuned tensor W_ft (same shapes); sets dtype and device of outputs.
        keep: fraction in (0, 1] of each tensor's entries left fine-tuned.
        names: tensors to process (see the module doc for the default).

    Returns:
        name -> merged tensor, for every selected name.
    """
    keep = _fraction(keep, "keep", low_open=True, high_open=False, hint="e.g. 0.1")
    out = {}
    for group, w_pre, w_ft, process in _pairs(base, tuned, names):
        if not process:
            out.update((n, tuned[n]) for n in group)
            continue
        work = _work_dtype(w_ft)
        magnitude = (w_ft.to(work) - w_pre.to(work)).abs()
        kept = _top_k(magnitude, _count(keep, w_ft.numel()))
        out.update(dict.fromkeys(group, torch.where(kept, w_ft, w_pre)))
    return out


# --------------------------------------------------------------------------------------------
# Input covariance for Model Tailor


class InputCovariance:
    """Context manager collecting H = 2 X X^T / n for the inputs of nn.Linear modules.

    X (d_in x n) holds the n input vectors (tokens) a module saw during the forward passes run
    inside the `with` block; it is accumulated as a float32 sum of x x^T on the module's
    device. H is SparseGPT's / Model Tailor's layer-wise Hessian of ||W X||^2 / n with respect
    to a row of W.

        with InputCovariance(model, ["model.layers.0.mlp.down_proj"]) as cov:
            for batch in batches:
                cov.attention_mask = batch["attention_mask"]   # optional: skip padding
                model(**batch)
        hessians = cov.hessians()    # {"model.layers.0.mlp.down_proj.weight": H}

    Shared inputs. Modules that read one input tensor in a row (q/k/v of an attention layer,
    gate/up of a gated MLP) share one sum, so memory is d_in^2 floats per distinct input, not
    per module, and `hessians` returns the same H object under each of their weight names.
    An input counts as the same while it is the same memory, viewed the same way, and not
    modified in place since the first module read it; the sum is taken when a module reads
    another input, the model's forward returns, `hessians` is called or the block exits, so
    the input is kept alive until then (a reference, not a copy). A module whose group of co-readers changes between forwards
    (one skipped in some forward) still gets its exact H, from the sums of every group it was
    in. If the model modifies such an input in place before that, `hessians` or the forward
    raises a DowserError: use share_inputs=False, one sum per module taken at once (as do
    inputs made under torch.inference_mode, whose in-place changes cannot be detected; run
    the forwards under torch.no_grad() to share). For a 7B model collect a few layers at a
    time (module doc).

    Args:
        model: any torch model.
        names: module names of nn.Linear modules (as in `model.named_modules()`); None: every
            nn.Linear in the model.
        share_inputs: share one sum among modules reading one input (above).

    `attention_mask` (B, T), when set, drops padded positions from inputs shaped (B, T, d_in);
    inputs of other shapes count every row. The hooks are removed on exit, also on error.
    Attributes: `sums` (sorted tuple of the module names that read an input -> float32 sum of
    x x^T over its tokens) and `counts` (module name -> tokens it saw).
    """

    def __init__(
        self, model: nn.Module, names: Iterable[str] | None = None, *, share_inputs: bool = True
    ):
        modules = dict(model.named_modules())
        if names is None:
            names = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        elif isinstance(names, str):
            names = [names]  # a lone name, not its characters
        self.modules: dict[str, nn.Linear] = {}
        for name in names:
            module = modules.get(name)
            if not isinstance(module, nn.Linear):
                hint = ""
                if name.endswith(".weight") and isinstance(modules.get(name[:-7]), nn.Linear):
                    hint = f" (give the module name {name[:-7]!r}, not the weight's)"
                what = "not in the model" if module is None else f"a {type(module).__name__}"
                raise DowserError(f"InputCovariance: {name!r} is {what}, not an nn.Linear{hint}")
            self.modules[name] = module
        self.model = model
        self.share_inputs = share_inputs
        self.sums: dict[tuple[str, ...], Tensor] = {}
        self.counts: dict[str, int] = {n: 0 for n in self.modules}
        self.attention_mask: Tensor | None = None
        self._pending: _Input | None = None  # the input the latest module read, not yet summed
        self._handles: list = []

    def __enter__(self) -> InputCovariance:
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook_for(name)))
            self._handles.append(self.model.register_forward_hook(self._end_of_forward))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:  # never swallow the exception: returning None re-raises it
            self._flush(strict=exc_type is None)
        finally:
            self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook_for(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0].detach()
            pending = self._pending
            if pending is not None and pending.shared_with(name, x, self.attention_mask):
                pending.readers.append(name)
                return
            self._flush()
            self._pending = _Input(x, self.attention_mask, name)
            if not self.share_inputs or self._pending.version is None:
                self._flush()

        return hook

    def _end_of_forward(self, module: nn.Module, args: tuple, output) -> None:
        self._flush()

    def _flush(self, strict: bool = True) -> None:
        """Add the pending input's x x^T to the sum of the modules that read it."""
        pending = self._pending
        if pending is None:
            return
        x = pending.x
        if pending.version is not None and x._version != pending.version:
            if not strict:
                return  # already failing: keep that error
            # kept pending, so that every later use fails too rather than miss these tokens
            raise DowserError(
                f"InputCovariance: the input of {pending.readers[0]!r} was modified in place "
                "after it was read; collect with share_inputs=False"
            )
        self._pending = None
        mask = pending.mask
        if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask.to(device=x.device, dtype=torch.bool)]  # (valid tokens, d_in)
        x = x.reshape(-1, x.shape[-1]).float()
        key = tuple(sorted(pending.readers))
        if key in self.sums:
            self.sums[key].addmm_(x.T, x)  # += X X^T, with X = x.T (d_in x tokens)
        else:
            self.sums[key] = x.T @ x
        for name in pending.readers:
            self.counts[name] += x.shape[0]

    def hessians(self) -> dict[str, Tensor]:
        """Weight name ("<module>.weight") -> H = 2 X X^T / n, float32, (d_in x d_in); one
        tensor, under each name, for modules that read the same inputs.

        Modules that saw no token (e.g. a vision tower in text-only runs) are left out, so
        `model_tailor` leaves their weights fine-tuned; `counts` says how many each saw.
        """
        self._flush()
        if not any(self.counts.values()):
            raise DowserError(
                "InputCovariance: no module saw any input; run forward passes on task data "
                "inside the `with` block"
            )
        groups: dict[str, list[tuple[str, ...]]] = {n: [] for n in self.modules}
        for key in self.sums:
            for name in key:
                groups[name].append(key)
        out, made = {}, {}
        for name in self.modules:
            if not self.counts[name]:
                continue
            keys = tuple(groups[name])  # modules with the same keys saw the same tokens
            if keys not in made:
                total = self.sums[keys[0]]
                for key in keys[1:]:
                    total = total + self.sums[key]
                made[keys] = 2.0 * total / self.counts[name]
            out[f"{name}.weight"] = made[keys]
        return out


class _Input:
    """An input tensor read by one or more modules, before its x x^T is summed."""

    def __init__(self, x: Tensor, mask: Tensor | None, reader: str):
        self.x, self.mask, self.readers = x, mask, [reader]
        # None for inference tensors, which track no version: they are never shared
        self.version = None if x.is_inference() else x._version

    def shared_with(self, reader: str, x: Tensor, mask: Tensor | None) -> bool:
        """Whether module `reader` reading `x` reads this same, unchanged input anew. Holding
        self.x keeps its memory from being reused, so equal pointers mean the same memory."""
        y = self.x
        return (
            self.version is not None
            and reader not in self.readers  # a module reading twice: two inputs
            and mask is self.mask
            and not x.is_inference()
            and y._version == self.version
            and x.device == y.device
            and x.dtype == y.dtype
            and x.shape == y.shape
            and x.stride() == y.stride()
            and x.storage_offset() == y.storage_offset()
            and x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
        )


# --------------------------------------------------------------------------------------------
# Model Tailor


def model_tailor(
    base: Mapping[str, Tensor],
    tuned: Mapping[str, Tensor],
    hessians: Mapping[str, Tensor],
    *,
    keep: float = 0.1,
    block: int = 128,
    damp: float = 0.01,
    alpha: float = 0.8,
    names: Iterable[str] | None = None,
    compensate: bool = True,
) -> dict[str, Tensor]:
    """Model Tailor: keep the most useful fine-tuned entries, revert the rest, compensate.

    Per 2-D weight W (d_out x d_in) with a Hessian H (d_in x d_in), delta = W_ft - W_pre:

    1. Damping and inverse factor. Input features whose H_jj = 0 (never active) get H_jj = 1,
       then H <- H + damp * mean(diag H) * I, and U = chol(H^-1) is the upper Cholesky factor
       (H^-1 = U^T U).
    2. Score, within blocks of `block` columns [b, b + block), each z-scored per row over the
       block's columns (z(x)_rj = (x_rj - mean_j x_rj) / std_j x_rj, population std, 0 where
       a row is constant):

           S = alpha * z(|delta|) + (1 - alpha) * z(W_ft^2 / U_jj^2)

       the first term is the salience of the fine-tuning change, the second the OBS
       sensitivity of the fine-tuned weight (W^2 / [H^-1]_jj after earlier columns are fixed).
    3. Mask: the k = round(keep * numel) highest scores of the whole tensor stay fine-tuned
       (ties: lower flat index first); every other entry is reverted to W_pre.
    4. Compensation (OBS / SparseGPT, columns left to right): minimise ||(W - W_ft) X||^2 given
       the reverted entries. At column c, every reverted entry (r, c) has its current delta
       (including compensation it received from earlier columns) set to 0, and the error

           err_r = delta_rc / U_cc,    delta_rj -= err_r * U_cj   for every j > c

       flows into the not-yet-processed columns of its row. Columns are processed in blocks
       of `block` (inside a block column by column; the block's errors reach later columns
       in one matrix product), which gives the same result as one column at a time.
       Finally kept entries are W_ft + (the compensation they absorbed) and reverted entries
       are exactly W_pre. With compensate=False step 4 is skipped (plain reverting).

    Selected tensors that are not 2-D or have no entry in `hessians` are returned fine-tuned.
    Math runs in float32 (float64 for float64 weights) on the fine-tuned tensor's device.
    Tied weights are merged once, with the sum of their names' Hessians (module doc).

    Args:
        base: name -> pretrained tensor W_pre.
        tuned: name -> fine-tuned tensor W_ft (same shapes); sets dtype and device of outputs.
        hessians: weight name -> H = 2 X X^T / n of that layer's inputs on task data, e.g.
            `InputCovariance(...).hessians()`. Weights must be laid out (d_out x d_in) as in
            nn.Linear (transposed layouts such as GPT-2's Conv1D are not supported).
        keep: fraction in (0, 1] of each weight's entries left fine-tuned (paper: 0.1).
        block: columns per score block and per compensation block (paper: 128).
        damp: diagonal damping as a fraction of mean(diag H), >= 0 (paper: 0.01).
        alpha: weight of the salience term in [0, 1] (paper: 0.8).
        names: tensors to process (default: every name whose tensors differ).
        compensate: run the OBS compensation (step 4).

    Returns:
        name -> merged tensor, for every selected name.
    """
    keep = _fraction(keep, "keep", low_open=True, high_open=False, hint="e.g. 0.1")
    alpha = _fraction(alpha, "alpha", low_open=False, high_open=False, hint="e.g. 0.8")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise DowserError(f"block={block!r} must be a positive integer (columns per block)")
    if not _is_number(damp) or not math.isfinite(damp) or damp < 0:
        raise DowserError(f"damp={damp!r} must be a finite number >= 0, e.g. 0.01")
    out = {}
    for group, w_pre, w_ft, process in _pairs(base, tuned, names, any_shape=True):
        given = [n for n in group if hessians.get(n) is not None]
        if not process or w_ft.dim() != 2 or not given:
            out.update((n, tuned[n]) for n in group)
            continue
        d_in = w_ft.shape[1]
        for n in given:
            if tuple(hessians[n].shape) != (d_in, d_in):
                raise DowserError(
                    f"Hessian of {n!r} is {tuple(hessians[n].shape)} but the weight "
                    f"{tuple(w_ft.shape)} needs ({d_in}, {d_in}) = (d_in, d_in)"
                )
        h, where = hessians[given[0]], dict(device=w_ft.device, dtype=_work_dtype(w_ft))
        for n in given[1:]:  # a tied weight read by several layers: both outputs count
            h = h.to(**where) + hessians[n].to(**where)
        merged = _tailor(given[0], w_pre, w_ft, h, keep, block, damp, alpha, compensate)
        out.update(dict.fromkeys(group, merged))
    return out


def _tailor(
    name: str,
    w_pre: Tensor,
    w_ft: Tensor,
    h: Tensor,
    keep: float,
    block: int,
    damp: float,
    alpha: float,
    compensate: bool,
) -> Tensor:
    work = _work_dtype(w_ft)
    ft = w_ft.to(work)
    delta = ft - w_pre.to(work)
    u = _inverse_cholesky(name, h.to(device=w_ft.device, dtype=work), damp)
    score = _tailor_score(delta, ft, u.diagonal(), alpha, block)
    kept = _top_k(score, _count(keep, w_ft.numel()))
    if compensate:
        ft = ft + _compensation(delta, kept, u, block)
    return torch.where(kept, ft.to(w_ft.dtype), w_pre)


def _inverse_cholesky(name: str, h: Tensor, damp: float) -> Tensor:
    """Upper U with H^-1 = U^T U, after the dead-input fix and damping (step 1)."""
    if not torch.isfinite(h).all():
        raise DowserError(f"Hessian of {name!r} holds NaN or inf; collect it in float32")
    h = h.clone()
    diag = h.diagonal()  # a view: edits below change h
    diag[diag == 0] = 1.0  # an input that is always 0: its weights never matter, any pivot does
    diag.add_(damp * diag.mean())
    lower, info = torch.linalg.cholesky_ex(h)
    if info == 0:
        u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info != 0:
        raise DowserError(
            f"Hessian of {name!r} is not positive definite after damping {damp}; raise damp "
            "(e.g. 0.01) or collect it on more tokens"
        )
    return u


def _zscore_rows(x: Tensor) -> Tensor:
    """Per-row z-score over the columns of x; a constant row scores 0."""
    mean = x.mean(dim=1, keepdim=True)
    std = x.std(dim=1, keepdim=True, correction=0)
    return torch.where(std > 0, (x - mean) / std, torch.zeros_like(x))


def _tailor_score(delta: Tensor, ft: Tensor, u_diag: Tensor, alpha: float, block: int) -> Tensor:
    """S = alpha z(|delta|) + (1 - alpha) z(W_ft^2 / U_jj^2), z per row within each block."""
    sensitivity = ft.square() / u_diag.square()[None, :]
    score = torch.empty_like(delta)
    for b in range(0, delta.shape[1], block):
        cols = slice(b, b + block)
        salience_z = _zscore_rows(delta[:, cols].abs())
        score[:, cols] = alpha * salience_z + (1 - alpha) * _zscore_rows(sensitivity[:, cols])
    return score


def _compensation(delta: Tensor, kept: Tensor, u: Tensor, block: int) -> Tensor:
    """What each entry absorbs from the OBS updates of the reverted entries (step 4).

    Tracks comp (d_out x d_in) with current delta = delta + comp; meaningful on kept entries
    (reverted ones end at W_pre whatever comp holds there). Exactly 0 where no entry to its
    left in the row is reverted, so keep=1 returns W_ft bit-exactly.
    """
    d_in = delta.shape[1]
    revert = ~kept
    comp = torch.zeros_like(delta)
    for b in range(0, d_in, block):
        e = min(b + block, d_in)
        cur = delta[:, b:e] + comp[:, b:e]  # current deltas of this block's columns
        errs = torch.zeros_like(cur)  # err_r for each column of the block
        for i in range(e - b):
            c = b + i
            err = torch.where(revert[:, c], cur[:, i] / u[c, c], torch.zeros_like(cur[:, i]))
            cur[:, i + 1 :] -= err[:, None] * u[c, c + 1 : e][None, :]  # j > c inside the block
            errs[:, i] = err
        comp[:, b:e] = cur - delta[:, b:e]
        comp[:, e:] -= errs @ u[b:e, e:]  # j >= e: the whole block's errors in one product
    return comp


# --------------------------------------------------------------------------------------------
# Shared helpers


def _pairs(
    base: Mapping[str, Tensor],
    tuned: Mapping[str, Tensor],
    names: Iterable[str] | None,
    *,
    any_shape: bool = False,
) -> Iterator[tuple[tuple[str, ...], Tensor, Tensor, bool]]:
    """(names, W_pre on W_ft's device/dtype, W_ft, process?) per distinct fine-tuned tensor.

    `names` holds every selected name whose fine-tuned tensor is this one (several for tied
    weights), sorted: the first stands for them all. Every name is checked first; then the
    base tensors are converted one at a time as the caller asks for the next, so no second
    copy of the whole model is held. process is False for non-floating tensors and, unless
    named explicitly (or any_shape), for tensors with fewer than 2 dimensions: those are
    returned fine-tuned.
    """
    explicit = names is not None
    if isinstance(names, str):
        names = [names]  # a lone name, not its characters
    candidates = list(dict.fromkeys(names)) if explicit else [n for n in tuned if n in base]
    groups: dict[tuple, list[str]] = {}
    for name in candidates:
        if name not in tuned or name not in base:
            where = "the fine-tuned" if name not in tuned else "the base"
            raise DowserError(f"{name!r} is not in {where} tensors; check `names`")
        w_ft, w_pre = tuned[name], base[name]
        if tuple(w_pre.shape) != tuple(w_ft.shape):
            raise DowserError(
                f"shape mismatch for {name!r}: base {tuple(w_pre.shape)} vs fine-tuned "
                f"{tuple(w_ft.shape)}; base and tuned must come from the same architecture"
            )
        groups.setdefault(_identity(w_ft), []).append(name)
    return _converted(base, tuned, [sorted(g) for g in groups.values()], explicit, any_shape)


def _converted(
    base: Mapping[str, Tensor],
    tuned: Mapping[str, Tensor],
    groups: list[list[str]],
    explicit: bool,
    any_shape: bool,
) -> Iterator[tuple[tuple[str, ...], Tensor, Tensor, bool]]:
    """The generator behind `_pairs`, after its checks."""
    for group in groups:
        w_ft = tuned[group[0]]
        w_pre = base[group[0]].to(device=w_ft.device, dtype=w_ft.dtype)
        for other in group[1:]:
            b = base[other]
            if _identity(b) != _identity(base[group[0]]) and not torch.equal(
                b.to(device=w_ft.device, dtype=w_ft.dtype), w_pre
            ):
                raise DowserError(
                    f"{group[0]!r} and {other!r} are one fine-tuned tensor (tied weights) but "
                    "their base tensors differ; merge them separately (clone one of them)"
                )
        if not explicit and torch.equal(w_pre, w_ft):
            continue  # default: only tensors the fine-tune changed
        process = w_ft.is_floating_point() and (explicit or any_shape or w_ft.dim() >= 2)
        yield tuple(group), w_pre, w_ft, process
        del w_pre  # the caller holds it until it asks for the next one, no longer


def _identity(t: Tensor) -> tuple:
    """Equal for two tensors exactly when they view the same memory the same way (tied
    weights); tensors without ordinary memory (empty, sparse, meta) are only themselves."""
    if t.layout != torch.strided or t.numel() == 0 or t.device.type == "meta":
        return ("object", id(t))
    return (
        t.device,
        t.dtype,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        t.stride(),
    )


def _top_k(score: Tensor, k: int) -> Tensor:
    """Bool mask of the k largest scores; ties at the threshold go to lower flat indices."""
    flat = score.reshape(-1)
    n = flat.numel()
    if k <= 0 or k >= n:
        return torch.full_like(score, k > 0, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest value
    above = flat > threshold
    tied = flat == threshold
    room = k - above.sum()  # how many of the tied entries still fit, in index order
    keep = above | (tied & (torch.cumsum(tied, 0) <= room))
    return keep.reshape(score.shape)


def _count(fraction: float, numel: int) -> int:
    """round(fraction * numel), halves up (Python's round() sends 2.5 to 2), as dowser.mask."""
    return int(math.floor(fraction * numel + 0.5))


def _work_dtype(t: Tensor) -> torch.dtype:
    """float32 for half-precision weights (deltas lose bits in bf16), else their own."""
    return torch.promote_types(t.dtype, torch.float32)


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"dare:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fraction(x: float, what: str, *, low_open: bool, high_open: bool, hint: str) -> float:
    """Check 0 (<)<= x (<)<= 1 and return it as a float; DowserError naming `what` otherwise."""
    ok = _is_number(x) and math.isfinite(x)
    ok = ok and (x > 0 if low_open else x >= 0) and (x < 1 if high_open else x <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise DowserError(f"{what}={x!r} is outside {interval}; {hint}")
    return float(x)
