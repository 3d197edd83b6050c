"""dowser deltas as PEFT SHiRA adapters: PEFT's own merge gives apply-delta's weights bit for
bit, an adapter reads back into a delta that applies to the same weights, and bad input stops
with one line and nothing written."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel, ShiraConfig, get_peft_model
from torch import nn

from dowser import Mask
from dowser.adapters._reach import addends, bits
from dowser.adapters.peft import export_peft, import_peft
from dowser.cli import main
from dowser.errors import DowserError
from dowser.fingerprint import model_digests, model_fingerprints
from dowser.hf import load_model
from dowser.tiny import build_checkpoint, build_model, save_checkpoint
from dowser.train.artifacts import apply_delta, save_delta

Q = "model.layers.0.self_attn.q_proj.weight"  # 64 x 64
UP = "model.layers.0.mlp.up_proj.weight"  # 128 x 64


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = {arch: build_checkpoint(arch, root / arch) for arch in ("llama", "llava")}
    for arch in ("llama", "llava"):  # the same models saved in bfloat16
        model, processor = build_model(arch)
        out[f"{arch}-bf16"] = save_checkpoint(
            model.to(torch.bfloat16), processor, root / f"{arch}-bf16"
        )
    out["other"] = build_checkpoint("llama", root / "other", seed=1)
    return out


def linears(model) -> list[str]:
    """The weights of every nn.Linear except the output head."""
    return [
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not n.endswith("lm_head")
    ]


def make_delta(model_dir, path, *, ratio=0.05, mask=None, edit=None):
    """A delta of `model_dir`: `ratio` of every linear weight trained (a random mask) and two
    norms dense, each moved by a random step in the weights' dtype (or by `edit`)."""
    model, _, _ = load_model(model_dir)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    if mask is None:
        mask = Mask({n: torch.rand(params[n].shape, generator=g) < ratio for n in linears(model)})
    norms = [n for n in params if n.endswith("norm.weight")][:2]
    names = [*mask, *norms]
    fps, digests = model_fingerprints(model, names), model_digests(model, names)
    with torch.no_grad():
        for n, m in mask.items():
            step = torch.randn(int(m.sum()), generator=g) * 1e-2
            params[n][m] += step.to(params[n].dtype)
        for n in norms:
            params[n] += 0.25
        if edit is not None:
            edit(params)
    save_delta(model, mask, path, base_fingerprints=fps, dense=norms, base_digests=digests)
    return path


def same_bits(a: nn.Module, b: nn.Module) -> list[str]:
    """Names of the parameters that differ in dtype or in any bit (empty: identical)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert set(pa) == set(pb)
    return [
        n for n in pa if pa[n].dtype != pb[n].dtype or not torch.equal(bits(pa[n]), bits(pb[n]))
    ]


def applied(model_dir, delta):
    model, _, _ = load_model(model_dir)
    return apply_delta(model, delta)


def peft_merged(model_dir, adapter):
    model, _, _ = load_model(model_dir)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


@pytest.mark.parametrize("arch", ["llama", "llama-bf16", "llava-bf16"])
def test_round_trip_is_bit_identical(dirs, tmp_path, arch):
    delta = make_delta(dirs[arch], tmp_path / "d.safetensors")
    done = export_peft(delta, dirs[arch], tmp_path / "adapter")
    assert len(done.matrices) > 10 and done.entries > 0 and len(done.whole) == 2
    reference = applied(dirs[arch], delta)
    merged = peft_merged(dirs[arch], tmp_path / "adapter")
    assert same_bits(merged, reference) == []
    # the merge moved the weights: the comparison is not between two unchanged bases
    base, _, _ = load_model(dirs[arch])
    assert len(same_bits(base, reference)) == len(done.matrices) + len(done.whole)
    back = import_peft(tmp_path / "adapter", dirs[arch], tmp_path / "back.safetensors")
    assert same_bits(applied(dirs[arch], back), reference) == []


def test_a_given_model_is_left_as_it_was(dirs, tmp_path):
    delta = make_delta(dirs["llama"], tmp_path / "d.safetensors")
    model, _, _ = load_model(dirs["llama"])
    untouched, _, _ = load_model(dirs["llama"])
    export_peft(delta, model, tmp_path / "adapter")
    assert type(model).__name__ == "LlamaForCausalLM" and same_bits(model, untouched) == []
    assert (
        same_bits(peft_merged(dirs["llama"], tmp_path / "adapter"), applied(dirs["llama"], delta))
        == []
    )


def test_an_unreachable_value_is_refused_or_stored_whole(dirs, tmp_path):
    """float32: 1e-9 is not base + d for any float32 d when the base is about 0.05 (the sum
    lies on the base's grid, ulp 2^-28); refused unless dense_fallback stores q_proj whole."""

    def shrink(params):
        params[Q].view(-1)[0] = 1e-9

    model, _, _ = load_model(dirs["llama"])
    mask = Mask(
        {
            n: torch.zeros_like(p, dtype=torch.bool)
            for n, p in model.named_parameters()
            if n in (Q, UP)
        }
    )
    mask[Q].view(-1)[:40] = True
    mask[UP].view(-1)[:40] = True
    b = model.get_parameter(Q).detach().reshape(-1)[:1]
    assert abs(b.item()) > 1e-3  # so the claim above holds for this entry
    _, reached = addends(b, torch.tensor([1e-9]), torch.float32)
    assert not reached.any()
    delta = make_delta(dirs["llama"], tmp_path / "d.safetensors", mask=mask, edit=shrink)
    with pytest.raises(DowserError, match=f"1 of 40 entries of {Q} cannot be reached"):
        export_peft(delta, dirs["llama"], tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    done = export_peft(delta, dirs["llama"], tmp_path / "adapter", dense_fallback=True)
    assert Q.removesuffix(".weight") in done.whole and done.matrices == [UP.removesuffix(".weight")]
    reference = applied(dirs["llama"], delta)
    assert same_bits(peft_merged(dirs["llama"], tmp_path / "adapter"), reference) == []
    back = import_peft(tmp_path / "adapter", dirs["llama"], tmp_path / "back.safetensors")
    assert same_bits(applied(dirs["llama"], back), reference) == []


def test_counts_shira_cannot_hold_are_refused(dirs, tmp_path):
    """Fully trained up_proj (8,192 entries) needs r = ceil(8192 / 192) = 43: q_proj would
    then hold 43 * 128 = 5,504 > 64 * 64 entries."""
    model, _, _ = load_model(dirs["llama"])
    g = torch.Generator().manual_seed(0)
    mask = Mask(
        {Q: torch.rand(64, 64, generator=g) < 0.05, UP: torch.ones(128, 64, dtype=torch.bool)}
    )
    delta = make_delta(dirs["llama"], tmp_path / "d.safetensors", mask=mask)
    with pytest.raises(DowserError, match=r"q_proj.weight cannot be a SHiRA matrix.*r = 43.*5504"):
        export_peft(delta, dirs["llama"], tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_an_adapter_trained_with_peft_imports(dirs, tmp_path):
    """A SHiRA adapter PEFT made itself (random mask, random values): its delta applies to
    the weights PEFT's merge gives."""
    model, _, _ = load_model(dirs["llama"])
    config = ShiraConfig(
        r=2, target_modules=["q_proj", "down_proj"], random_seed=3, init_weights=False
    )
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    delta = import_peft(tmp_path / "adapter", dirs["llama"], tmp_path / "d.safetensors")
    merged = peft_merged(dirs["llama"], tmp_path / "adapter")
    assert same_bits(applied(dirs["llama"], delta), merged) == []


def cli(args, capsys):
    """(exit code, dowser's own stderr lines): progress bars of model loading left out."""
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, "\n".join(line for line in err.splitlines() if line.startswith("dowser "))


def test_cli_round_trip_and_overwrite(dirs, tmp_path, capsys):
    delta = make_delta(dirs["llama"], tmp_path / "d.safetensors")
    out = tmp_path / "adapter"
    args = ["export-peft", str(delta), "--base", str(dirs["llama"]), "--out", str(out)]
    assert main(args) == 0
    stamp = os.stat(out / "adapter_model.safetensors").st_mtime_ns
    code, err = cli(args, capsys)
    assert code == 2 and "is not empty; pass --overwrite" in err and len(err.splitlines()) == 1
    assert os.stat(out / "adapter_model.safetensors").st_mtime_ns == stamp
    assert main([*args, "--overwrite"]) == 0
    back = tmp_path / "back.safetensors"
    assert main(["import-peft", str(out), "--base", str(dirs["llama"]), "--out", str(back)]) == 0
    code, err = cli(
        ["import-peft", str(out), "--base", str(dirs["llama"]), "--out", str(back)], capsys
    )
    assert code == 2 and "already exists; pass --overwrite" in err
    assert same_bits(applied(dirs["llama"], back), applied(dirs["llama"], delta)) == []


def test_cli_refuses_bad_input(dirs, tmp_path, capsys):
    delta = make_delta(dirs["llama"], tmp_path / "d.safetensors")
    adapter = tmp_path / "adapter"
    export_peft(delta, dirs["llama"], adapter)
    other, back, out = str(dirs["other"]), tmp_path / "back.safetensors", tmp_path / "a2"
    cases = [  # (arguments, what the one line says)
        (["export-peft", str(delta), "--base", other, "--out", str(out)], "made from another base"),
        (["import-peft", str(adapter), "--base", other, "--out", str(back)], "another base"),
        (["import-peft", other, "--base", other, "--out", str(back)], "not a PEFT adapter"),
        (
            ["import-peft", str(tmp_path / "no"), "--base", other, "--out", str(back)],
            "not a folder",
        ),
        (
            [
                "export-peft",
                str(adapter / "adapter_config.json"),
                "--base",
                other,
                "--out",
                str(out),
            ],
            "",
        ),
    ]
    for args, says in cases:
        code, err = cli(args, capsys)
        assert code == 2 and says in err and len(err.splitlines()) == 1, (args, err)
        assert not out.exists() and not back.exists()
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    code, err = cli(["import-peft", str(lora), "--base", other, "--out", str(back)], capsys)
    assert code == 2 and "is a LORA adapter" in err and not back.exists()
