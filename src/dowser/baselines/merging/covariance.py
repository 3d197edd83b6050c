"""Input covariances H = 2 X X^T / n of linear layers, the Hessians Model Tailor needs."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from dowser.errors import DowserError


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
