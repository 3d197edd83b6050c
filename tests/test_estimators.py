"""The importance estimators: each one's math against an independent computation.

The independent computations differentiate f with respect to the weights or to perturbations
of the layer outputs with torch autograd / torch.func, drawing the same Rademacher probes
(the probe's generator, in the same order), so they must agree to float32 rounding.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, token_batches

import dowser
from dowser import DowserError
from dowser.baselines.masks import wanda_scores
from dowser.probing.outputs import all_logits, last_logits, rademacher
from dowser.scores import Scores
from dowser.targets import select_targets

PROBES = 3


def outputs_f(model, batch, output: str, positions: str) -> torch.Tensor:
    logits = model(**batch)
    f = (last_logits if positions == "last" else all_logits)(logits, batch).float()
    return torch.log_softmax(f, -1) if output == "log-probs" else f


def weight_gradient_score(model, batches, output="logits", positions="last") -> dict:
    """|W| * sqrt(mean over (batch, probe) of (d(xi^T f)/dW)^2), by autograd on the weights."""
    targets = [t for t in select_targets(model) if t.group != "lm_head"]
    params = dict(model.named_parameters())
    weights = [params[t.param] for t in targets]
    sums = [torch.zeros_like(w) for w in weights]
    gen = torch.Generator().manual_seed(0)
    count = 0
    for batch in batches:
        f = outputs_f(model, batch, output, positions)
        for _ in range(PROBES):
            xi = rademacher(tuple(f.shape), gen)
            grads = torch.autograd.grad((f * xi).sum(), weights, retain_graph=True)
            for s, g in zip(sums, grads, strict=True):
                s += g.square()
            count += 1
    return {
        t.param: w.detach().abs() * (s / count).sqrt()
        for t, w, s in zip(targets, weights, sums, strict=True)
    }


@pytest.mark.parametrize("output,positions", [("logits", "last"), ("log-probs", "all")])
def test_gradient_estimator_is_the_weight_gradient(output, positions):
    model = tiny_llama()
    batches = token_batches(64)
    scores = dowser.probe(
        model,
        batches=batches,
        estimator="gradient",
        output=output,
        positions=positions,
        num_probes=PROBES,
        progress=False,
    )
    want = weight_gradient_score(model, batches, output, positions)
    for name, w in want.items():
        torch.testing.assert_close(scores.dense(name), w, rtol=1e-4, atol=1e-9, msg=name)


def layer_input(model, module, batch) -> tuple[torch.Tensor, torch.Size, torch.Tensor]:
    """(h, output shape, last-position logits) of one forward."""
    seen = {}

    def keep(m, args, out):
        seen["h"], seen["shape"] = args[0].detach(), out.shape

    handle = module.register_forward_hook(keep)
    try:
        with torch.no_grad():
            f = last_logits(model(**batch), batch)
    finally:
        handle.remove()
    return seen["h"], seen["shape"], f


def output_gradient(model, module, batch, xi, shape) -> torch.Tensor:
    """d(xi^T f)/dz for every token of the module's output z, by torch.func.grad."""

    def probed(delta):
        hook = module.register_forward_hook(lambda m, a, o: o + delta)
        try:
            return (last_logits(model(**batch), batch) * xi).sum()
        finally:
            hook.remove()

    return torch.func.grad(probed)(torch.zeros(shape))


def test_tokenwise_estimator_against_torch_func():
    """mean over valid tokens and probes of |g_t| |h_t|^T, with g from torch.func.grad."""
    model = tiny_llama()
    batches = token_batches(64)
    name = "model.layers.1.mlp.up_proj"
    module = dict(model.named_modules())[name]
    scores = dowser.probe(
        model, batches=batches, estimator="tokenwise", num_probes=PROBES, progress=False
    )
    gen = torch.Generator().manual_seed(0)
    total, count = 0.0, 0
    for batch in batches:
        h, shape, f = layer_input(model, module, batch)
        valid = batch["attention_mask"].bool()
        for _ in range(PROBES):
            xi = rademacher(tuple(f.shape), gen)
            g = output_gradient(model, module, batch, xi, shape)[valid].abs()
            total = total + g.T @ h[valid].abs()
            count += g.shape[0]
    weight = dict(model.named_parameters())[name + ".weight"].detach().abs()
    want = weight * total / count
    torch.testing.assert_close(scores.dense(name + ".weight"), want, rtol=1e-4, atol=1e-10)


def test_estimators_without_the_jacobian():
    model = tiny_llama()
    batches = token_batches(64)
    common = dict(batches=batches, progress=False)
    activation = dowser.probe(model, estimator="activation", **common)
    wanda = dowser.probe(model, estimator="wanda", **common)
    magnitude = dowser.probe(model, estimator="magnitude", **common)
    ref_wanda = wanda_scores(model, batches)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for name in activation.names:
        w = params[name].detach().abs()
        # activation: |W| times mean |h| over every valid token of every batch
        rows = [
            layer_input(model, modules[name.removesuffix(".weight")], b)[0][
                b["attention_mask"].bool()
            ]
            for b in batches
        ]
        a = torch.cat(rows).abs().mean(0)
        torch.testing.assert_close(activation.dense(name), w * a[None], rtol=1e-5, atol=0)
        torch.testing.assert_close(wanda.dense(name), ref_wanda.dense(name), rtol=1e-5, atol=0)
        assert torch.equal(magnitude.dense(name), w)
    assert magnitude.meta["num_batches"] == 0  # |W| alone: no forward pass


def test_dense_factors_round_trip(tmp_path):
    model = tiny_llama()
    scores = dowser.probe(
        model, batches=token_batches(64), estimator="tokenwise", num_probes=2, progress=False
    )
    scores.save(tmp_path / "s.safetensors")
    loaded = Scores.load(tmp_path / "s.safetensors", model=model)
    assert loaded.meta["estimator"] == "tokenwise"
    for name in scores.names:
        assert torch.equal(loaded.dense(name), scores.dense(name))
    mask = dowser.build_mask(model, loaded, update_ratio=0.1)
    for name, m in mask.items():  # the dense factors rank: the lowest 10% of S train
        s = loaded.dense(name)
        assert int(m.sum()) == int(0.1 * m.numel() + 0.5), name
        assert s[m].max() <= s[~m].min(), name
    assert "10.0%" in mask.summary().splitlines()[-1]


def test_estimator_options_are_checked():
    model = tiny_llama()
    batches = token_batches(64)
    for kwargs, match in (
        ({"estimator": "fisher"}, "estimator"),
        ({"output": "probs"}, "output"),
        ({"positions": "first"}, "positions"),
        ({"positions": "all", "output_fn": lambda o: o.logits[:, -1]}, "output_fn"),
    ):
        with pytest.raises(DowserError, match=match):
            dowser.probe(model, batches=batches, progress=False, **kwargs)


def test_perturbation_kl():
    """Noise on a mask's trainable entries moves the outputs; larger weights matter more."""
    from dowser.baselines.masks import magnitude_scores
    from dowser.eval import perturbation_kl

    model = tiny_llama()
    batches = token_batches(64, n=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    small = dowser.build_mask(model, magnitude_scores(model), update_ratio=0.1)  # smallest |W|
    params = dict(model.named_parameters())
    large = {}  # the same number of entries per weight, the largest |W|
    for name, m in small.items():
        w = params[name].detach().abs().reshape(-1)
        top = torch.zeros_like(w, dtype=torch.bool)
        top[w.topk(int(m.sum())).indices] = True
        large[name] = top.view_as(m)
    large = dowser.Mask(large)
    kl_small = perturbation_kl(model, small, batches, draws=3)
    kl_large = perturbation_kl(model, large, batches, draws=3)
    assert 0 < kl_small.kl < kl_large.kl
    assert len(kl_small.per_draw) == 3 and kl_small.se > 0
    assert perturbation_kl(model, small, batches, draws=3).per_draw == kl_small.per_draw
    assert perturbation_kl(model, small, batches, sigma=0.0, draws=1).kl == 0.0
    for n, p in model.named_parameters():  # restored bit for bit
        assert torch.equal(p, before[n]), n


def test_reference_is_mean_abs():
    model = tiny_llama()
    batches = token_batches(64)
    a = dowser.probe(model, batches=batches, estimator="reference", progress=False)
    b = dowser.probe(model, batches=batches, estimator="mean-abs", progress=False)
    assert a.meta["estimator"] == "reference"
    assert all(torch.equal(a.dense(n), b.dense(n)) for n in a.names)


def test_cli_estimator_options(checkpoint_dirs, tmp_path, capsys):
    from test_cli import FAST, run

    out = tmp_path / "s.safetensors"
    argv = ["probe", checkpoint_dirs["llama"], "--out", out, *FAST]
    options = ["--estimator", "gradient", "--positions", "all", "--output", "log-probs"]
    code, stdout, err = run([*argv, *options], capsys)
    assert code == 0, err
    code, stdout, _ = run(["inspect", out], capsys)
    assert "estimator: gradient" in stdout and "positions: all" in stdout
    assert "output: log-probs" in stdout
    mask = tmp_path / "m.safetensors"
    code, _, err = run(["mask", out, "--model", checkpoint_dirs["llama"], "--out", mask], capsys)
    assert code == 0, err
