"""Masks refreshed during training: GradientMask.swap and the benchmark's dowser-refresh."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, token_batches

import dowser
from dowser import DowserError, Mask
from dowser.forgetting.refresh import refresher
from dowser.forgetting.train import train_loop

W = "model.layers.1.mlp.up_proj.weight"


class Tokens:
    """train_loop's data: random sequences, the next token as label."""

    def __init__(self, n: int = 24, t: int = 6, vocab: int = 64):
        self.ids = torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows) -> dict:
        ids = self.ids[rows]
        return {"input_ids": ids, "labels": ids}


def _mask(model, seed: int, ratio: float = 0.2) -> Mask:
    g = torch.Generator().manual_seed(seed)
    names = [n for n, _ in model.named_parameters() if ".layers.1." in n and "proj" in n]
    shapes = dict(model.named_parameters())
    return Mask({n: torch.rand(shapes[n].shape, generator=g) < ratio for n in names})


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_swap_trains_the_new_mask_and_holds_everything_else(weight_decay):
    """After the swap, every entry the new mask freezes stays bit-identical (also those the
    old mask trained, whose Adam moments are zeroed), and the new mask's entries move."""
    model = tiny_llama()
    first, second = _mask(model, 0), _mask(model, 1)
    data = Tokens()
    with dowser.mask_gradients(model, first) as gm:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)
        gm.attach(opt)
        p = dict(model.named_parameters())[W]
        for rows in (range(0, 4), range(4, 8)):
            loss = model(**data.batch(list(rows))).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        before = p.detach().clone()
        assert (before != tiny_llama().state_dict()[W])[first[W]].any()  # the first trained
        gm.swap(second, opt)
        state = opt.state[p]
        assert (state["exp_avg"][~second[W]] == 0).all()
        assert (state["exp_avg_sq"][~second[W]] == 0).all()
        for rows in (range(8, 12), range(12, 16)):
            model(**data.batch(list(rows))).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        after = p.detach()
        assert torch.equal(after[~second[W]], before[~second[W]])
        assert (after != before)[second[W]].float().mean() > 0.9


def test_swap_refuses_a_mask_over_other_weights():
    model = tiny_llama()
    first = _mask(model, 0)
    with dowser.mask_gradients(model, first) as gm:
        fewer = Mask({n: m for n, m in list(first.items())[:-1]})
        with pytest.raises(DowserError, match="same weights"):
            gm.swap(fewer)
        assert gm.mask is first


def test_refresher_probes_the_current_model_at_its_steps():
    """3 masks over 9 steps: new ones at steps 3 and 6, each built on the model as it is
    then (in eval mode), and only the union of the three masks' entries ever moves."""
    model = tiny_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    built: list[tuple[int, bool]] = []
    steps_done = []

    def build(current):
        built.append((len(steps_done), current.training))
        scores = dowser.probe(current, batches=token_batches(64), num_probes=2, progress=False)
        return dowser.build_mask(current, scores, update_ratio=0.2, targets=r"layers\.1\..*proj")

    scores = dowser.probe(model, batches=token_batches(64), num_probes=2, progress=False)
    mask = dowser.build_mask(model, scores, update_ratio=0.2, targets=r"layers\.1\..*proj")
    with dowser.mask_gradients(model, mask) as gm:
        on_step = refresher("dowser-refresh", model, gm, 9, build)

        def counted(done, opt):
            steps_done.append(done)
            on_step(done, opt)

        params = [p for p in model.parameters() if p.requires_grad]
        train_loop(
            model, params, Tokens(), steps=9, batch_size=4, lr=1e-2, seed=0,
            attach=gm.attach, on_step=counted, progress=False,
        )  # fmt: skip
    assert built == [(3, False), (6, False)]
    masks = on_step.masks
    assert len(masks) == 3 and masks[0] is mask
    assert any(not torch.equal(masks[0][n], masks[1][n]) for n in mask)  # the model moved
    for n, p in model.named_parameters():
        moved = p.detach() != base[n]
        if n in mask:
            union = masks[0][n] | masks[1][n] | masks[2][n]
            assert not moved[~union].any(), n
        elif "norm" not in n:
            assert not moved.any(), n
