"""Shared fixtures: tiny models built in code, seeded; never a hub download."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_llama(seed: int = 0, *, layers: int = 2, vocab: int = 64, tie: bool = False):
    """A ~30k-parameter Llama with eager attention (torch.func friendly), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def token_batches(vocab: int, n: int = 2, b: int = 3, t: int = 7, seed: int = 1) -> list[dict]:
    """Random-token batches, right-padded with ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (b, t), generator=g)
        lengths = torch.randint(2, t + 1, (b,), generator=g)
        lengths[0] = t
        mask = (torch.arange(t)[None] < lengths[:, None]).long()
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def checkpoint_dirs(tmp_path_factory):
    """Every tiny architecture saved once: arch -> directory."""
    from dowser.tiny import ARCHS, build_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {arch: build_checkpoint(arch, root / arch) for arch in ARCHS}
