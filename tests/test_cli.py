"""The `dowser` command on real checkpoint directories, and every user error it must catch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dowser import Mask, Scores
from dowser.cli import main
from dowser.hf import load_model
from dowser.tiny import ARCHS, build_checkpoint

FAST = ["--num-samples", "4", "--batch-size", "2", "--num-probes", "2", "--seq-len", "8", "--quiet"]
# Qwen2-VL's processor cannot load without torchvision (not installable beside the CPU torch):
# it is probed on text, as a user without the processor would.
NOISE = {"llava", "idefics3", "paligemma"}


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("arch", ARCHS)
def test_probe_mask_inspect(arch, checkpoint_dirs, tmp_path, capsys):
    model_dir = checkpoint_dirs[arch]
    scores_path, mask_path = tmp_path / "scores.safetensors", tmp_path / "mask.safetensors"
    images = ["--images", "noise", "--layers", "decoder,vision"] if arch in NOISE else []
    code, out, err = run(["probe", model_dir, "--out", scores_path, *FAST, *images], capsys)
    assert code == 0, err
    assert "wrote" in out
    code, out, err = run(
        [
            "mask",
            scores_path,
            "--model",
            model_dir,
            "--ratio",
            "0.2",
            "--last-layers",
            "1",
            "--out",
            mask_path,
        ],
        capsys,
    )
    assert code == 0, err
    assert "20.0%" in out
    model, _, _ = load_model(model_dir)
    mask = Mask.load(mask_path, model=model)
    assert len(mask) == 7 and all(".1." in n for n in mask)  # last of 2 layers
    scores = Scores.load(scores_path, model=model)
    if arch in NOISE:
        assert any(t.group == "encoder" for t in scores.targets.values())
    code, out, _ = run(["inspect", scores_path], capsys)
    assert code == 0 and "estimator: mean-abs" in out
    code, out, _ = run(["inspect", mask_path], capsys)
    assert code == 0 and "update_ratio=0.2" in out and "mlp" in out


def test_rms_and_regex_options(checkpoint_dirs, tmp_path, capsys):
    out_path = tmp_path / "s.safetensors"
    code, _, err = run(
        [
            "probe",
            checkpoint_dirs["llama"],
            "--out",
            out_path,
            *FAST,
            "--estimator",
            "rms",
            "--layers",
            "mlp",
            "--no-lm-head",
            "--dtype",
            "bfloat16",
        ],
        capsys,
    )
    assert code == 0, err
    scores = Scores.load(out_path)
    assert scores.meta["estimator"] == "rms"
    assert scores.names and all(".mlp." in n for n in scores.names)


def user_error(argv, capsys, match):
    code, out, err = run(argv, capsys)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line]
    assert match in lines[-1], err
    return err


def test_user_errors(checkpoint_dirs, tmp_path, capsys):
    llama, qwen = checkpoint_dirs["llama"], checkpoint_dirs["qwen2"]
    scores_path = tmp_path / "s.safetensors"
    assert run(["probe", llama, "--out", scores_path, *FAST], capsys)[0] == 0
    mask_path = tmp_path / "m.safetensors"
    assert run(["mask", scores_path, "--model", llama, "--out", mask_path], capsys)[0] == 0
    before = (scores_path.read_bytes(), mask_path.read_bytes())

    # existing outputs are kept unless --overwrite
    user_error(["probe", llama, "--out", scores_path, *FAST], capsys, "already exists")
    user_error(
        ["mask", scores_path, "--model", llama, "--out", mask_path], capsys, "already exists"
    )
    # scores for another model
    user_error(
        ["mask", scores_path, "--model", qwen, "--out", tmp_path / "x.safetensors"],
        capsys,
        "do not fit this model",
    )
    # missing and wrong files
    user_error(
        ["probe", tmp_path / "no-model", "--out", tmp_path / "x.safetensors"],
        capsys,
        "does not exist",
    )
    user_error(
        [
            "mask",
            tmp_path / "none.safetensors",
            "--model",
            llama,
            "--out",
            tmp_path / "x.safetensors",
        ],
        capsys,
        "does not exist",
    )
    user_error(
        ["mask", mask_path, "--model", llama, "--out", tmp_path / "x.safetensors"],
        capsys,
        "not scores",
    )
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(scores_path.read_bytes()[:200])
    user_error(
        ["mask", corrupt, "--model", llama, "--out", tmp_path / "x.safetensors"],
        capsys,
        "not a readable safetensors",
    )
    user_error(["inspect", corrupt], capsys, "not a readable safetensors")
    user_error(
        ["probe", llama, "--out", tmp_path / "missing-dir" / "s.safetensors"],
        capsys,
        "does not exist",
    )
    empty = tmp_path / "empty-model"
    empty.mkdir()
    user_error(["probe", empty, "--out", tmp_path / "x.safetensors"], capsys, "no config.json")
    user_error(
        ["probe", llama, "--out", tmp_path / "x.safetensors", "--images", "noise", *FAST],
        capsys,
        "processor",
    )
    user_error(
        ["probe", llama, "--out", tmp_path / "x.safetensors", "--dtype", "float8"], capsys, "dtype"
    )
    user_error(
        ["probe", llama, "--out", tmp_path / "x.safetensors", "--layers", "nomatch$"],
        capsys,
        "matched no linear layer",
    )
    user_error(
        [
            "mask",
            scores_path,
            "--model",
            llama,
            "--out",
            tmp_path / "x.safetensors",
            "--last-layers",
            "9",
        ],
        capsys,
        "last_layers",
    )
    user_error(
        [
            "mask",
            scores_path,
            "--model",
            llama,
            "--out",
            tmp_path / "x.safetensors",
            "--device",
            "nodevice",
        ],
        capsys,
        "cannot move the model",
    )
    assert not (tmp_path / "x.safetensors").exists()
    assert (scores_path.read_bytes(), mask_path.read_bytes()) == before


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.1", "abc"])
def test_bad_ratio_is_rejected_by_the_parser(ratio, checkpoint_dirs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "mask",
                "s.safetensors",
                "--model",
                "m",
                "--ratio",
                ratio,
                "--out",
                str(tmp_path / "m.safetensors"),
            ]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--ratio" in err and "Traceback" not in err


def test_pickle_only_checkpoint_is_refused(tmp_path, capsys):
    model_dir = build_checkpoint("llama", tmp_path / "m")
    (model_dir / "model.safetensors").unlink()
    torch.save({}, model_dir / "pytorch_model.bin")  # a pickle file: must not be loaded
    user_error(["probe", model_dir, "--out", tmp_path / "s.safetensors"], capsys, "safetensors")


def test_console_script_and_module_entry_points(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "dowser", "--help"], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0 and "probe" in res.stdout and "mask" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "dowser", "inspect", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 2
    assert res.stderr.strip() == f"dowser inspect: error: {tmp_path / 'nope'} does not exist"


def test_corrupt_metadata_is_a_clear_error(checkpoint_dirs, tmp_path, capsys):
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import save_file

    llama = checkpoint_dirs["llama"]
    scores_path, mask_path = tmp_path / "s.safetensors", tmp_path / "m.safetensors"
    assert run(["probe", llama, "--out", scores_path, *FAST], capsys)[0] == 0
    assert run(["mask", scores_path, "--model", llama, "--out", mask_path], capsys)[0] == 0

    def rewrite(src, dst, edit):
        with safe_open(src, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
            meta = _json.loads(f.metadata()["dowser"])
        save_file(tensors, dst, metadata={"dowser": _json.dumps(edit(meta))})
        return dst

    no_info = rewrite(
        mask_path,
        tmp_path / "m1.safetensors",
        lambda m: {k: v for k, v in m.items() if k != "info"},
    )
    user_error(["inspect", no_info], capsys, "corrupt")
    no_fp = rewrite(
        scores_path,
        tmp_path / "s1.safetensors",
        lambda m: {k: v for k, v in m.items() if k != "fingerprints"},
    )
    user_error(
        ["mask", no_fp, "--model", llama, "--out", tmp_path / "x.safetensors"], capsys, "corrupt"
    )
    user_error(["inspect", no_fp], capsys, "corrupt")
    as_list = rewrite(scores_path, tmp_path / "s2.safetensors", lambda m: [m])
    user_error(["inspect", as_list], capsys, "corrupt")


def test_seq2seq_checkpoint_needs_batches(tmp_path, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=40,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
    )
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    user_error(
        ["probe", tmp_path / "t5", "--out", tmp_path / "s.safetensors", *FAST],
        capsys,
        "encoder-decoder",
    )


def test_group_absent_from_the_model(checkpoint_dirs, tmp_path, capsys):
    user_error(
        [
            "probe",
            checkpoint_dirs["llama"],
            "--out",
            tmp_path / "s.safetensors",
            *FAST,
            "--layers",
            "vision",
        ],
        capsys,
        "has no encoder layers",
    )
