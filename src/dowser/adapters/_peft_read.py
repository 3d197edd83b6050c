"""Reading a PEFT SHiRA adapter folder for `dowser.adapters.peft.import_peft`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dowser.adapters._reach import bits
from dowser.errors import DowserError

ADAPTER = "default"  # the adapter name PeftModel.from_pretrained gives


def read_adapter(adapter: Path, inner: nn.Module):
    """(masks, dense names, name -> base tensor) of a loaded SHiRA adapter (module doc)."""
    from peft.tuners.shira import ShiraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    masks: dict[str, torch.Tensor] = {}
    dense: list[str] = []
    before: dict[str, torch.Tensor] = {}
    for name, module in inner.named_modules():
        if isinstance(module, ShiraLayer):
            w = module.get_base_layer().weight
            ind = module.shira_indices[ADAPTER].long().cpu()
            values = module.shira_weight[ADAPTER].detach().cpu()
            keep = bits(values) != bits(torch.tensor([-0.0], dtype=values.dtype))
            m = torch.zeros(w.numel(), dtype=torch.bool)
            m[(ind[0] * w.shape[1] + ind[1])[keep]] = True
            if m.any():
                masks[f"{name}.weight"] = m.reshape(w.shape)
                before[f"{name}.weight"] = w
        elif isinstance(module, ModulesToSaveWrapper):
            tuned = module.modules_to_save[ADAPTER]
            for leaf, p in tuned.named_parameters():
                o = module.original_module.get_parameter(leaf)
                if p.dtype != o.dtype or p.shape != o.shape:
                    raise DowserError(f"{adapter}: {name}.{leaf} is not of the base's dtype/shape")
                changed = bits(p.detach()) != bits(o.detach())
                if changed.any():
                    full = f"{name}.{leaf}"
                    before[full] = o
                    if p.dim() < 2:
                        dense.append(full)
                    else:
                        masks[full] = changed.cpu()
        elif isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            raise DowserError(
                f"{adapter}: {name} is a {type(module).__name__}, which a dowser delta cannot "
                "hold; only SHiRA layers and modules_to_save are read"
            )
    if not before:
        raise DowserError(f"{adapter} changes no weight of this base model; nothing to import")
    return masks, dense, before


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DowserError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise DowserError(f"{path} is not a JSON object")
    return value


def read_config(adapter: Path) -> dict:
    """The adapter's config, after checking it is a SHiRA adapter folder with safetensors."""
    if not adapter.is_dir():
        raise DowserError(f"{adapter} is not a folder; give a PEFT adapter folder")
    if not (adapter / "adapter_config.json").is_file():
        raise DowserError(
            f"{adapter} holds no adapter_config.json: it is not a PEFT adapter folder (give the "
            "folder `dowser export-peft` or PeftModel.save_pretrained wrote)"
        )
    config = read_json(adapter / "adapter_config.json")
    kind = config.get("peft_type")
    if kind != "SHIRA":
        raise DowserError(
            f"{adapter} is a {kind} adapter; dowser reads SHiRA adapters only (sparse entries "
            "with their indices, as `dowser export-peft` writes)"
        )
    if config.get("trainable_token_indices"):
        raise DowserError(f"{adapter} trains token rows (trainable_token_indices): not read")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise DowserError(
            f"{adapter} has no adapter_model.safetensors; dowser reads safetensors only "
            "(save the adapter with safe_serialization=True)"
        )
    return config
