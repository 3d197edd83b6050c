"""Oracles that share no code with the package: the default probe, SparseAdamW, mask scopes.

Each test recomputes the package's result from its documented equation with plain torch and
compares closely (or exactly), so a plausible slip (a dropped position rule, a reordered decay,
groups ranked apart) fails here even when the package's own helpers agree with each other.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from probe_oracle import check_against_oracle
from torch import nn

import dowser

# ---------------------------------------------------------------- the default probe estimator


def padded_batches(vocab: int) -> list[dict]:
    """Fixed ragged batches: right-padded, left-padded, and one without padding.

    Lengths differ within each batch, so taking the last position instead of the last valid
    one reads padding logits, and averaging over every token counts padding activations.
    """
    g = torch.Generator().manual_seed(11)
    out = []
    for lengths, left in (([6, 3, 5], False), ([2, 6, 4], True), ([6, 6], False)):
        t = max(lengths)
        ids = torch.randint(3, vocab, (len(lengths), t), generator=g)
        mask = torch.zeros(len(lengths), t, dtype=torch.long)
        for b, n in enumerate(lengths):
            if left:
                mask[b, t - n :] = 1
            else:
                mask[b, :n] = 1
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


def tiny_gpt2():
    """GPT-2 with Conv1D weights stored (d_in, d_out): the transposed layout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=48, n_positions=16, tie_word_embeddings=False
    )
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_default_probe_matches_plain_autograd_oracle(make):
    model = make()
    batches = padded_batches(model.config.vocab_size)
    scores = dowser.probe(model, batches=batches, num_probes=3, seed=4, progress=False)
    assert scores.meta["estimator"] == "mean-abs"
    check_against_oracle(model, scores, batches, num_probes=3, seed=4)


def test_rms_probe_matches_plain_autograd_oracle():
    # the rms estimator pools sqrt(mean g^2) over every batch (no 1/B): its own oracle path
    model = tiny_llama()
    batches = padded_batches(model.config.vocab_size)
    scores = dowser.probe(
        model, batches=batches, estimator="rms", num_probes=3, seed=4, progress=False
    )
    check_against_oracle(model, scores, batches, num_probes=3, seed=4, rms=True)


def test_oracle_tells_the_last_valid_position_from_the_last_position():
    """The oracle is sharp: taking the final position (padding) gives other factors."""
    model = tiny_llama()
    batches = padded_batches(model.config.vocab_size)
    scores = dowser.probe(model, batches=batches, num_probes=2, seed=0, progress=False)

    def final_position(outputs, batch):
        return outputs.logits[:, -1].float()

    with pytest.raises(AssertionError, match="psi"):
        check_against_oracle(model, scores, batches, num_probes=2, seed=0, f_of=final_position)


# ---------------------------------------------------------------- SparseAdamW against AdamW


class Params(nn.Module):
    """Two weight matrices (masked) and a vector (trained densely), no forward of their own."""

    def __init__(self, seed: int, shapes=((5, 7), (3, 4)), dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Linear(*shapes[0][::-1], bias=False, dtype=dtype)
        self.b = nn.Linear(*shapes[1][::-1], bias=False, dtype=dtype)
        self.norm = nn.Parameter(torch.randn(shapes[1][0], generator=g, dtype=dtype))
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(shapes[0], generator=g))
            self.b.weight.copy_(torch.randn(shapes[1], generator=g))


def run_pair(model, mask, hyper: dict, steps: int, seed: int) -> tuple[nn.Module, nn.Module]:
    """`steps` of SparseAdamW on `model` and of torch.optim.AdamW (single-tensor, the same
    dtype) on a dense copy, both fed the same gradients: loss = sum_p (p * G_p,step)."""
    import copy

    ref = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(True)
    ours = dowser.SparseAdamW(model, mask, **hyper)
    theirs = torch.optim.AdamW(list(ref.parameters()), foreach=False, fused=False, **hyper)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]
        for net, opt in ((model, ours), (ref, theirs)):
            opt.zero_grad()
            sum((p * G).sum() for p, G in zip(net.parameters(), grads, strict=True)).backward()
            opt.step()
    return model, ref


HYPER = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.3)


def test_sparse_adamw_with_every_entry_trainable_is_torch_adamw_exactly():
    model = Params(0)
    mask = dowser.Mask(
        {
            n: torch.ones(p.shape, dtype=torch.bool)
            for n, p in model.named_parameters()
            if p.dim() == 2
        }
    )
    ours, ref = run_pair(model, mask, HYPER, steps=60, seed=1)
    for (n, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_sparse_adamw_partial_mask_follows_adamw_and_freezes_the_rest():
    model = Params(2)
    g = torch.Generator().manual_seed(3)
    mask = dowser.Mask(
        {
            n: torch.rand(p.shape, generator=g) < 0.4
            for n, p in model.named_parameters()
            if p.dim() == 2
        }
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ours, ref = run_pair(model, mask, HYPER, steps=60, seed=4)
    theirs = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        if n in mask:
            m = mask[n]
            torch.testing.assert_close(p[m], theirs[n][m], rtol=0, atol=0, msg=n)
            assert torch.equal(p[~m], before[n][~m]), n  # frozen: bit-identical
            assert not torch.equal(p[m], before[n][m]), n
        else:  # the dense vector: plain AdamW
            torch.testing.assert_close(p, theirs[n], rtol=0, atol=0, msg=n)


# ---------------------------------------------------------------- which entries each scope picks


def lowest(values: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """The documented rule, by a plain stable sort: the round-half-up(ratio * n) smallest
    entries of the concatenation; ties go to the earlier tensor, then the lower flat index."""
    flat = torch.cat([v.reshape(-1) for v in values])
    k = int(ratio * flat.numel() + 0.5)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.sort(flat, stable=True).indices[:k]] = True
    return list(chosen.split([v.numel() for v in values]))


def expected_mask(model, scores, names: list[str], scope: str, ratio: float) -> dict:
    """name -> bool mask, recomputed from the scores (parameter layout) and the module types."""
    modules = dict(model.named_modules())
    dense = {n: scores.dense(n) for n in names}
    out = {}
    if scope == "row":  # each output unit; Conv1D stores output units as columns
        for n in names:
            conv = not isinstance(modules[scores.targets[n].module], nn.Linear)
            s = dense[n].T if conv else dense[n]
            rows = torch.stack([lowest([r], ratio)[0] for r in s])
            out[n] = rows.T if conv else rows
        return out
    if scope == "tensor":
        groups = [[n] for n in names]
    elif scope == "global":
        groups = [names]
    else:  # "layer": every matrix of one decoder layer together, others alone
        by: dict = {}
        for n in names:
            layer = [int(p) for p in n.split(".") if p.isdigit()]
            key = layer[0] if scores.targets[n].group == "decoder" else n
            by.setdefault(key, []).append(n)
        groups = list(by.values())
    for group in groups:
        picked = lowest([dense[n] for n in group], ratio)
        out.update({n: m.reshape(dense[n].shape) for n, m in zip(group, picked, strict=True)})
    return out


@pytest.fixture(scope="module", params=["llama", "gpt2-conv1d"])
def probed_pair(request):
    model = tiny_llama(layers=3) if request.param == "llama" else tiny_gpt2()
    batches = padded_batches(model.config.vocab_size)
    return model, dowser.probe(model, batches=batches, num_probes=2, progress=False)


@pytest.mark.parametrize("scope", ["tensor", "row", "layer", "global"])
@pytest.mark.parametrize("ratio", [0.05, 0.3])
def test_each_scope_picks_exactly_the_lowest_entries_of_its_groups(probed_pair, scope, ratio):
    model, scores = probed_pair
    mask = dowser.build_mask(model, scores, update_ratio=ratio, scope=scope, targets="all")
    names = list(scores.names)
    assert list(mask) == names
    want = expected_mask(model, scores, names, scope, ratio)
    for n in names:
        assert torch.equal(mask[n], want[n]), (scope, n)
    if scope == "layer":  # the oracle's groups really mix module types
        kinds = {scores.targets[n].kind for n in names if ".0." in n or ".h.0." in n}
        assert {"attn", "mlp"} <= kinds


def test_cross_attention_inputs_are_encoder_rows_whatever_the_decoder_length():
    """Regression: with equal encoder and decoder lengths the text mask fell on encoder rows
    (cross-attention k/v inputs), since masking was decided by shape alone."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
        decoder_start_token_id=0,
    )  # fmt: skip
    model = T5ForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1, 40, (2, 4), generator=g),
        "decoder_input_ids": torch.randint(1, 40, (2, 4), generator=g),  # same length: 4
        "decoder_attention_mask": torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]]),
    }
    scores = dowser.probe(model, batches=[batch], layers="all", num_probes=1, progress=False)
    with torch.no_grad():
        states = model.get_encoder()(input_ids=batch["input_ids"]).last_hidden_state
    for kv in ("k", "v"):
        act = scores.factors[f"decoder.block.0.layer.1.EncDecAttention.{kv}.weight"].act[0]
        torch.testing.assert_close(act, states.abs().reshape(-1, 16).mean(0))
    # the decoder's own inputs are still masked: q sees the valid decoder tokens only
    seen = []
    q = model.decoder.block[0].layer[1].EncDecAttention.q
    handle = q.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    valid = seen[0][batch["decoder_attention_mask"].bool()].abs().mean(0)
    act = scores.factors["decoder.block.0.layer.1.EncDecAttention.q.weight"].act[0]
    torch.testing.assert_close(act, valid)
