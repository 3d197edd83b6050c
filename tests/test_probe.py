"""Probing math: exact Jacobian norms, the reference algorithm, hooks, synthetic inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, token_batches
from probe_oracle import check_against_oracle
from torch import nn

import dowser
from dowser import DowserError
from dowser.probing.reference import reference_probe
from dowser.probing.synthetic import synthetic_batches
from dowser.targets import select_targets
from dowser.tiny import VLM_ARCHS, build_model


def exact_column_norms(model, batch, module_name: str) -> torch.Tensor:
    """sqrt(mean over valid (b, t) of ||d f_b / d z_{b,t,i}||^2) by torch.func.jacrev.

    f_b = logits at sample b's last valid position; z = the module's output, perturbed by a
    `delta` that jacrev differentiates through (independent of dowser's hooks and probes).
    """
    module = dict(model.named_modules())[module_name]
    mask = batch["attention_mask"]
    last = mask.sum(1) - 1
    with torch.no_grad():
        out_shape = []
        h = module.register_forward_hook(lambda m, a, o: out_shape.append(o.shape))
        model(**batch)
        h.remove()

    def f(delta):
        hook = module.register_forward_hook(lambda m, a, o: o + delta)
        try:
            logits = model(**batch).logits
        finally:
            hook.remove()
        return logits[torch.arange(len(last)), last]  # (B, V)

    jac = torch.func.jacrev(f)(torch.zeros(out_shape[0]))  # (B, V, B, T, d_out)
    b = torch.arange(jac.shape[0])
    per_sample = jac[b, :, b]  # (B, V, T, d_out): sample b's output w.r.t. its own tokens
    sq = per_sample.pow(2).sum(1)  # (B, T, d_out): ||J_{b,t,i}||^2
    m = mask.bool()
    return sq[m].mean(0).sqrt()


def test_rms_converges_to_exact_jacobian_column_norms():
    model = tiny_llama(vocab=32)
    batch = token_batches(32, n=1, b=2, t=5)[0]
    scores = dowser.probe(model, batches=[batch], num_probes=1500, estimator="rms", progress=False)
    for module in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.gate_proj"):
        exact = exact_column_norms(model, batch, module)
        est = scores.factors[module + ".weight"].psi[0]
        rel = (est - exact).abs() / exact
        assert rel.mean() < 0.03, (module, rel)
        assert rel.max() < 0.15, (module, rel)
    # The head's sensitivity is fixed to 1 (reference behaviour).
    assert torch.equal(scores.factors["lm_head.weight"].psi, torch.ones(1, 32))


def test_rms_activation_is_mean_abs_input_over_valid_tokens():
    model = tiny_llama()
    batches = token_batches(64)
    scores = dowser.probe(model, batches=batches, num_probes=1, estimator="rms", progress=False)
    seen = []
    module = model.model.layers[1].mlp.down_proj
    h = module.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    total = sum(
        (x.abs() * b["attention_mask"][..., None]).sum((0, 1))
        for x, b in zip(seen, batches, strict=True)
    )
    count = sum(b["attention_mask"].sum() for b in batches)
    torch.testing.assert_close(
        scores.factors["model.layers.1.mlp.down_proj.weight"].act[0], total / count
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_factorised_scores_equal_dense_reference_accumulation(arch):
    if arch == "gpt2":  # Conv1D: weights stored transposed
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(
            GPT2Config(
                n_embd=16,
                n_layer=2,
                n_head=2,
                vocab_size=50,
                n_positions=32,
                tie_word_embeddings=False,
            )
        ).eval()
    else:
        model = tiny_llama()
    vocab = model.config.vocab_size
    batches = token_batches(vocab, n=3)
    scores = dowser.probe(model, batches=batches, num_probes=4, seed=5, progress=False)
    ref = reference_probe(model, batches, select_targets(model), num_probes=4, seed=5)
    assert set(ref) == set(scores.names)
    for name, dense in ref.items():
        ours = scores.dense(name)
        assert ours.shape == dense.shape
        torch.testing.assert_close(ours, dense, rtol=1e-4, atol=1e-7 * float(dense.abs().max()))


def test_probe_uses_no_parameter_gradients_and_restores_flags(llama):
    llama.lm_head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in llama.named_parameters()}
    dowser.probe(llama, batches=token_batches(64), num_probes=2, progress=False)
    assert all(p.grad is None for p in llama.parameters())
    assert {n: p.requires_grad for n, p in llama.named_parameters()} == flags
    assert not any(m._forward_hooks for m in llama.modules())


def test_hooks_are_removed_when_the_forward_raises(llama):
    def boom(module, args, output):
        raise RuntimeError("boom")

    llama.model.layers[1].mlp.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        dowser.probe(llama, batches=token_batches(64), num_probes=2, progress=False)
    hooks = [h for m in llama.modules() for h in m._forward_hooks.values()]
    assert hooks == [boom]  # only the user's own hook is left
    assert all(p.requires_grad for p in llama.parameters())


def test_same_seed_same_scores_and_other_seed_differs(llama):
    kw = dict(num_samples=4, batch_size=2, num_probes=2, seq_len=8, progress=False)
    a = dowser.probe(llama, seed=1, **kw)
    b = dowser.probe(llama, seed=1, **kw)
    c = dowser.probe(llama, seed=2, **kw)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a.dense(name), b.dense(name))
    assert not torch.equal(a.dense(name), c.dense(name))


def test_synthetic_samples_follow_the_reference_recipe():
    from dowser.probing.synthetic import synthetic_samples

    model, tok = build_model("llama")
    samples, pad = synthetic_samples(
        model,
        tokenizer=tok,
        num_samples=12,
        seq_len=10,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        progress=False,
    )
    assert len(samples) == 12 and pad == tok.pad_token_id
    special = set(tok.all_special_ids)
    for s in samples:
        assert s.ids[0] == tok.bos_token_id
        assert 2 <= len(s.ids) <= 10
        assert not special & set(s.ids[1:2])  # the first random token is never special
        if len(s.ids) < 10:  # stopped early: only at EOS
            assert s.ids[-1] == tok.eos_token_id
    assert len({tuple(s.ids) for s in samples}) == 12


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_noise_images_reach_the_vision_tower(arch):
    model, processor = build_model(arch)
    scores = dowser.probe(
        model,
        processor=processor,
        images="noise",
        layers="all",
        num_samples=4,
        batch_size=2,
        num_probes=2,
        seq_len=8,
        progress=False,
    )
    vision = [n for n, t in scores.targets.items() if t.group == "encoder"]
    assert vision
    assert scores.meta["images"] == "noise"
    # the same self-generated batches through plain autograd give the same factors, vision
    # layers included (every patch counts; text layers count valid tokens only)
    batches = synthetic_batches(
        model, processor=processor, images="noise", num_samples=4, batch_size=2, seq_len=8
    )
    assert any("pixel_values" in b for b in batches)
    check_against_oracle(model, scores, batches, num_probes=2, seed=0)


def test_vision_layers_without_images_is_a_clear_error():
    model, processor = build_model("llava")
    with pytest.raises(DowserError, match="never called"):
        dowser.probe(
            model,
            processor=processor,
            layers="vision",
            num_samples=2,
            num_probes=1,
            seq_len=6,
            progress=False,
        )


def test_plain_module_with_batches_and_output_fn():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            for b in self.blocks:
                x = torch.tanh(b(x))
            return self.out(x)

    net = Net()
    batches = [{"x": torch.randn(5, 6)} for _ in range(2)]
    scores = dowser.probe(net, batches=batches, output_fn=lambda y: y, num_probes=3, progress=False)
    assert scores.names == ["blocks.0.weight", "blocks.1.weight"]
    assert scores.dense("blocks.0.weight").shape == (6, 6)
    check_against_oracle(net, scores, batches, num_probes=3, seed=0, f_of=lambda y, b: y)
    with pytest.raises(DowserError, match="can generate"):
        dowser.probe(net, progress=False)


def test_encoder_decoder_with_user_batches():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=40,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
    )
    model = T5ForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(0)
    plain = {
        "input_ids": torch.randint(1, 40, (2, 6), generator=g),
        "decoder_input_ids": torch.randint(1, 40, (2, 4), generator=g),
    }
    # ragged decoder text: f is read at each sample's last valid decoder position
    padded = {**plain, "decoder_attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    batches = [plain, padded]
    scores = dowser.probe(model, batches=batches, layers="all", num_probes=2, progress=False)
    decoder = [t for t in scores.targets.values() if t.group == "decoder"]
    assert decoder and all(t.module.startswith("decoder.") for t in decoder)
    assert any(t.group == "encoder" for t in scores.targets.values())
    check_against_oracle(model, scores, batches, num_probes=2, seed=0)


def test_bad_arguments(llama):
    with pytest.raises(DowserError, match="estimator"):
        dowser.probe(llama, estimator="fisher")
    with pytest.raises(DowserError, match="num_probes"):
        dowser.probe(llama, num_probes=0)
    with pytest.raises(DowserError, match="images"):
        dowser.probe(llama, images="photos", progress=False)
    with pytest.raises(DowserError, match="processor"):
        dowser.probe(llama, images="noise", progress=False)
    with pytest.raises(DowserError, match="empty"):
        dowser.probe(llama, batches=[], progress=False)


def test_nan_weights_give_a_clear_error(llama):
    with torch.no_grad():
        llama.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(DowserError, match="non-finite"):
        dowser.probe(llama, batches=token_batches(64), num_probes=1, progress=False)


def test_padding_never_masks_vision_patches():
    """Regression: a vision input whose patch count equals the text length is not text."""
    model, processor = build_model("idefics3")  # 16 patches per image
    from dowser.probing.synthetic import probe_batches, synthetic_samples

    samples, pad = synthetic_samples(
        model,
        processor=processor,
        num_samples=2,
        seq_len=8,
        images="noise",
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        progress=False,
    )
    (batch,) = probe_batches(samples, 2, pad)
    stats = []
    for extra in (16 - batch["input_ids"].shape[1], 17 - batch["input_ids"].shape[1]):
        b = dict(batch)
        for key in ("input_ids", "attention_mask"):
            fill = pad if key == "input_ids" else 0
            b[key] = torch.cat([b[key], torch.full((2, extra), fill)], 1)
        s = dowser.probe(
            model, batches=[b], layers="vision", include_lm_head=False, num_probes=1, progress=False
        )
        stats.append(s)
    for n in stats[0].names:
        torch.testing.assert_close(stats[0].factors[n].act, stats[1].factors[n].act)
