"""SPIDER (ICML 2025): pull each fine-tuned weight back towards its pretrained value, entry by
entry, by how much more the entry matters to the downstream task than to pretraining.

For every covered weight tensor W with pretrained value W0 (all statistics over the whole
tensor, computed in float32):

    z(x)   = (x - mean(x)) / std(x)                 population std; z = 0 if std(x) = 0
    I(x)   = sigmoid(z(|x|)),  but I(x) = 0 everywhere if x is all zero
    I_pre  = I(W0)                                  importance for pretraining
    G      = sum over optimizer steps of the p.grad each step uses   (signed; see accumulate)
    I_ft   = I(G)                                   importance for the downstream task
    c'     = I_ft / (I_pre + I_ft)   where I_ft > I_pre,   0 elsewhere
    c      = min(1, c' / mean{c' : c' > 0})         mean of the nonzero c' scaled to 1
    W     <- W0 (1 - c) + W c                       after every optimizer step

so an entry the task does not need more than pretraining (I_ft <= I_pre) is put back to W0
exactly after every step, and the others keep a fraction c of their fine-tuned value (all of it
where the rescaled c' reaches 1). c' lies in (1/2, 1] where it is nonzero, so the nonzero
entries are exactly those with I_ft > I_pre, and rescaling cannot create or remove any.

Tensors without spread. An all-zero tensor has importance 0, as in the authors' code: a weight
whose gradient was exactly zero at every step so far (G = 0) has c = 0 everywhere and reverts
fully to W0; a weight with W0 = 0 (a zero-initialised bias) has I_pre = 0, so c' = 1 wherever
G is not all zero, and the optimizer moves it freely. A constant nonzero tensor (a 1-element
parameter, a G of equal magnitudes) has no entry more important than another: I = 1/2 there,
the value z = 0 gives and the limit of a nearly constant tensor.

Coverage. By default every parameter that requires grad and is in the optimizer, 1-D ones
(norm weights, biases) included, as in the authors' code: the baseline is their method, and
1-D parameters add little memory. `include_1d=False` covers only tensors with >= 2 dimensions
(the matrices a Dowser mask or LoRA tunes), leaving 1-D parameters to the optimizer alone.

Works with any torch model and optimizer: W0 is snapshotted at construction, G is
accumulated by hooks, and the update runs in a step post-hook of the optimizer, so a training
loop (or the HF Trainer, given this optimizer through `optimizers=(opt, None)`) needs no change.
Extra memory: W0 and G in float32 on the weight's device, 8 bytes per covered entry; I_pre is
recomputed every step rather than kept (4 more bytes per entry otherwise).

What G sums (`accumulate`):

- "step" (default, as in the authors' code): a step pre-hook of the optimizer adds p.grad, in
  float32, to G once per optimizer step, for every covered weight whose p.grad is not None.
  That is the gradient the step uses: with gradient accumulation the sum (or, with the HF
  Trainer's loss division, the mean) of the micro-batches, after clipping, masking and
  loss-scale unscaling (`GradScaler.step` unscales before it calls `optimizer.step()`, and a
  step it skips for an overflow reaches neither hook, so G and W stay as they are). A
  closure-based optimizer (LBFGS) computes its gradient inside step, after the pre-hook: use
  "backward" there. No hook on the weights, so backward runs as without SPIDER.
- "backward": G sums every backward pass's own gradient g_k of the weight, one term per
  backward, whatever the accumulation, clipping or zeroing of p.grad in between.
  `register_post_accumulate_grad_hook` runs after a backward has added its gradient into
  p.grad, so it sees the running sum g_1 + ... + g_k since p.grad was last cleared; adding
  p.grad there would count g_1 k times. Instead a tensor hook on the weight (which runs just
  before accumulation and receives g_k, summed over every use of the weight in the graph)
  keeps a reference to g_k, and the post-accumulate hook adds that g_k to G. The cost: while
  the reference is held, autograd copies rather than adopts a first gradient into an empty
  p.grad, one transient gradient-sized tensor per weight and backward.
  `torch.autograd.grad(loss, [W])`, which never touches W.grad, leaves G alone. G sums the
  gradient as it reaches the weight: what a tensor hook registered earlier on W returns is
  included, changes made by later hooks or to p.grad (gradient masking, clipping, loss-scale
  unscaling) are not. With fp16 loss scaling G therefore sums scaled gradients, and an
  overflowing backward makes G infinite: use bf16 or fp32 gradients, or "step".
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dowser.errors import DowserError


def importance(x: torch.Tensor) -> torch.Tensor:
    """I(x) = sigmoid(z(|x|)) over the whole tensor, 0 everywhere for an all-zero x, as a new
    float32 tensor (module doc)."""
    a = x.detach().abs().float()
    if a.numel() == 0:
        return a
    # amax rather than mean: a mean of tiny (subnormal) entries can underflow to 0
    all_zero = a.amax() == 0
    std, mean = torch.std_mean(a, correction=0)
    a.sub_(mean).div_(std)
    # a constant tensor has no spread: every entry is average (z = 0, I = 1/2) unless it is
    # all zero (I = 0). masked_fill_ with 0-dim masks avoids a host sync per weight per step.
    a.masked_fill_(std == 0, 0.0)
    return a.sigmoid_().masked_fill_(all_zero, 0.0)


def spider_coefficients(w0: torch.Tensor, g: torch.Tensor, *, clip: bool = True) -> torch.Tensor:
    """c for one weight from its pretrained value `w0` and gradient sum `g` (module doc).

    With clip=False returns c' / mean{c' : c' > 0} before the clip at 1, whose nonzero
    entries average 1. All zeros when no entry has I_ft > I_pre, in particular when g is all
    zero.
    """
    i_pre = importance(w0)
    c = importance(g)  # I_ft, turned into c in place to keep two float tensors alive, not four
    keep = c > i_pre
    c.div_(i_pre.add_(c)).mul_(keep)
    del i_pre
    n = keep.sum()
    mean = c.sum() / n.clamp_min(1)
    c.div_(torch.where(n > 0, mean, torch.ones_like(mean)))
    if clip:
        c.clamp_(max=1.0)
    return c


class Spider:
    """Handle: snapshot W0 of the covered weights, accumulate G with hooks, and after each
    step of `optimizer` apply the SPIDER update. Context manager; .remove() removes every
    hook. memory_bytes() reports the extra memory (W0 + G copies).

    Args:
        model: the model being fine-tuned, holding its pretrained weights now.
        optimizer: any torch optimizer over (at least) the covered weights.
        names: the weights to cover (as in `model.named_parameters()`); default every
            parameter that requires grad and is in `optimizer` (a weight the optimizer does
            not step cannot leave W0 and would only cost memory). Parameters outside `names`
            are left to the optimizer alone.
        include_1d: with the default names, also cover parameters with fewer than 2
            dimensions (norm weights, biases). True by default, as the authors interpolate
            every trainable parameter; False covers only matrices. Ignored when `names` is
            given.
        accumulate: "step" (default, as the authors): add each optimizer step's p.grad to G
            in a step pre-hook; "backward": add every backward pass's own gradient (module
            doc, "What G sums").

    Attributes: `params` (name -> parameter), `w0` and `grad_sum` (name -> float32 tensor,
    W0 and G), `steps` (how many updates were applied).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        names: Iterable[str] | None = None,
        include_1d: bool = True,
        accumulate: str = "step",
    ):
        if accumulate not in ("step", "backward"):
            raise DowserError(f'accumulate={accumulate!r} must be "step" or "backward"')
        self.model = model
        self.optimizer = optimizer
        self.accumulate = accumulate
        self.params = _covered(model, optimizer, names, include_1d)
        with torch.no_grad():
            self.w0 = {
                n: p.detach().to(dtype=torch.float32, copy=True) for n, p in self.params.items()
            }
            self.grad_sum = {n: torch.zeros_like(w) for n, w in self.w0.items()}
        self.steps = 0
        # this backward's gradient, between the tensor hook that sees it and the
        # post-accumulate hook that adds it to G (a reference, not a copy)
        self._incoming: dict[str, torch.Tensor] = {}
        self._handles = []
        if accumulate == "step":
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))
        else:
            for n, p in self.params.items():
                self._handles.append(p.register_hook(self._receive(n)))
                self._handles.append(p.register_post_accumulate_grad_hook(self._accumulate(n)))
        self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def _state(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """W0 and G of `name` on `device`, moved once if the model moved after construction
        (e.g. the Trainer putting it on the GPU)."""
        if self.w0[name].device != device:
            self.w0[name] = self.w0[name].to(device)
            self.grad_sum[name] = self.grad_sum[name].to(device)
        return self.w0[name], self.grad_sum[name]

    def _receive(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            self._incoming[name] = grad

        return hook

    def _accumulate(self, name: str):
        @torch.no_grad()
        def hook(p: torch.Tensor) -> None:
            grad = self._incoming.pop(name, None)
            if grad is not None:
                self._state(name, grad.device)[1].add_(grad)

        return hook

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        for n, p in self.params.items():
            if p.grad is not None:
                self._state(n, p.grad.device)[1].add_(p.grad)  # into float32, in place

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        for n, p in self.params.items():
            w0, g = self._state(n, p.device)
            c = spider_coefficients(w0, g)
            # lerp(W0, W, c) = W0 + c (W - W0), computed so that c = 0 gives W0 and c = 1
            # gives W bit for bit; written into c to need no further weight-sized tensor
            torch.lerp(w0, p.detach().float(), c, out=c)
            p.copy_(c)
        self.steps += 1

    def coefficients(self, name: str, *, clip: bool = True) -> torch.Tensor:
        """c of weight `name` from the current W0 and G (what the next step would use)."""
        return spider_coefficients(self.w0[name], self.grad_sum[name], clip=clip)

    def memory_bytes(self) -> int:
        """Bytes held for W0 and G (8 per covered entry)."""
        return sum(
            t.numel() * t.element_size() for d in (self.w0, self.grad_sum) for t in d.values()
        )

    def state_dict(self) -> dict:
        """W0, G and the step count, to resume a run (the model and optimizer save their own)."""
        return {"w0": dict(self.w0), "grad_sum": dict(self.grad_sum), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved, for the same covered weights."""
        if set(state["w0"]) != set(self.params) or set(state["grad_sum"]) != set(self.params):
            raise DowserError("this SPIDER state covers other weights; resume with the same names")
        with torch.no_grad():
            for n, p in self.params.items():
                for key, d in (("w0", self.w0), ("grad_sum", self.grad_sum)):
                    t = state[key][n]
                    if tuple(t.shape) != tuple(p.shape):
                        raise DowserError(
                            f"SPIDER state for {n} has shape {tuple(t.shape)}, "
                            f"the weight {tuple(p.shape)}"
                        )
                    d[n] = t.to(device=p.device, dtype=torch.float32, copy=True)
        self.steps = int(state["steps"])

    def remove(self) -> None:
        """Remove every hook (weights and optimizer); W0 and G stay readable until the
        handle is dropped."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._incoming.clear()

    def __enter__(self) -> Spider:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def spider(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    names: Iterable[str] | None = None,
    include_1d: bool = True,
    accumulate: str = "step",
) -> Spider:
    """Fine-tune with SPIDER: after every `optimizer.step()` the covered weights are pulled
    back towards their pretrained values (module doc; arguments as `Spider`). Create it after
    the optimizer and before training, while the model still holds its pretrained weights.

        opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
        with spider(model, opt) as sp:
            ...train as usual (any loop, gradient accumulation, or HF Trainer with
               optimizers=(opt, None))...
    """
    return Spider(model, optimizer, names=names, include_1d=include_1d, accumulate=accumulate)


def _covered(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    names: Iterable[str] | None,
    include_1d: bool,
) -> dict[str, nn.Parameter]:
    """name -> parameter for the weights SPIDER covers (see `Spider`), after checks."""
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if names is None:
        out = {
            n: p
            for n, p in model.named_parameters()
            if p.requires_grad and (include_1d or p.dim() >= 2) and id(p) in stepped
        }
        if not out:
            what = "requires_grad" if include_1d else "requires_grad and dim >= 2"
            raise DowserError(
                f"no parameter with {what} is in the optimizer: nothing for SPIDER to cover"
            )
        return out
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise DowserError("names is empty: give at least one weight for SPIDER to cover")
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in names if n not in params]
    if missing:
        raise DowserError(
            f"the model has no parameter {missing[0]!r} ({len(missing)} unknown names)"
        )
    out, seen = {}, set()
    for n in names:
        p = params[n]
        if id(p) in seen:  # a tied weight under a second name: one W0 and one G
            continue
        if not p.requires_grad:
            raise DowserError(f"{n} does not require grad: it cannot be fine-tuned")
        if id(p) not in stepped:
            raise DowserError(f"{n} is not in the optimizer's parameter groups")
        seen.add(id(p))
        out[n] = p
    return out
