"""The `dowser train` recipe: a local checkpoint + a mask + a data file -> a fine-tuned dir.

Library pieces (data, DowserTrainer, artifacts) do the work; this module only wires them to
command-line settings and checks everything a user can get wrong before training starts.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from dowser.errors import DowserError
from dowser.io import check_outside_inputs

CHECKPOINTS = "checkpoints"  # Trainer checkpoints inside OUT_DIR, for --resume


RUN_INFO = "dowser_run.json"  # in CHECKPOINTS: what the run was started with


def _run_info(args: argparse.Namespace) -> dict:
    return {
        "mask_sha256": hashlib.sha256(Path(args.mask).read_bytes()).hexdigest(),
        "optimizer": args.optimizer,
        "model_dir": str(Path(args.model_dir).resolve()),
    }


def _check_out(out: Path, args: argparse.Namespace) -> None:
    """Refuse an output dir that would mix runs or hold an input; with --overwrite, clear
    what we wrote."""
    if out.exists() and not out.is_dir():
        raise DowserError(f"{out} exists and is not a directory")
    check_outside_inputs(
        out,
        {
            "model directory": args.model_dir,
            "mask": args.mask,
            "data file": args.data,
            "FSDP config": args.fsdp_config,
        },
    )
    if args.resume:
        info_path = out / CHECKPOINTS / RUN_INFO
        if not info_path.is_file():
            raise DowserError(f"--resume: {out / CHECKPOINTS} holds no checkpoint to resume from")
        try:
            saved = json.loads(info_path.read_text())
        except (OSError, ValueError):
            raise DowserError(
                f"--resume: {info_path} is unreadable (the run stopped before its first "
                "checkpoint); start it again with --overwrite"
            ) from None
        now = _run_info(args)
        for key, what in (("mask_sha256", "mask"), ("optimizer", "--optimizer")):
            if saved.get(key) != now[key]:
                raise DowserError(
                    f"--resume: the run in {out} was started with another {what}; resume with "
                    "the same one (or start a new run with --overwrite)"
                )
        return
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise DowserError(
            f"{out} is not empty; pass --resume to continue its run or --overwrite to replace it"
        )


def resume_point(folder: Path) -> tuple[str, int] | None:
    """(path, global step) of the last complete Trainer checkpoint in `folder`; None when
    the run stopped before its first one (it then starts from the beginning).

    A checkpoint is complete once its trainer_state.json (the Trainer writes it last) reads
    as JSON. Newer, half-written ones (a crash or a full disk while saving) are removed by
    rank 0, so that the run continues from the intact one before them.
    """
    from dowser.train.distributed import is_main_process

    found = []
    for path in folder.iterdir() if folder.is_dir() else ():
        m = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if m and path.is_dir():
            found.append((int(m.group(1)), path))
    found.sort()
    while found:
        _, path = found[-1]
        try:
            state = json.loads((path / "trainer_state.json").read_text())
            return str(path), int(state["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            found.pop()
            if is_main_process():
                print(
                    f"removing the incomplete checkpoint {path} (the run stopped while saving it)"
                )
                shutil.rmtree(path, ignore_errors=True)
    if is_main_process():
        print("no complete checkpoint yet (the run stopped before its first): starting over")
    return None


def _write_json(path: Path, data: dict) -> None:
    """Write JSON atomically: a crash leaves the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _clear_previous_run(out: Path) -> None:
    """--overwrite: remove what a previous run wrote (other files in OUT are the user's)."""
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    (out / "delta.safetensors").unlink(missing_ok=True)


def run_train(args: argparse.Namespace) -> Path:
    """Fine-tune args.model_dir with args.mask on args.data into args.out (see cli.py)."""
    import torch
    from transformers import TrainingArguments

    from dowser.hf import load_model, parse_dtype
    from dowser.mask import Mask
    from dowser.train.data import load_examples
    from dowser.train.distributed import barrier, is_main_process, mean_over_ranks, world_size
    from dowser.train.speech import is_speech_data, load_speech_examples
    from dowser.train.trainer import DowserTrainer, SaveLastStep

    out = Path(args.out)
    _check_out(out, args)
    if args.fsdp_config and not args.fsdp:
        raise DowserError("--fsdp-config is read only with --fsdp")
    fsdp_config = _read_fsdp_config(args.fsdp_config) if args.fsdp_config else None
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise DowserError(
            "--fsdp shards the model over several processes: launch with torchrun "
            "--nproc-per-node N -m dowser train ... (or accelerate launch)"
        )
    speech = is_speech_data(args.data)
    examples = load_speech_examples(args.data) if speech else load_examples(args.data)
    dtype = parse_dtype(args.dtype) if args.dtype else torch.float32
    model, tokenizer, processor = load_model(
        args.model_dir, dtype=dtype, trust_remote_code=args.trust_remote_code
    )
    mask = Mask.load(args.mask, model=model)
    pre = processor if processor is not None else tokenizer
    if pre is None:
        raise DowserError(f"{args.model_dir} has no tokenizer or processor to encode the data")
    dataset, collator = dataset_for(model, pre, examples, speech, args)
    if not args.no_data_check:
        # every image (or clip) opened, every prompt measured (by every rank: rank 0's bar)
        dataset.check(progress=not args.quiet and os.environ.get("RANK", "0") == "0")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DowserError("--device cuda: no CUDA device is available; use --device cpu")
    try:
        training_args = _training_arguments(TrainingArguments, args, out, device, fsdp_config)
    except ValueError as e:  # a combination the Trainer refuses
        raise DowserError(f"invalid training settings: {e}") from None
    trainer = DowserTrainer(
        model=model,
        args=training_args,
        mask=mask,
        optimizer=args.optimizer,
        train_dataset=dataset,
        data_collator=collator,
    )
    if training_args.save_strategy != "no":
        trainer.add_callback(SaveLastStep())  # a crash while writing OUT can then resume
    barrier()  # every rank has checked OUT before rank 0 writes to it
    if is_main_process():
        if args.overwrite and not args.resume:
            _clear_previous_run(out)  # only now that every input has been read and checked
        (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        _write_json(out / CHECKPOINTS / RUN_INFO, _run_info(args))
    barrier()
    start = resume_point(out / CHECKPOINTS) if args.resume else None
    barrier()  # rank 0 may have removed a half-written checkpoint
    try:
        result = trainer.train(resume_from_checkpoint=start[0] if start else None)
        trainer.save_merged(out, preprocessors=[pre], source_dir=args.model_dir)
        if args.save_delta:
            trainer.save_delta(out / "delta.safetensors", overwrite=True)
    except DowserError:
        raise
    except ValueError as e:
        if start is not None and "checkpoint" in str(e).lower():
            raise DowserError(f"cannot resume from {start[0]}: {e}") from None
        raise
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DowserError(
                f"no space left on the device while writing to {out}: free space, then run the "
                "same command with --resume (it continues from the last complete checkpoint)"
            ) from None
        raise
    loss = mean_over_ranks(result.training_loss)  # each rank averaged its own batches
    barrier()  # every rank is done with the files
    if is_main_process():
        ranks = f" on {world_size()} processes" if world_size() > 1 else ""
        if start is not None and result.global_step == start[1]:
            what = f"the run had already finished ({result.global_step} steps)"
        else:
            what = f"trained {result.global_step} steps{ranks}, mean loss {loss:.4f}"
        print(f"{what}; wrote the model to {out}")
        if args.save_delta:
            print(f"wrote the sparse delta to {out / 'delta.safetensors'}")
    return out


def dataset_for(model, pre, examples: list, speech: bool, args: argparse.Namespace):
    """(dataset, collator) for the model's kind: speech (audio + text) or text/image; `args`
    gives data (the path, for messages), model_dir and max_length. Shared with `dowser mask
    --task-data`."""
    from dowser.train.data import Collator, SupervisedDataset
    from dowser.train.speech import SpeechCollator, SpeechDataset, is_speech_processor

    is_speech_model = getattr(model.config, "is_encoder_decoder", False) and is_speech_processor(
        pre
    )
    tok = getattr(pre, "tokenizer", pre)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pad = pad if pad is not None else 0
    if speech != is_speech_model:
        what = "audio records" if speech else "text/image records"
        fix = (
            'give {"audio": "clip.wav", "text": "..."} records'
            if is_speech_model
            else "give a speech model (e.g. Whisper) for audio"
        )
        raise DowserError(
            f"{args.data} holds {what} but {args.model_dir} is not a model for them: {fix}"
        )
    if speech:
        limit = min(args.max_length, model.config.max_target_positions)
        return SpeechDataset(examples, pre, max_length=limit), SpeechCollator(pad_token_id=pad)
    return SupervisedDataset(examples, pre, max_length=args.max_length), Collator(pad_token_id=pad)


def _read_fsdp_config(path: str) -> dict:
    """--fsdp-config: a JSON object of HF fsdp_config settings."""
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DowserError(f"--fsdp-config {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise DowserError(f"--fsdp-config {path} is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise DowserError(f"--fsdp-config {path} must hold a JSON object of settings")
    return config


def _training_arguments(
    cls, args: argparse.Namespace, out: Path, device: str, fsdp_config: dict | None = None
):
    """HF TrainingArguments from the command line's settings."""
    return cls(
        output_dir=str(out / CHECKPOINTS),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,  # a float in [0, 1) is a fraction of all steps
        lr_scheduler_type=args.scheduler,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "epoch",
        save_steps=args.save_steps or 500,
        save_total_limit=2,
        report_to="none",
        remove_unused_columns=False,
        use_cpu=device == "cpu",
        bf16=args.bf16,
        activation_checkpointing=args.gradient_checkpointing,
        disable_tqdm=args.quiet,
        dataloader_num_workers=0,
        fsdp=True if args.fsdp else None,
        fsdp_config=fsdp_config,
    )


def run_apply_delta(args: argparse.Namespace) -> Path:
    """Apply a delta to its base checkpoint and save the merged checkpoint."""
    from dowser.hf import load_model
    from dowser.train.artifacts import apply_delta, save_merged

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DowserError(f"{out} exists and is not a directory")
    check_outside_inputs(out, {"base checkpoint": args.base, "delta": args.delta})
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise DowserError(f"{out} exists and is not empty; pass --overwrite to replace its files")
    model, tokenizer, processor = load_model(
        args.base, dtype="auto", trust_remote_code=args.trust_remote_code
    )
    apply_delta(model, args.delta)
    save_merged(model, out, preprocessors=[processor or tokenizer], source_dir=args.base)
    print(f"applied {args.delta} to {args.base}; wrote {out}")
    return out
