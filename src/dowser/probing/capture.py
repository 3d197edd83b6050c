"""Hooks that gather, for every target linear z = W h, the statistics the score needs.

Per forward pass:  a = mean |h| over valid tokens                      (d_in,)
Per backward pass: psi = mean |dL/dz| or mean (dL/dz)^2 over tokens    (d_out,)

or, for the estimators that do not factor into separate means (`dense`), per backward pass
with g_t = dL/dz_t and h_t the inputs of the same forward (valid tokens t only):

    "tokenwise": sum_t |g_t| |h_t|^T                                     (d_out, d_in)
    "gradient":  (sum_t g_t h_t^T)^2, the square of dL/dW itself          (d_out, d_in)

Gradients are taken only with respect to layer outputs, never parameters: every parameter is
set to requires_grad=False for the duration, and each target's output gets `+ zero`, a 0-dim
leaf that requires grad, so that one `torch.autograd.grad(scalar, zero)` walks the whole graph
and fires a tensor hook on every output. Each hook reduces its gradient to a d_out vector at
once, so no gradient larger than one layer's output ever lives at the same time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from dowser.targets import Target


@dataclass
class Stats:
    """Running sums for one target. All float32, on the target's device."""

    act_sum: torch.Tensor | None = None  # (d_in,) sum of |h| over tokens this batch
    act_n: int = 0  # tokens summed into act_sum
    grad_sum: torch.Tensor | None = None  # (d_out,) sum of |g| or g^2 over tokens and probes
    grad_n: int = 0  # token-probe observations summed into grad_sum


def is_text_layer(target: Target) -> bool:
    """Layers that see the text sequence, where padding tokens must be left out."""
    return target.group in ("decoder", "lm_head")


def text_mask(batch: dict) -> torch.Tensor | None:
    """The (B, T) mask of the text tokens: the decoder's in an encoder-decoder batch."""
    mask = batch.get("decoder_attention_mask")
    return mask if mask is not None else batch.get("attention_mask")


class TokenMask:
    """The current batch's valid (non-padding) tokens, (B, T), for means over tokens.

    The count is read once per batch and float copies are made once per device, so hooks
    never wait on the GPU.
    """

    def __init__(self, mask: torch.Tensor | None = None):
        self.mask = mask
        self.count = int(mask.sum()) if mask is not None else 0
        self._float: dict[torch.device, torch.Tensor] = {}
        self._index: dict[torch.device, torch.Tensor] = {}

    def sum(self, x: torch.Tensor, *, masked: bool = True) -> tuple[torch.Tensor, int]:
        """Sum of x over all leading dims (float32) and the number of rows summed.

        With `masked` (language-model layers) the mask applies when x is (B, T, d); vision
        and other encoder inputs (`masked=False`, or other shapes) are summed over everything,
        even when their patch count happens to equal the text length.
        """
        fits = (
            self.mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(self.mask.shape)
        )
        if masked and fits:
            m = self._float.get(x.device)
            if m is None:
                m = self._float[x.device] = self.mask.to(device=x.device, dtype=torch.float32)
            return torch.einsum("btd,bt->d", x.float(), m), self.count
        flat = x.reshape(-1, x.shape[-1])
        return flat.sum(0, dtype=torch.float32), flat.shape[0]

    def rows(self, x: torch.Tensor, *, masked: bool = True) -> torch.Tensor:
        """The valid tokens' rows of x as (N, d) float32 (all rows where `sum` takes all)."""
        fits = (
            self.mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(self.mask.shape)
        )
        if masked and fits:
            idx = self._index.get(x.device)
            if idx is None:  # flat positions of valid tokens, once per device (no GPU sync)
                flat = self.mask.reshape(-1).nonzero().squeeze(1)
                idx = self._index[x.device] = flat.to(x.device)
            return x.reshape(-1, x.shape[-1]).index_select(0, idx).float()
        return x.reshape(-1, x.shape[-1]).float()


class Recorder:
    """Collects activation and output-gradient statistics for `targets` (see module doc).

    Use through `recording(model, targets, square=...)`, which registers and always removes
    the hooks. Before each forward set `tokens = TokenMask(attention_mask)`.
    """

    def __init__(
        self,
        targets: Sequence[Target],
        square: bool,
        *,
        dense: str | None = None,
        grads: bool = True,
        square_acts: bool = False,
    ):
        self.targets = list(targets)
        self.square_acts = square_acts  # accumulate h^2 (wanda) instead of |h|
        # dense estimators: one running (d_out, d_in) sum per target over the whole probe
        # (kept across batches, so one accumulator per weight ever lives), and its count
        self.dense_sums: dict[str, torch.Tensor] = {}
        self.dense_counts: dict[str, int] = {t.module: 0 for t in self.targets}
        self.square = square  # accumulate g^2 (rms) instead of |g| (mean-abs)
        self.dense = dense  # None, "tokenwise" or "gradient" (see module doc)
        self.grads = grads  # False: activations only, no output gradients
        self.stats = {t.module: Stats() for t in self.targets}
        self.tokens = TokenMask()
        # (data_ptr, shape) of this batch's encoder output (encoder-decoders): a text layer
        # fed with it (cross-attention k/v) sees encoder rows, never masked by the text mask
        self.encoder_output: tuple[int, tuple[int, ...]] | None = None
        # the leaves every output hangs from, one per device (no cross-device grads)
        self.zeros: dict[torch.device, torch.Tensor] = {}

    def _zero(self, device: torch.device) -> torch.Tensor:
        if device not in self.zeros:
            self.zeros[device] = torch.zeros((), device=device, requires_grad=True)
        return self.zeros[device]

    def encoder_hook(self, module: nn.Module, args: tuple, output) -> None:
        """Remember the encoder's output, so `forward_hook` can tell encoder states apart."""
        state = output
        if isinstance(output, (tuple, list, dict)):  # tuples, ModelOutput (a dict, indexable)
            state = output[0] if len(output) else None
        if isinstance(state, torch.Tensor):
            self.encoder_output = (state.data_ptr(), tuple(state.shape))

    def _is_text(self, target: Target, h) -> bool:
        """Whether h is on the text sequence: a text layer's input that is not the encoder's
        output (equal lengths would otherwise let the text mask fall on encoder rows)."""
        if not is_text_layer(target):
            return False
        enc = self.encoder_output
        return not (isinstance(h, torch.Tensor) and enc == (h.data_ptr(), tuple(h.shape)))

    def forward_hook(self, target: Target):
        # the reference fixes the head's psi to 1
        want_grad = self.grads and target.group != "lm_head"

        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            stats = self.stats[target.module]  # looked up per call: reset() replaces it
            h = args[0] if args else None
            masked = self._is_text(target, h)
            if isinstance(h, torch.Tensor):
                h_stat = h.detach().float().square() if self.square_acts else h.detach().abs()
                s, n = self.tokens.sum(h_stat, masked=masked)
                stats.act_sum = s if stats.act_sum is None else stats.act_sum + s
                stats.act_n += n
            if not want_grad or not torch.is_grad_enabled():
                return None
            inputs = None  # this call's inputs, for the dense estimators' per-token products
            if self.dense and isinstance(h, torch.Tensor):
                inputs = self.tokens.rows(h.detach(), masked=masked)
                inputs = inputs.abs() if self.dense == "tokenwise" else inputs
            output = output + self._zero(output.device)  # 0-dim: keeps the output dtype
            output.register_hook(self.grad_hook(stats, masked, target.module, inputs))
            return output

        return hook

    def grad_hook(self, stats: Stats, masked: bool, module: str, inputs: torch.Tensor | None):
        def hook(g: torch.Tensor):
            g = g.detach()
            if self.dense:
                self._dense(module, self.tokens.rows(g, masked=masked), inputs)
                return
            s, n = self.tokens.sum(g * g if self.square else g.abs(), masked=masked)
            stats.grad_sum = s if stats.grad_sum is None else stats.grad_sum + s
            stats.grad_n += n

        return hook

    def _dense(self, module: str, g: torch.Tensor, h: torch.Tensor) -> None:
        """Fold one probe's (N, d_out) output gradients, with the (N, d_in) inputs of the
        same call, into the module's dense sum."""
        if self.dense == "tokenwise":
            term, n = g.abs().T @ h, g.shape[0]  # sum_t |g_t| |h_t|^T
        else:
            grad_w = g.T @ h  # dL/dW = sum_t g_t h_t^T
            term, n = grad_w.square_(), 1
        total = self.dense_sums.get(module)
        self.dense_sums[module] = term if total is None else total.add_(term)
        self.dense_counts[module] += n

    def backward(self, scalar: torch.Tensor, *, retain_graph: bool) -> None:
        """One probe: fire every output hook with d(scalar)/dz."""
        if not scalar.requires_grad:  # no target lies on the path to f
            return
        leaves = list(self.zeros.values())
        torch.autograd.grad(scalar, leaves, retain_graph=retain_graph, allow_unused=True)

    def reset(self) -> None:
        """Forget the per-batch sums (between batches, after they were read); the dense
        sums run over the whole probe."""
        for t in self.targets:
            self.stats[t.module] = Stats()
        self.encoder_output = None


@contextmanager
def recording(
    model: nn.Module,
    targets: Sequence[Target],
    *,
    square: bool = False,
    dense: str | None = None,
    grads: bool = True,
    square_acts: bool = False,
) -> Iterator[Recorder]:
    """Register the recorder's hooks and freeze every parameter; undo both on exit, even on error."""
    recorder = Recorder(targets, square, dense=dense, grads=grads, square_acts=square_acts)
    modules = dict(model.named_modules())
    handles = []
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved_flags:
            p.requires_grad_(False)
        for t in targets:
            handles.append(modules[t.module].register_forward_hook(recorder.forward_hook(t)))
        encoder = _encoder_of(model)
        if encoder is not None:
            handles.append(encoder.register_forward_hook(recorder.encoder_hook))
        yield recorder
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved_flags:
            p.requires_grad_(flag)


def _encoder_of(model: nn.Module) -> nn.Module | None:
    """The encoder of an encoder-decoder model (its output feeds cross-attention), else None."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    get = getattr(model, "get_encoder", None)
    encoder = get() if callable(get) else None
    return encoder if isinstance(encoder, nn.Module) else None
