"""Merging baselines: DARE, grafting, InputCovariance and Model Tailor on tiny seeded tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dowser.baselines.merging import InputCovariance, dare, graft, model_tailor
from dowser.errors import DowserError


def pair(shape=(12, 20), seed=0, scale=0.1):
    """(base, tuned) single-tensor dicts where every entry differs."""
    g = torch.Generator().manual_seed(seed)
    w_pre = torch.randn(shape, generator=g)
    delta = scale * torch.randn(shape, generator=g)
    delta = torch.where(delta == 0, torch.full_like(delta, 1e-3), delta)
    return {"w": w_pre}, {"w": w_pre + delta}


def correlated_inputs(d_in=10, n=200, seed=1):
    """X (n x d_in) with strongly correlated features, so compensation has something to use."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) + 2 * torch.eye(d_in)
    return torch.randn(n, d_in, generator=g) @ mix


def hessian(x):
    return 2 * x.T @ x / x.shape[0]


# --------------------------------------------------------------------------------------------
# DARE


def test_dare_drop_zero_returns_tuned_exactly():
    base, tuned = pair()
    out = dare(base, tuned, drop=0.0)
    assert torch.equal(out["w"], tuned["w"])


def test_dare_drops_about_drop_and_rescales_survivors():
    base, tuned = pair(shape=(200, 200))
    out = dare(base, tuned, drop=0.9, seed=3)["w"]
    dropped = out == base["w"]  # dropped entries are bit-exact W_pre
    assert abs(dropped.float().mean().item() - 0.9) < 0.01  # std of the fraction is 0.0015
    expected = base["w"] + (tuned["w"] - base["w"]) / (1 - 0.9)
    torch.testing.assert_close(out[~dropped], expected[~dropped])


def test_dare_is_unbiased_over_seeds():
    base, tuned = pair(shape=(16, 16))
    delta = (tuned["w"] - base["w"]).double()
    p, seeds = 0.9, 1000
    mean = sum((dare(base, tuned, drop=p, seed=s)["w"] - base["w"]).double() for s in range(seeds))
    mean = mean / seeds
    # each entry's mean is delta + noise of std |delta| sqrt(p / (1 - p) / seeds): standardised
    # errors must look like N(0, 1) (deterministic: the seeds are fixed)
    z = (mean - delta) / (delta.abs() * math.sqrt(p / (1 - p) / seeds))
    assert abs(z.mean().item()) < 0.25  # 256 entries: std of the mean of z is 1/16
    assert 0.8 < z.std().item() < 1.2
    assert z.abs().max().item() < 5


def test_dare_is_deterministic_per_seed_and_keeps_dtype():
    base, tuned = pair()
    base16 = {"w": base["w"].bfloat16()}
    tuned16 = {"w": tuned["w"].bfloat16()}
    a = dare(base16, tuned16, seed=7)["w"]
    assert a.dtype == torch.bfloat16 and a.device == tuned16["w"].device
    assert torch.equal(a, dare(base16, tuned16, seed=7)["w"])
    assert not torch.equal(a, dare(base16, tuned16, seed=8)["w"])
    # the mask of a tensor depends on its name, not on which other tensors are merged with it
    both = dare({**base16, "v": base16["w"]}, {**tuned16, "v": tuned16["w"]}, seed=7)
    assert torch.equal(both["w"], a)


def test_default_names_skip_unchanged_and_leave_1d_tensors_fine_tuned():
    base, tuned = pair()
    base.update(same=torch.ones(3, 3), norm=torch.ones(5), steps=torch.arange(4))
    tuned.update(same=torch.ones(3, 3), norm=torch.full((5,), 2.0), steps=torch.arange(4) + 1)
    for merged in (dare(base, tuned), graft(base, tuned)):
        assert set(merged) == {"w", "norm", "steps"}  # "same" did not change
        assert merged["norm"] is tuned["norm"] and merged["steps"] is tuned["steps"]
        assert not torch.equal(merged["w"], tuned["w"])
    # named explicitly, a 1-D tensor is processed element-wise too
    # (one of five kept; all |delta| tie, so the lowest index keeps its fine-tuned value)
    grafted = graft(base, tuned, keep=0.2, names=["norm"])["norm"]
    assert torch.equal(grafted, torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0]))


# --------------------------------------------------------------------------------------------
# Grafting


@pytest.mark.parametrize("keep", [0.01, 0.1, 0.37, 1.0])
def test_graft_keeps_exactly_the_largest_deltas(keep):
    base, tuned = pair()
    out = graft(base, tuned, keep=keep)["w"]
    kept = out != base["w"]
    k = math.floor(keep * out.numel() + 0.5)
    assert int(kept.sum()) == k
    assert torch.equal(out[kept], tuned["w"][kept])  # kept: bit-exact W_ft
    assert torch.equal(out[~kept], base["w"][~kept])  # reverted: bit-exact W_pre
    magnitude = (tuned["w"] - base["w"]).abs()
    if 0 < k < out.numel():
        assert magnitude[kept].min() >= magnitude[~kept].max()


def test_graft_breaks_ties_by_lower_flat_index():
    base = {"w": torch.zeros(2, 4)}
    tuned = {"w": torch.tensor([[1.0, 3.0, 1.0, -1.0], [0.5, 1.0, -3.0, 1.0]])}
    out = graft(base, tuned, keep=0.5)["w"]  # 4 kept: both 3s, then the first two of six 1s
    kept = (out != 0).flatten().tolist()
    assert kept == [True, True, True, False, False, False, True, False]


# --------------------------------------------------------------------------------------------
# InputCovariance


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4))


def test_input_covariance_equals_2xxt_over_n():
    model = tiny_mlp()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(3, 5, 6, generator=g), torch.randn(7, 6, generator=g)]
    with torch.no_grad(), InputCovariance(model) as cov:
        for x in batches:
            model(x)
    hs = cov.hessians()
    assert set(hs) == {"0.weight", "2.weight"}
    x0 = torch.cat([b.reshape(-1, 6) for b in batches])  # n = 22 tokens
    x2 = model[1](model[0](x0)).detach()
    torch.testing.assert_close(hs["0.weight"], 2 * x0.T @ x0 / 22)
    torch.testing.assert_close(hs["2.weight"], 2 * x2.T @ x2 / 22)
    assert cov.counts == {"0": 22, "2": 22}


def test_input_covariance_skips_padding_given_an_attention_mask():
    model = tiny_mlp()
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad(), InputCovariance(model, ["0"]) as cov:
        cov.attention_mask = mask
        model(x)
    valid = x[mask.bool()]
    torch.testing.assert_close(cov.hessians()["0.weight"], 2 * valid.T @ valid / 6)


def test_input_covariance_removes_hooks_even_on_error():
    model = tiny_mlp()
    with pytest.raises(RuntimeError, match="boom"), InputCovariance(model):
        assert all(len(model[i]._forward_hooks) == 1 for i in (0, 2))
        model(torch.randn(2, 6))
        raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())
    model(torch.randn(2, 6))  # no hook left to record it
    with pytest.raises(DowserError, match="not an nn.Linear"):
        InputCovariance(model, ["1"])
    with pytest.raises(DowserError, match="module name '0'"):
        InputCovariance(model, ["0.weight"])


# --------------------------------------------------------------------------------------------
# Model Tailor


def tailor_setup(d_out=6, d_in=10, seed=0):
    base, tuned = pair(shape=(d_out, d_in), seed=seed)
    x = correlated_inputs(d_in)
    return base, tuned, {"w": hessian(x)}, x


def test_model_tailor_keeps_exact_count_and_reverts_bit_exactly():
    base, tuned, hs, _ = tailor_setup()
    out = model_tailor(base, tuned, hs, keep=0.3, block=4)["w"]
    differ = out != base["w"]  # so every other entry is bit-equal to W_pre
    assert int(differ.sum()) == math.floor(0.3 * 60 + 0.5)
    assert out.dtype == tuned["w"].dtype
    # half precision in, half precision out (the math runs in float32); reverted stay W_pre
    base16 = {"w": base["w"].bfloat16()}
    out16 = model_tailor(base16, {"w": tuned["w"].bfloat16()}, hs, keep=0.3, block=4)["w"]
    assert out16.dtype == torch.bfloat16
    assert int((out16 != base16["w"]).sum()) <= 18


def test_model_tailor_keep_one_returns_tuned():
    base, tuned, hs, _ = tailor_setup()
    assert torch.equal(model_tailor(base, tuned, hs, keep=1.0)["w"], tuned["w"])


def expected_tailor(w_pre, w_ft, h, keep, block, damp, alpha):
    """Model Tailor written out directly, in float64: scores, mask, and sequential OBS with
    explicit inverses of the trailing Hessian blocks (no Cholesky trick, no blocking)."""
    w_pre, w_ft, h = w_pre.double(), w_ft.double(), h.double()
    d_out, d_in = w_ft.shape
    h = h + damp * h.diagonal().mean() * torch.eye(d_in, dtype=h.dtype)
    u_diag = torch.linalg.cholesky(torch.linalg.inv(h), upper=True).diagonal()
    delta = w_ft - w_pre

    def z(x):
        return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True, correction=0)

    score = torch.cat(
        [
            alpha * z(delta[:, b : b + block].abs())
            + (1 - alpha) * z(w_ft[:, b : b + block] ** 2 / u_diag[b : b + block] ** 2)
            for b in range(0, d_in, block)
        ],
        dim=1,
    )
    k = math.floor(keep * score.numel() + 0.5)
    kept = torch.zeros(score.numel(), dtype=torch.bool)
    kept[score.flatten().argsort(descending=True, stable=True)[:k]] = True
    kept = kept.reshape(score.shape)
    cur = delta.clone()
    for c in range(d_in):  # OBS: remove (r, c) with columns c.. free to move
        hinv = torch.linalg.inv(h[c:, c:])
        err = torch.where(kept[:, c], 0.0, cur[:, c] / hinv[0, 0])
        cur[:, c:] -= err[:, None] * hinv[0][None, :]
    return kept, torch.where(kept, w_pre + cur, w_pre)


@pytest.mark.parametrize("block", [4, 128])
def test_model_tailor_matches_the_formulas(block):
    base, tuned, hs, _ = tailor_setup()
    kept, expected = expected_tailor(base["w"], tuned["w"], hs["w"], 0.3, block, 0.01, 0.8)
    out = model_tailor(base, tuned, hs, keep=0.3, block=block)["w"]
    assert torch.equal(out != base["w"], kept)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    plain = model_tailor(base, tuned, hs, keep=0.3, block=block, compensate=False)["w"]
    assert torch.equal(plain, torch.where(kept, tuned["w"], base["w"]))


def test_model_tailor_compensation_reduces_layer_output_error():
    # OBS compensation is greedy (only columns right of a reverted entry absorb its error), so
    # it is not a guaranteed improvement for every example; on this seeded one it is clear
    base, tuned = pair(shape=(16, 24), seed=0)
    x = correlated_inputs(24, n=300, seed=10)
    hs = {"w": hessian(x)}
    merged = model_tailor(base, tuned, hs, keep=0.5, block=8)["w"]
    plain = model_tailor(base, tuned, hs, keep=0.5, block=8, compensate=False)["w"]
    assert torch.equal(merged != base["w"], plain != base["w"])  # same entries reverted
    err_merged = ((merged - tuned["w"]) @ x.T).norm()
    err_plain = ((plain - tuned["w"]) @ x.T).norm()
    assert err_merged < 0.9 * err_plain


def test_model_tailor_on_a_model_with_collected_hessians():
    base_model = tiny_mlp(seed=0)
    tuned_model = tiny_mlp(seed=0)
    with torch.no_grad():
        for p in tuned_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9)))
    base = {n: t.clone() for n, t in base_model.state_dict().items()}
    tuned = tuned_model.state_dict()
    with torch.no_grad(), InputCovariance(tuned_model, ["0"]) as cov:
        tuned_model(torch.randn(64, 6, generator=torch.Generator().manual_seed(4)))
    merged = model_tailor(base, tuned, cov.hessians(), keep=0.25)
    assert set(merged) == set(tuned)  # everything changed
    assert int((merged["0.weight"] != base["0.weight"]).sum()) == 12  # round(0.25 * 48)
    for name in ("0.bias", "2.weight", "2.bias"):  # 1-D, or no Hessian: left fine-tuned
        assert merged[name] is tuned[name]
    tuned_model.load_state_dict(merged)


# --------------------------------------------------------------------------------------------
# Argument errors


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda b, t, h: dare(b, t, drop=1.0), "drop=1.0 is outside"),
        (lambda b, t, h: dare(b, t, drop=-0.1), "drop=-0.1 is outside"),
        (lambda b, t, h: graft(b, t, keep=0.0), "keep=0.0 is outside"),
        (lambda b, t, h: graft(b, t, keep=1.5), "keep=1.5 is outside"),
        (lambda b, t, h: model_tailor(b, t, h, keep=0), "keep=0 is outside"),
        (lambda b, t, h: model_tailor(b, t, h, keep=1.01), "keep=1.01 is outside"),
        (lambda b, t, h: model_tailor(b, t, h, alpha=2), "alpha=2 is outside"),
        (lambda b, t, h: model_tailor(b, t, h, block=0), "block=0"),
        (lambda b, t, h: model_tailor(b, t, h, damp=-1), "damp=-1"),
        (lambda b, t, h: model_tailor(b, t, {"w": torch.eye(3)}), r"Hessian of 'w' is \(3, 3\)"),
        (lambda b, t, h: dare(b, t, names=["nope"]), "'nope' is not in"),
        (lambda b, t, h: dare(b, {"w": t["w"][:, :5]}), "shape mismatch for 'w'"),
        (lambda b, t, h: graft(b, {"w": t["w"].T}), "shape mismatch for 'w'"),
        (lambda b, t, h: model_tailor(b, {"w": t["w"][1:]}, h), "shape mismatch for 'w'"),
    ],
)
def test_argument_errors_name_the_problem(call, message):
    base, tuned, hs, _ = tailor_setup()
    with pytest.raises(DowserError, match=message):
        call(base, tuned, hs)


def test_singular_hessian_without_damping_is_a_clear_error():
    base, tuned, _, _ = tailor_setup()
    x = torch.randn(3, 10)  # 3 tokens: H has rank 3 of 10
    with pytest.raises(DowserError, match="not positive definite"):
        model_tailor(base, tuned, {"w": hessian(x)}, damp=0.0)
