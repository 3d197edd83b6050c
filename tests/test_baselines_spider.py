"""SPIDER: the update against an independent float64 reference, exact reverts, coefficient
scaling, what G sums (per step or per backward), hook removal, weight selection and memory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dowser.baselines.spider import Spider, importance, spider, spider_coefficients
from dowser.errors import DowserError


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _batch(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(5, 6, generator=g).to(dtype), torch.randn(5, 3, generator=g).to(dtype)


def _loss(model: nn.Module, seed: int) -> torch.Tensor:
    x, y = _batch(seed, next(model.parameters()).dtype)
    return ((model(x) - y) ** 2).mean()


def _ref_importance(x: torch.Tensor) -> torch.Tensor:
    a = x.double().abs()
    sd = ((a - a.mean()) ** 2).mean().sqrt()
    return 1 / (1 + torch.exp(-(a - a.mean()) / sd))


def _ref_coefficients(w0: torch.Tensor, g: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """The definition in float64, written without the module's helpers."""
    i_pre, i_ft = _ref_importance(w0), _ref_importance(g)
    c = torch.zeros_like(i_pre)
    up = i_ft > i_pre
    c[up] = i_ft[up] / (i_pre[up] + i_ft[up])
    if up.any():
        c = c / c[up].mean()
    return c.clamp(max=1) if clip else c


def _capture_raw(opt: torch.optim.Optimizer, params: dict) -> dict:
    """Register (before SPIDER's) a step hook keeping the optimizer's own result."""
    raw = {}

    def hook(optimizer, args, kwargs):
        for n, p in params.items():
            raw[n] = p.detach().double().clone()

    opt.register_step_post_hook(hook)
    return raw


def test_update_matches_the_formula():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    weights = dict(model.named_parameters())  # the default covers the biases too
    w0 = {n: p.detach().double().clone() for n, p in weights.items()}
    g_sum = {n: torch.zeros_like(w) for n, w in w0.items()}
    raw = _capture_raw(opt, weights)
    with spider(model, opt) as sp:
        assert set(sp.params) == set(weights)
        for step in range(4):
            opt.zero_grad()
            _loss(model, step).backward()
            for n, p in weights.items():
                g_sum[n] += p.grad.double()
            opt.step()
            for n, p in weights.items():
                c = _ref_coefficients(w0[n], g_sum[n])
                expected = w0[n] * (1 - c) + raw[n] * c
                torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-6)
                torch.testing.assert_close(sp.grad_sum[n].double(), g_sum[n])
                assert torch.equal(sp.w0[n].double(), w0[n])
                assert 0 < int((c > 0).sum()) < c.numel()  # some entries move, some revert
        assert sp.steps == 4


def test_unimportant_entries_are_exactly_w0_after_every_step():
    model = _model(1)
    # momentum and weight decay move every entry, gradient or not
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.5)
    weights = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    w0 = {n: p.detach().clone() for n, p in weights.items()}
    g_sum = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in w0.items()}
    with spider(model, opt):
        for step in range(5):
            opt.zero_grad()
            _loss(model, step).backward()
            for n, p in weights.items():
                g_sum[n] += p.grad.double()
            opt.step()
            for n, p in weights.items():
                gap = _ref_importance(g_sum[n]) - _ref_importance(w0[n])
                reverted = gap <= -1e-6  # I_ft <= I_pre, away from float32 ties
                assert reverted.any()
                assert torch.equal(p.detach()[reverted], w0[n][reverted])
                assert not torch.equal(p.detach()[gap > 1e-6], w0[n][gap > 1e-6])


def test_coefficients_nonzero_mean_is_one_before_the_clip():
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(64, 32, generator=g)
    grad = torch.randn(64, 32, generator=g) ** 3  # heavy-tailed, as gradient sums are
    raw = spider_coefficients(w0, grad, clip=False)
    c = spider_coefficients(w0, grad)
    nonzero = raw > 0
    assert torch.equal(nonzero, importance(grad) > importance(w0))
    assert raw[nonzero].mean().item() == pytest.approx(1.0, abs=1e-6)
    assert raw.max() > 1  # so the clip matters
    assert c.max() <= 1
    assert torch.equal(c, raw.clamp(max=1))
    torch.testing.assert_close(raw.double(), _ref_coefficients(w0, grad, clip=False))
    torch.testing.assert_close(c.double(), _ref_coefficients(w0, grad))
    torch.testing.assert_close(importance(w0).double(), _ref_importance(w0))


def test_coefficients_without_spread_or_winners_are_zero_not_nan():
    w0 = torch.full((4, 4), 0.3)  # constant: I_pre = 1/2 everywhere
    c = spider_coefficients(w0, torch.zeros(4, 4))  # G = 0: I_ft = 0, never > I_pre
    assert torch.equal(c, torch.zeros(4, 4))
    # an all-zero tensor is unimportant everywhere (the authors' rank function), a constant
    # nonzero one average everywhere
    assert torch.equal(importance(torch.zeros(3, 3)), torch.zeros(3, 3))
    assert torch.equal(importance(torch.full((3, 3), -0.2)), torch.full((3, 3), 0.5))
    assert torch.equal(importance(torch.full((3,), 1e-45)), torch.full((3,), 0.5))  # subnormal


def test_an_all_zero_gradient_sum_reverts_the_weight_fully():
    g = torch.Generator().manual_seed(11)
    w0 = torch.randn(8, 5, generator=g)  # I_pre spread around 1/2, below it for small |W0|
    assert torch.equal(spider_coefficients(w0, torch.zeros(8, 5)), torch.zeros(8, 5))
    assert torch.equal(spider_coefficients(w0, torch.zeros(8, 5), clip=False), torch.zeros(8, 5))
    # a zero W0 (zero-initialised bias) is unimportant to pretraining: any G keeps it all
    grad = torch.randn(7, generator=g)
    assert torch.equal(spider_coefficients(torch.zeros(7), grad), torch.ones(7))
    # in training: layer 0's output is multiplied by 0, so its gradient is exactly zero at
    # every step, while AdamW's weight decay still moves it: SPIDER must put it back to W0
    model = _model(12)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.5)
    w0_model = {n: p.detach().clone() for n, p in model.named_parameters()}
    raw = _capture_raw(opt, dict(model.named_parameters()))
    with spider(model, opt) as sp:
        for step in range(3):
            opt.zero_grad()
            x, y = _batch(step)
            hidden = torch.tanh(0.0 * model[0](x) + x[:, :1])  # layer 0 does not matter
            ((model[2](hidden) - y) ** 2).mean().backward()
            assert torch.equal(model[0].weight.grad, torch.zeros(8, 6))
            opt.step()
            for n in ("0.weight", "0.bias"):
                assert not torch.equal(raw[n], w0_model[n].double())  # decay moved it...
                assert torch.equal(model.get_parameter(n), w0_model[n])  # ...SPIDER undid it
            assert not torch.equal(model[2].weight, w0_model["2.weight"])
        assert torch.equal(sp.grad_sum["0.weight"], torch.zeros(8, 6))


def test_backward_mode_counts_each_micro_batch_once():
    model = _model(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    weights = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    expected = {n: torch.zeros_like(p) for n, p in weights.items()}
    with spider(model, opt, include_1d=False, accumulate="backward") as sp:
        for step in range(2):
            opt.zero_grad()
            for micro in range(2):
                loss = _loss(model, 10 * step + micro)
                # the micro-batch's own gradient; autograd.grad leaves .grad and G alone
                grads = torch.autograd.grad(loss, list(weights.values()), retain_graph=True)
                for n, gr in zip(weights, grads, strict=True):
                    expected[n] += gr
                loss.backward()
            # clipping rewrites p.grad between backward and step: G must not see it
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            for n in weights:
                torch.testing.assert_close(sp.grad_sum[n], expected[n])
            opt.step()
    assert not torch.equal(expected["0.weight"], torch.zeros_like(expected["0.weight"]))


def test_step_mode_sums_the_gradient_each_step_uses():
    # accumulated over micro-batches, then clipped: the p.grad the optimizer steps with
    model = _model(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = dict(model.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    with spider(model, opt) as sp:
        assert sp.accumulate == "step"
        for p in params.values():  # no per-backward hook on any weight
            assert not p._backward_hooks and not p._post_accumulate_grad_hooks
        for step in range(3):
            opt.zero_grad()
            for micro in range(2):
                _loss(model, 10 * step + micro).backward()
                for n in params:  # nothing is added before the step
                    torch.testing.assert_close(sp.grad_sum[n], expected[n])
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            for n, p in params.items():
                expected[n] += p.grad
            opt.step()
            for n in params:
                torch.testing.assert_close(sp.grad_sum[n], expected[n], rtol=0, atol=0)
        # a step whose weight has no gradient adds nothing for it
        opt.zero_grad(set_to_none=True)
        model[2].weight.grad = torch.ones_like(model[2].weight)
        opt.step()
        expected["2.weight"] += 1
        for n in params:
            torch.testing.assert_close(sp.grad_sum[n], expected[n], rtol=0, atol=0)
    assert sp.steps == 4


def test_step_mode_sees_unscaled_gradients_and_skips_overflowing_steps():
    model = _model(13)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    with spider(model, opt) as sp:
        for step in range(2):
            opt.zero_grad()
            loss = _loss(model, step)
            grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
            for n, gr in zip(expected, grads, strict=True):
                expected[n] += gr  # unscaled
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        for n in expected:
            torch.testing.assert_close(sp.grad_sum[n], expected[n])
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        scaler.scale(_loss(model, 5) * float("inf")).backward()
        scaler.step(opt)  # overflow: skipped, so neither G nor W changes
        scaler.update()
        assert sp.steps == 2
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n])
            torch.testing.assert_close(sp.grad_sum[n], expected[n])


@pytest.mark.parametrize("accumulate", ["step", "backward"])
def test_a_weight_used_twice_counts_its_summed_gradient_once(accumulate):
    lin = nn.Linear(4, 4)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with spider(lin, opt, accumulate=accumulate) as sp:
        x = torch.randn(3, 4)
        lin(torch.tanh(lin(x))).sum().backward()
        if accumulate == "step":
            opt.step()  # G grows at the step, by the p.grad the step uses
        torch.testing.assert_close(sp.grad_sum["weight"], lin.weight.grad)
    with pytest.raises(DowserError, match="accumulate='grad'"):
        spider(lin, opt, accumulate="grad")


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()


@pytest.mark.parametrize("accumulate", ["step", "backward"])
@pytest.mark.parametrize("how", ["remove", "exit"])
def test_removed_hooks_leave_plain_training(how, accumulate):
    model, twin = _model(4), _model(4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=0.05, weight_decay=0.1)
    if how == "exit":
        with spider(model, opt, accumulate=accumulate) as sp:
            _train(model, opt, range(1))
    else:
        sp = spider(model, opt, accumulate=accumulate)
        _train(model, opt, range(1))
        sp.remove()
        sp.remove()  # idempotent
    assert sp.steps == 1
    assert not torch.equal(model[0].weight, twin[0].weight)  # it did act while attached
    twin.load_state_dict(model.state_dict())
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    g_before = {n: g.clone() for n, g in sp.grad_sum.items()}
    _train(model, opt, range(1, 3))
    _train(twin, twin_opt, range(1, 3))
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert all(torch.equal(sp.grad_sum[n], g_before[n]) for n in g_before)
    assert sp.steps == 1


def test_names_restrict_which_weights_change():
    model = _model(5)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    params = dict(model.named_parameters())
    raw = _capture_raw(opt, params)  # each step's plain Adam result, before SPIDER acts
    w0 = {n: p.detach().clone() for n, p in params.items()}
    with spider(model, opt, names=["2.weight"]) as sp:
        assert list(sp.params) == ["2.weight"]
        for step in range(3):
            _train(model, opt, range(step, step + 1))
            for n, p in params.items():
                if n == "2.weight":
                    assert not torch.equal(p.detach().double(), raw[n])
                    assert (p == w0[n]).any()  # reverted entries
                else:
                    assert torch.equal(p.detach().double(), raw[n]), n  # plain Adam


def test_default_covers_trainable_parameters_in_the_optimizer():
    model = _model(6)
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with Spider(model, opt) as sp:  # 1-D parameters too, as the authors
        assert list(sp.params) == ["0.bias", "2.weight", "2.bias"]
    with Spider(model, opt, include_1d=False) as sp:
        assert list(sp.params) == ["2.weight"]
    with pytest.raises(DowserError, match="dim >= 2"):
        spider(model, torch.optim.SGD([model[0].bias], lr=0.1), include_1d=False)
    with pytest.raises(DowserError, match="no parameter"):
        spider(model, opt, names=["3.weight"])
    with pytest.raises(DowserError, match="requires? grad"):
        spider(model, opt, names=["0.weight"])
    with pytest.raises(DowserError, match="not in the optimizer"):
        spider(model, torch.optim.SGD(model[2].parameters(), lr=0.1), names=["0.bias"])
    with pytest.raises(DowserError, match="nothing"):
        spider(model, torch.optim.SGD([model[0].weight], lr=0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_is_eight_bytes_per_covered_entry(dtype):
    model = _model(7, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with spider(model, opt, include_1d=False) as sp:
        assert sp.memory_bytes() == 8 * (6 * 8 + 8 * 3)
        assert all(t.dtype == torch.float32 for t in [*sp.w0.values(), *sp.grad_sum.values()])
        w0 = {n: p.detach().clone() for n, p in sp.params.items()}
        _train(model, opt, range(2))
        for n, p in sp.params.items():  # reverted entries exact in the weight's own dtype
            reverted = sp.coefficients(n) == 0
            assert p.dtype == dtype
            assert torch.equal(p.detach()[reverted], w0[n][reverted])
    with spider(model, opt, names=["0.weight"]) as sp:
        assert sp.memory_bytes() == 8 * 6 * 8
    with spider(model, opt) as sp:  # the default adds the biases
        assert sp.memory_bytes() == 8 * (6 * 8 + 8 * 3 + 8 + 3)


def test_state_dict_resumes_the_same_trajectory():
    model = _model(8)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sp = spider(model, opt)
    _train(model, opt, range(2))
    resumed = copy.deepcopy(model)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=0.05)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    sp2 = spider(resumed, resumed_opt)  # would snapshot the fine-tuned weights as W0...
    sp2.load_state_dict(sp.state_dict())  # ...until the saved W0 and G replace them
    assert sp2.steps == 2
    _train(model, opt, range(2, 4))
    _train(resumed, resumed_opt, range(2, 4))
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(DowserError, match="other weights"):
        sp2.load_state_dict({"w0": {}, "grad_sum": {}, "steps": 0})
    sp.remove()
    sp2.remove()


class _Regressor(nn.Module):
    """The tiny MLP with the keyword interface the HF Trainer calls."""

    def __init__(self):
        super().__init__()
        self.net = _model(9)

    def forward(self, x, y):
        return {"loss": ((self.net(x) - y) ** 2).mean()}


def test_hf_trainer_with_gradient_accumulation(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _Regressor()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    data = [dict(zip(("x", "y"), (t[0] for t in _batch(i)), strict=True)) for i in range(12)]
    args = TrainingArguments(
        str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        max_grad_norm=1.0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    with spider(model, opt) as sp:
        w0 = {n: p.detach().clone() for n, p in sp.params.items()}
        Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train()
        assert sp.steps == 3  # once per optimizer step, not per micro-batch
        for n, p in sp.params.items():
            reverted = sp.coefficients(n) == 0
            assert 0 < int(reverted.sum()) < p.numel()
            assert torch.equal(p.detach()[reverted], w0[n][reverted])
            assert not torch.equal(p.detach()[~reverted], w0[n][~reverted])
