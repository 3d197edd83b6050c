"""Probing a model placed with a device map (accelerate: CPU and disk offload here).

On this CPU machine the map puts part of each model on disk; on a GPU machine the same code
spreads it over GPUs too. Scores must equal those of the model loaded whole.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_cli import FAST, NOISE, run, user_error

import dowser
from dowser.hf import load_model
from dowser.scores import Scores

PROBE = dict(num_samples=4, batch_size=2, num_probes=2, seq_len=8, progress=False)


def half_of(model_dir) -> int:
    """A CPU budget of half the checkpoint's weights: the rest must go to disk."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) // 2


@pytest.mark.parametrize("arch", ["llama", "llava"])
def test_offloaded_probe_equals_whole_model(checkpoint_dirs, tmp_path, arch):
    images = "noise" if arch in NOISE else "off"
    whole, tok, proc = load_model(checkpoint_dirs[arch])
    want = dowser.probe(whole, tokenizer=tok, processor=proc, images=images, **PROBE)
    placed, tok, proc = load_model(
        checkpoint_dirs[arch],
        device_map="auto",
        max_memory={"cpu": half_of(checkpoint_dirs[arch])},
        offload_folder=tmp_path / "offload",
    )
    assert "disk" in set(placed.hf_device_map.values())
    assert any(p.device.type == "meta" for p in placed.parameters())  # really offloaded
    got = dowser.probe(placed, tokenizer=tok, processor=proc, images=images, **PROBE)
    assert got.names == want.names
    for n in want.names:
        assert torch.equal(got.factors[n].psi, want.factors[n].psi), n
        assert torch.equal(got.factors[n].act, want.factors[n].act), n
    assert got.fingerprints == want.fingerprints  # read from the offloaded weights
    # the offloaded model's scores bind to it, and give the whole model's mask
    mask = dowser.build_mask(placed, got, update_ratio=0.1)
    ref = dowser.build_mask(whole, want, update_ratio=0.1)
    assert all(torch.equal(mask[n], ref[n]) for n in ref)
    with pytest.raises(dowser.DowserError, match="device map"):
        dowser.probe(placed, tokenizer=tok, device="cpu", **PROBE)


def test_cli_device_map(checkpoint_dirs, tmp_path, capsys):
    ckpt = checkpoint_dirs["llama"]
    code, _, err = run(["probe", ckpt, "--out", tmp_path / "whole.safetensors", *FAST], capsys)
    assert code == 0, err
    argv = ["probe", ckpt, "--out", tmp_path / "placed.safetensors", *FAST]
    placement = ["--device-map", "auto", "--max-memory", f"cpu={half_of(ckpt)}"]
    code, out, err = run([*argv, *placement, "--offload-folder", tmp_path / "off"], capsys)
    assert code == 0, err
    assert "peak memory:" in out and "host" in out
    a = Scores.load(tmp_path / "whole.safetensors")
    b = Scores.load(tmp_path / "placed.safetensors")
    for n in a.names:
        assert torch.equal(a.factors[n].psi, b.factors[n].psi)
        assert torch.equal(a.factors[n].act, b.factors[n].act)
    # user errors: one line, exit 2, nothing written
    bad = tmp_path / "bad.safetensors"
    base = ["probe", ckpt, "--out", bad, *FAST]
    user_error([*base, "--device", "cpu", "--device-map", "auto"], capsys, "give one")
    user_error([*base, "--max-memory", "cpu=1GiB"], capsys, "only with --device-map")
    with pytest.raises(SystemExit) as exit_:  # argparse: usage line and the reason
        run([*base, "--device-map", "auto", "--max-memory", "gpu=1GiB"], capsys)
    assert exit_.value.code == 2 and "not a device" in capsys.readouterr().err
    assert not bad.exists()
