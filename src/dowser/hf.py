"""Loading local Hugging Face checkpoints: safetensors only, no hub, no remote code by default."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from dowser.errors import DowserError

DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | None) -> Any:
    """'float32' / 'bf16' / 'auto' ... -> torch dtype (or 'auto'); None stays None."""
    if name is None:
        return None
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise DowserError(f"dtype {name!r}: use one of {', '.join(DTYPES)}") from None


def load_model(
    model_dir: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: Any = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> tuple[torch.nn.Module, Any, Any]:
    """(model, tokenizer, processor) from a local checkpoint directory.

    The model class is AutoModelForImageTextToText when the config is a vision-language one,
    else AutoModelForSpeechSeq2Seq (Whisper), else AutoModelForCausalLM, else
    AutoModelForSeq2SeqLM. Only safetensors weights load, and only complete ones: a checkpoint
    lacking weights the model has (which transformers would initialise at random) or holding
    them in another shape, or a truncated weights file, is refused with a DowserError.
    tokenizer / processor are None when the directory has none.

    device_map / max_memory / offload_folder: spread a model larger than one device over
    GPUs, CPU and disk with accelerate ("auto", "balanced", "sequential" or a dict; e.g.
    max_memory={0: "70GiB", "cpu": "200GiB"}); exclusive with `device`.
    """
    if device_map is not None and device is not None:
        raise DowserError("give either a device or a device map, not both")
    if (max_memory or offload_folder) and device_map is None:
        raise DowserError("max_memory and offload_folder apply only with a device map")
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForSeq2SeqLM,
        AutoModelForSpeechSeq2Seq,
    )

    path = Path(model_dir)
    if not path.is_dir():
        raise DowserError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise DowserError(f"{path} has no config.json: give a Hugging Face checkpoint directory")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise DowserError(f"cannot read {path / 'config.json'}: {_first_line(e)}") from None
    # speech before causal: Whisper's config also maps to a decoder-only WhisperForCausalLM
    autos = (
        AutoModelForImageTextToText,
        AutoModelForSpeechSeq2Seq,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
    )
    for auto in autos:
        if type(config) in auto._model_mapping:
            break
    else:
        raise DowserError(
            f"{path}: model type {config.model_type!r} is neither a vision-language, causal, "
            "speech nor seq2seq language model; load it yourself and call "
            "dowser.probe(model, batches=...)"
        )
    if not any(path.glob("*.safetensors")):
        raise DowserError(
            f"{path} has no .safetensors weights; dowser loads only safetensors (re-save the "
            "model with save_pretrained(), which writes safetensors)"
        )
    try:
        placement = {}
        if device_map is not None:
            placement = {"device_map": device_map, "max_memory": max_memory}
            if offload_folder is not None:
                placement["offload_folder"] = str(offload_folder)
        with _load_report() as report:
            model, info = auto.from_pretrained(
                path,
                dtype=dtype if dtype is not None else "auto",
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                **placement,
            )
    except SafetensorError as e:  # a truncated or corrupt weights file
        raise DowserError(
            f"the weights in {path} are not readable safetensors ({_first_line(e)}): the "
            "checkpoint is truncated or corrupt; copy or save it again"
        ) from None
    except (OSError, ValueError, RuntimeError) as e:
        if report and "mismatch" in str(e):  # transformers refers to its (withheld) report
            raise DowserError(
                f"the checkpoint in {path} holds weights of another shape than its config "
                "says; copy or save it again"
            ) from None
        raise DowserError(f"cannot load the model from {path}: {_first_line(e)}") from None
    _check_loaded(path, info)
    unused = sorted(info.get("unexpected_keys") or ())
    if unused:  # harmless, but said in one line rather than transformers' table
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        warnings.warn(
            f"{path} holds {len(unused)} tensors the model does not use "
            f"({', '.join(unused[:3])}{more}); they were ignored",
            stacklevel=2,
        )
    if device is not None:
        try:
            model.to(device)
        except (RuntimeError, AssertionError) as e:
            raise DowserError(f"cannot move the model to {device!r}: {_first_line(e)}") from None
    tokenizer, processor = load_preprocessors(path, trust_remote_code=trust_remote_code)
    return model, tokenizer, processor


@contextmanager
def _load_report() -> Iterator[list[str]]:
    """Withhold transformers' multi-line load report (missing, unexpected, mismatched
    weights): `load_model` says what matters in one line instead. Yields the withheld ones."""
    withheld: list[str] = []

    def keep(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            withheld.append(str(record.msg))
            return False
        return True

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(keep)
    try:
        yield withheld
    finally:
        logger.removeFilter(keep)


def _check_loaded(path: Path, info: dict) -> None:
    """Refuse a checkpoint that lacks weights the model has (transformers would initialise
    them at random and carry on) or holds them in another shape. Tied weights (an output
    head sharing the embedding) are not missing: transformers drops them from the report."""
    missing = sorted(info.get("missing_keys") or ())
    wrong = sorted(
        k[0] if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or ()
    )
    problems = []
    for label, names in (("missing", missing), ("of another shape", wrong)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            problems.append(f"{len(names)} weights {label} ({', '.join(names[:3])}{more})")
    if problems:
        raise DowserError(
            f"the checkpoint in {path} is incomplete: {'; '.join(problems)}; they would be "
            "randomly initialised. Copy or save the checkpoint again (save_pretrained)"
        )


def load_preprocessors(path: Path, *, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(tokenizer, processor) saved in `path`; either is None when absent."""
    from transformers import AutoProcessor, AutoTokenizer

    tokenizer = processor = None
    if (path / "processor_config.json").is_file() or (path / "preprocessor_config.json").is_file():
        try:
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (ImportError, OSError, ValueError, TypeError, KeyError) as e:
            # e.g. a processor that needs torchvision: text-only probing still works
            warnings.warn(
                f"the processor in {path} could not be loaded ({_first_line(e)}); "
                "only text inputs are available",
                stacklevel=2,
            )
    if processor is not None and hasattr(processor, "tokenizer"):
        tokenizer = processor.tokenizer
    elif (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (ImportError, OSError, ValueError, TypeError, KeyError):
            tokenizer = None
    return tokenizer, processor


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
