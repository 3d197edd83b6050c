"""Finding the matrices to probe from the model's structure."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from dowser import DowserError
from dowser.targets import find_decoder_layers, select_targets
from dowser.tiny import ARCHS, VLM_ARCHS, build_model


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_has_seven_projections_per_layer(arch):
    model, _ = build_model(arch, num_layers=3)
    targets = [t for t in select_targets(model) if t.group == "decoder"]
    assert len(targets) == 3 * 7
    assert {t.layer for t in targets} == {0, 1, 2}
    kinds = [t.kind for t in targets if t.layer == 0]
    assert kinds.count("attn") == 4 and kinds.count("mlp") == 3
    names = dict(model.named_parameters())
    for t in targets:
        assert names[t.param].shape == (t.out_features, t.in_features)


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_vision_tower_and_projector_are_told_apart(arch):
    model, _ = build_model(arch)
    groups = {t.group for t in select_targets(model, "all")}
    assert {"decoder", "encoder", "projector"} <= groups
    vision = select_targets(model, "vision", include_lm_head=False)
    assert vision and all(t.group == "encoder" for t in vision)
    assert all(t.layer is None for t in vision)


def test_untied_head_is_a_target_and_tied_head_is_not():
    heads = [t for t in select_targets(tiny_llama()) if t.group == "lm_head"]
    assert [t.param for t in heads] == ["lm_head.weight"]
    assert not [t for t in select_targets(tiny_llama(tie=True)) if t.group == "lm_head"]
    assert not [
        t for t in select_targets(tiny_llama(), include_lm_head=False) if t.group == "lm_head"
    ]


def test_gpt2_conv1d_is_found_transposed():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32)
    )
    targets = [t for t in select_targets(model) if t.group == "decoder"]
    assert len(targets) == 2 * 4  # c_attn, c_proj (attn), c_fc, c_proj (mlp)
    assert all(t.transposed for t in targets)
    c_fc = next(t for t in targets if t.module.endswith("mlp.c_fc"))
    assert (c_fc.out_features, c_fc.in_features) == (64, 16) and c_fc.kind == "mlp"
    assert next(t for t in targets if t.module.endswith("attn.c_attn")).kind == "attn"


def test_plain_torch_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(4, 3)

    net = Net()
    path, blocks = find_decoder_layers(net)
    assert path == "blocks" and blocks is net.blocks
    targets = select_targets(net)
    assert [t.module for t in targets] == [
        "blocks.0.fc1",
        "blocks.0.fc2",
        "blocks.1.fc1",
        "blocks.1.fc2",
    ]
    assert all(t.kind == "mlp" for t in targets)  # "fc" names


def test_regex_and_errors():
    model = tiny_llama()
    only_q = select_targets(model, r"q_proj$")
    assert [t.module for t in only_q] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    with pytest.raises(DowserError, match="matched no linear layer"):
        select_targets(model, r"nothing_like_this")
    with pytest.raises(DowserError, match="neither group names nor a regex"):
        select_targets(model, "(")
