"""Paths of the math modules the main tests do not reach, found by mutation testing
(`make mutate`): batches without an attention mask, models that return tuples, unmasked token
rows, boundary hyper-parameters, crafted delta files, format-1 deltas of another base."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import save_file

import dowser
from dowser import Mask
from dowser.errors import DowserError
from dowser.eval.perturbation import _valid_logprobs
from dowser.fingerprint import SAMPLES, model_fingerprints
from dowser.probing.capture import TokenMask
from dowser.probing.outputs import _logits
from dowser.train.artifacts import apply_delta, save_delta
from dowser.train.sparse_adamw import SparseAdamW


def test_logprobs_without_an_attention_mask_keep_every_position():
    model = tiny_llama()
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    got = _valid_logprobs(model, {"input_ids": ids})
    want = torch.log_softmax(model(input_ids=ids).logits.float(), -1).reshape(10, -1)
    assert got.shape == (10, 64) and torch.equal(got, want)


def test_token_rows_without_a_mask_are_every_row():
    x = torch.arange(2 * 3 * 5, dtype=torch.float64).reshape(2, 3, 5)  # T = 3 != d = 5
    for mask, masked in ((None, True), (torch.ones(2, 3), False)):
        rows = TokenMask(mask).rows(x, masked=masked)
        assert rows.dtype == torch.float32 and torch.equal(rows, x.reshape(6, 5).float())
    rows = TokenMask(torch.tensor([[1, 1, 0], [0, 1, 1]])).rows(x)
    assert torch.equal(rows, x.reshape(6, 5)[[0, 1, 4, 5]].float())


def test_logits_from_a_tuple_output_are_its_first_element():
    logits = torch.randn(2, 4, 7)
    assert _logits((logits, "cache")) is logits
    assert _logits([logits]) is logits
    with pytest.raises(DowserError, match="output_fn"):
        _logits((torch.randn(2, 7),))


def test_probe_of_a_model_returning_tuples_equals_its_dict_twin():
    model = tiny_llama()
    batches = [{"input_ids": torch.randint(3, 64, (2, 6), generator=torch.Generator())}]

    class Tuples(torch.nn.Module):  # return_dict=False: (logits, ...)
        def __init__(self, inner):
            super().__init__()
            self.model, self.lm_head, self.config = inner.model, inner.lm_head, inner.config

        def forward(self, input_ids, **kw):
            return (self.lm_head(self.model(input_ids=input_ids).last_hidden_state),)

    common = dict(batches=batches, num_probes=2, seed=1, progress=False)
    a, b = dowser.probe(model, **common), dowser.probe(Tuples(model), **common)
    assert b.names and set(b.names) <= set(a.names)  # the wrapper hides the head: no lm_head
    for name in b.names:
        torch.testing.assert_close(a.dense(name), b.dense(name), rtol=1e-6, atol=0)


def test_sparse_adamw_refuses_a_beta_of_one():
    model = tiny_llama()
    w = "model.layers.1.mlp.up_proj.weight"
    mask = Mask({w: torch.ones_like(model.get_parameter(w), dtype=torch.bool)})
    dowser.prepare_model(model, mask)
    for betas in ((0.9, 1.0), (1.0, 0.999), (-0.1, 0.9)):
        with pytest.raises(DowserError, match=r"must lie in \[0, 1\)"):
            SparseAdamW(model, mask, betas=betas)
    SparseAdamW(model, mask, betas=(0.0, 0.999))  # 0 is allowed


def _delta(model, tmp_path, *, digests: bool):
    w = "model.layers.1.mlp.up_proj.weight"  # 32 x 16
    shape = model.get_parameter(w).shape
    mask = Mask({w: torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.1})
    fps = model_fingerprints(model, [w])
    dig = dowser.fingerprint.model_digests(model, [w]) if digests else None
    path = tmp_path / f"d{int(digests)}.safetensors"
    return save_delta(model, mask, path, base_fingerprints=fps, base_digests=dig), w


def test_save_delta_never_overwrites_unless_asked_and_names_what_is_missing(tmp_path):
    model = tiny_llama(layers=2, vocab=64)
    path, w = _delta(model, tmp_path, digests=True)
    before = path.read_bytes()
    mask = Mask({w: torch.ones_like(model.get_parameter(w), dtype=torch.bool)})
    fps = model_fingerprints(model, [w])
    with pytest.raises(DowserError, match="exists"):
        save_delta(model, mask, path, base_fingerprints=fps)
    assert path.read_bytes() == before
    save_delta(model, mask, path, base_fingerprints=fps, overwrite=True)
    assert path.read_bytes() != before
    with pytest.raises(DowserError, match=f"no base fingerprint for {w}"):
        save_delta(model, mask, tmp_path / "x.safetensors", base_fingerprints={})
    with pytest.raises(DowserError, match=f"no base digest for {w}"):
        save_delta(model, mask, tmp_path / "x.safetensors", base_fingerprints=fps, base_digests={})


def test_format_1_delta_of_another_base_is_refused_by_its_fingerprints(tmp_path):
    model = tiny_llama(layers=2, vocab=64)
    path, w = _delta(model, tmp_path, digests=False)
    numel = model.get_parameter(w).numel()
    seen = torch.linspace(0, numel - 1, SAMPLES, dtype=torch.float64).round().long()
    with torch.no_grad():
        model.get_parameter(w).view(-1)[seen[7]] += 1.0  # an entry the fingerprint reads
    before = model.get_parameter(w).clone()
    with pytest.raises(DowserError, match="another base model: 1 weights with other values"):
        apply_delta(model, path)
    assert torch.equal(model.get_parameter(w), before)


def test_boolean_or_2d_indices_are_corrupt(tmp_path):
    model = tiny_llama(layers=2, vocab=64)
    path, w = _delta(model, tmp_path, digests=True)
    from dowser.io import load_safetensors

    tensors, meta = load_safetensors(path, kind="delta")
    idx = tensors[f"{w}::indices"]
    numel = model.get_parameter(w).numel()
    for bad in (torch.zeros(numel, dtype=torch.bool), idx[None], idx.float()):
        crafted = {**tensors, f"{w}::indices": bad}
        if bad.dtype == torch.bool:  # as many values as indices: only the dtype is wrong
            crafted[f"{w}::values"] = torch.zeros(len(bad))
        out = tmp_path / "crafted.safetensors"
        save_file(crafted, out, metadata={"dowser": json.dumps(meta)})
        with pytest.raises(DowserError, match="do not fit its shape"):
            apply_delta(model, out)


def test_probe_records_its_seed_and_a_custom_output():
    model = tiny_llama()
    batches = [{"input_ids": torch.randint(3, 64, (2, 6), generator=torch.Generator())}]
    common = dict(batches=batches, num_probes=2, progress=False)
    plain = dowser.probe(model, seed=5, **common)
    assert plain.meta["seed"] == 5 and plain.meta["output"] == "logits"
    custom = dowser.probe(model, seed=5, output_fn=lambda out: out.logits[:, -1], **common)
    assert custom.meta["output"] == "custom"


def test_scores_of_another_shape_say_so():
    scores = dowser.probe(tiny_llama(), num_samples=2, seq_len=6, num_probes=1, progress=False)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = tiny_llama().config.to_dict() | {"intermediate_size": 48}
    other = LlamaForCausalLM(LlamaConfig(**config)).eval()
    with pytest.raises(DowserError, match="weights of another shape .*mlp"):
        scores.check(other)


def test_token_sums_mask_padding_by_default():
    x = torch.ones(2, 3, 4)
    mask = TokenMask(torch.tensor([[1, 1, 0], [1, 0, 0]]))
    total, n = mask.sum(x)
    assert n == 3 and torch.equal(total, torch.full((4,), 3.0))
    assert mask.sum(x, masked=False)[1] == 6


def test_a_plain_dict_mask_guesses_layer_kind_and_group_free_info():
    mask = Mask(
        {
            "model.layers.3.self_attn.q_proj.weight": torch.ones(2, 2, dtype=torch.bool),
            "model.layers.1.mlp.up_proj.weight": torch.ones(2, 2, dtype=torch.bool),
            "lm_head.weight": torch.ones(2, 2, dtype=torch.bool),
        }
    )
    kinds = {n: (i["layer"], i["kind"]) for n, i in mask.info.items()}
    assert list(kinds.values()) == [(3, "attn"), (1, "mlp"), (None, "other")]


def test_built_masks_record_each_matrix_group():
    model = tiny_llama()
    scores = dowser.probe(model, num_samples=2, seq_len=6, num_probes=1, progress=False)
    mask = dowser.build_mask(model, scores, update_ratio=0.5, targets="attn,mlp,lm_head")
    groups = {i["group"] for i in mask.info.values()}
    assert groups == {"decoder", "lm_head"}


def test_tuned_norms_of_a_model_without_decoder_layers_is_empty():
    from dowser.train.masking import tuned_norms

    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    mask = Mask({"0.weight": torch.ones(3, 3, dtype=torch.bool)})
    mask.info["0.weight"]["layer"] = 0  # a layer index, but no decoder block stack to find
    assert tuned_norms(net, mask) == {}


def test_the_suggested_ratio_fits_when_almost_every_entry_is_free():
    from types import SimpleNamespace

    from dowser.selection import check_room

    scores = SimpleNamespace(shapes={"w": (200, 100)}, targets={})
    excluded = {"w": torch.zeros(200, 100, dtype=torch.bool)}
    excluded["w"][0, 0] = True  # 19,999 of 20,000 entries free: 0.99995, rounded down
    with pytest.raises(DowserError, match=r"only 19999 free; use update_ratio <= 0\.9999$"):
        check_room(scores, [["w"]], excluded, 1.0, "tensor", "entry")
    check_room(scores, [["w"]], excluded, 0.9999, "tensor", "entry")  # the suggestion fits


def test_excluded_mask_ids_depend_on_names_shapes_and_bits():
    from dowser.selection import exclusion_record

    bits = torch.tensor([[True, False], [False, True]])
    masks = [
        {"x.weight": bits},
        {"y.weight": bits},  # another matrix
        {"x.weight": bits.reshape(1, 4)},  # another shape
        {"x.weight": ~bits},  # other entries
        {"x.weight": bits.clone()},  # the first again
    ]
    record = exclusion_record(masks, {"x.weight": bits})
    assert len(set(record["masks"][:4])) == 4 and record["masks"][4] == record["masks"][0]
    assert record["entries"] == {"x.weight": 2}
