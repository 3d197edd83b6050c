"""Gradient masking and SparseAdamW: frozen entries never move, AdamW math, state, resume."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import tiny_llama, token_batches

import dowser
from dowser import DowserError, Mask, SparseAdamW, mask_gradients, prepare_model


def random_mask(model, ratio=0.25, seed=0) -> Mask:
    """A mask over every decoder attn/mlp weight with `ratio` of entries trainable."""
    g = torch.Generator().manual_seed(seed)
    return Mask(
        {
            n: torch.rand(p.shape, generator=g) < ratio
            for n, p in model.named_parameters()
            if ".layers." in n and n.endswith("proj.weight")
        }
    )


def loss_of(model, batch):
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(**batch, labels=labels).loss


def train(model, opt, batches, steps):
    for i in range(steps):
        opt.zero_grad()
        loss_of(model, batches[i % len(batches)]).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()


def frozen_unchanged(before, model, mask) -> None:
    after = dict(model.named_parameters())
    for n, m in mask.items():
        assert torch.equal(after[n][~m], before[n][~m]), n


def test_prepare_model_trains_masked_weights_and_their_norms():
    model = tiny_llama()
    mask = random_mask(model)
    mask = Mask({n: t for n, t in mask.items() if ".layers.1." in n})
    prepare_model(model, mask)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
    }
    assert trainable == set(mask) | norms
    prepare_model(model, mask, train_norms=False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(mask)


@pytest.mark.parametrize("mode", ["sparse-adamw", "masked-adamw"])
def test_frozen_entries_bit_identical_with_weight_decay(mode):
    model = tiny_llama()
    mask = random_mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if mode == "sparse-adamw":
        prepare_model(model, mask)
        opt = SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1)
        train(model, opt, token_batches(64), 5)
    else:
        with mask_gradients(model, mask) as gm:
            opt = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
            )
            gm.attach(opt)
            train(model, opt, token_batches(64), 5)
    frozen_unchanged(before, model, mask)
    after = dict(model.named_parameters())
    for n, m in mask.items():  # trainable entries did learn
        assert not torch.equal(after[n][m], before[n][m]), n
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not torch.equal(
        after["model.layers.0.input_layernorm.weight"],
        before["model.layers.0.input_layernorm.weight"],
    )


def test_gradient_masking_without_attach_lets_weight_decay_move_frozen_entries():
    """The reference's behaviour, documented: zero gradients do not stop decoupled decay."""
    model = tiny_llama()
    mask = random_mask(model)
    name = next(iter(mask))
    before = dict(model.named_parameters())[name].detach().clone()
    with mask_gradients(model, mask):
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
        )
        train(model, opt, token_batches(64), 2)
        after = dict(model.named_parameters())[name].detach()
        m = mask[name]
        assert not torch.equal(after[~m], before[~m])  # decayed: (1 - lr wd)^2
        torch.testing.assert_close(after[~m], before[~m] * (1 - 1e-3) ** 2)
    # hooks gone and flags restored on exit
    assert all(p.requires_grad for p in model.parameters())
    assert all(not p._backward_hooks for p in model.parameters() if p._backward_hooks is not None)


def test_masked_gradients_are_zero_on_frozen_entries():
    model = tiny_llama()
    mask = random_mask(model)
    with mask_gradients(model, mask):
        loss_of(model, token_batches(64)[0]).backward()
        for n, p in model.named_parameters():
            if n in mask:
                assert (p.grad[~mask[n]] == 0).all() and (p.grad[mask[n]] != 0).any()
    model.zero_grad()
    loss_of(model, token_batches(64)[0]).backward()  # after exit: no masking
    name = next(iter(mask))
    assert (dict(model.named_parameters())[name].grad[~mask[name]] != 0).any()


def test_sparse_adamw_matches_torch_adamw_on_trainable_entries():
    model = tiny_llama()
    mask = random_mask(model)
    ref = copy.deepcopy(model)
    prepare_model(model, mask)
    opt = SparseAdamW(model, mask, lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.05)
    with mask_gradients(ref, mask) as gm:
        ref_opt = torch.optim.AdamW(
            [p for p in ref.parameters() if p.requires_grad],
            lr=3e-3,
            betas=(0.8, 0.95),
            eps=1e-7,
            weight_decay=0.05,
            foreach=False,
        )
        gm.attach(ref_opt)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
        ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 1 / (1 + s))
        batches = token_batches(64, n=3)
        for i in range(6):
            for o, m, s in ((opt, model, sched), (ref_opt, ref, ref_sched)):
                o.zero_grad()
                loss_of(m, batches[i % 3]).backward()
                torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], 0.5)
                o.step()
                s.step()
    ours, theirs = dict(model.named_parameters()), dict(ref.named_parameters())
    for n, p in ours.items():
        if n in mask:
            torch.testing.assert_close(p[mask[n]], theirs[n][mask[n]], rtol=1e-5, atol=1e-6)
        elif p.requires_grad:
            torch.testing.assert_close(p, theirs[n], rtol=1e-5, atol=1e-6)


def test_state_is_proportional_to_trainable_entries():
    model = tiny_llama()
    mask = random_mask(model, ratio=0.1)
    prepare_model(model, mask, train_norms=False)
    opt = SparseAdamW(model, mask, lr=1e-3)
    train(model, opt, token_batches(64), 1)
    n = mask.num_trainable()
    steps = 4 * len(mask)  # one float32 step counter per weight
    assert opt.state_bytes() == n * (4 + 4 + 4) + steps
    rho = n / mask.numel()
    dense_adamw = 8 * mask.numel()  # exp_avg + exp_avg_sq, fp32
    # 12 bytes per trainable entry = 1.5 rho x dense AdamW's 8 bytes per entry
    assert opt.state_bytes() - steps == pytest.approx(1.5 * rho * dense_adamw)


def test_resume_equals_uninterrupted_run():
    batches = token_batches(64, n=4)
    straight = tiny_llama()
    mask = random_mask(straight)
    prepare_model(straight, mask)
    opt = SparseAdamW(straight, mask, lr=1e-2, weight_decay=0.01)
    train(straight, opt, batches, 4)

    resumed = tiny_llama()
    prepare_model(resumed, mask)
    opt = SparseAdamW(resumed, mask, lr=1e-2, weight_decay=0.01)
    train(resumed, opt, batches[:2], 2)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "model": resumed.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # as the HF Trainer reloads it

    fresh = tiny_llama(seed=7)
    fresh.load_state_dict(saved["model"])
    prepare_model(fresh, mask)
    opt2 = SparseAdamW(fresh, mask, lr=1e-2, weight_decay=0.01)
    opt2.load_state_dict(saved["opt"])
    train(fresh, opt2, batches[2:], 2)
    for (n, a), (_, b) in zip(straight.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_bfloat16_weights_keep_fp32_state_through_resume():
    model = tiny_llama().to(torch.bfloat16)
    mask = random_mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prepare_model(model, mask)
    opt = SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1)
    train(model, opt, token_batches(64), 3)
    frozen_unchanged(before, model, mask)
    p = dict(model.named_parameters())[next(iter(mask))]
    st = opt.state[p]
    assert st["exp_avg"].dtype == st["master"].dtype == torch.float32
    assert torch.equal(st["master"].to(torch.bfloat16), p.detach().reshape(-1)[st["idx"].long()])
    opt2 = SparseAdamW(model, mask, lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[p]["master"].dtype == torch.float32
    assert torch.equal(opt2.state[p]["master"], st["master"])


def test_resume_with_another_mask_is_refused():
    model = tiny_llama()
    mask = random_mask(model)
    prepare_model(model, mask)
    opt = SparseAdamW(model, mask)
    train(model, opt, token_batches(64), 1)
    other = SparseAdamW(model, random_mask(model, seed=1))
    with pytest.raises(DowserError, match="another mask"):
        other.load_state_dict(opt.state_dict())


def test_mask_for_another_model_is_refused():
    model = tiny_llama()
    mask = random_mask(tiny_llama(layers=3))
    with pytest.raises(DowserError, match="does not have"):
        SparseAdamW(model, mask)
    with pytest.raises(DowserError, match="does not have"):
        mask_gradients(model, mask)


def test_built_mask_drives_training():
    model = tiny_llama()
    scores = dowser.probe(model, batches=token_batches(64), num_probes=2, progress=False)
    mask = dowser.build_mask(model, scores, update_ratio=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prepare_model(model, mask)
    opt = SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1)
    train(model, opt, token_batches(64), 3)
    frozen_unchanged(before, model, mask)


def test_adam_without_decay_keeps_frozen_entries_without_restore_hooks():
    model = tiny_llama()
    mask = random_mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with mask_gradients(model, mask) as gm:
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
        )
        n_hooks = len(gm._handles)
        gm.attach(opt)
        assert len(gm._handles) == n_hooks  # nothing to protect
        train(model, opt, token_batches(64), 4)
    frozen_unchanged(before, model, mask)
    # SGD with momentum and decay does need them, and gets them
    with mask_gradients(model, mask) as gm:
        opt = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad],
            lr=1e-2,
            momentum=0.9,
            weight_decay=0.1,
        )
        gm.attach(opt)
        train(model, opt, token_batches(64), 3)
    frozen_unchanged(before, model, mask)


def test_bfloat16_resume_keeps_indices_exact_and_frozen_entries_still():
    """Regression: torch casts loaded state to the weight dtype; bf16 indices > 256 would round."""
    batches = token_batches(64, n=4)
    straight = tiny_llama().to(torch.bfloat16)
    mask = random_mask(straight)
    before = {n: p.detach().clone() for n, p in straight.named_parameters()}
    prepare_model(straight, mask)
    opt = SparseAdamW(straight, mask, lr=1e-2, weight_decay=0.1)
    train(straight, opt, batches, 4)

    resumed = tiny_llama().to(torch.bfloat16)
    prepare_model(resumed, mask)
    opt = SparseAdamW(resumed, mask, lr=1e-2, weight_decay=0.1)
    train(resumed, opt, batches[:2], 2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = SparseAdamW(resumed, mask, lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    p = dict(resumed.named_parameters())["model.layers.1.mlp.down_proj.weight"]
    assert opt2.state[p]["idx"].dtype == torch.int32
    assert int(opt2.state[p]["idx"].max()) > 256  # would not survive a bf16 round trip
    train(resumed, opt2, batches[2:], 2)
    frozen_unchanged(before, resumed, mask)
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), n
