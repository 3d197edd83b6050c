"""Which weight matrices to probe, found from the model's structure rather than its names.

A target is a linear map z = W h: `nn.Linear` (W stored d_out x d_in) or transformers'
`Conv1D` (GPT-2 style, W stored d_in x d_out, i.e. transposed). Targets are put in groups:

- "decoder":   linears inside the language decoder's stack of blocks (the homogeneous
               `nn.ModuleList` under `model.get_decoder()`, else the model's largest one);
- "lm_head":   the output embedding (skipped when tied to the input embedding, since
               freezing it would then freeze the embedding too);
- "encoder":   linears in any other stack of blocks (vision tower, audio or text encoder);
               "vision" is accepted as an alias;
- "projector": every remaining linear (multimodal projector, merger, pooler).

Inside decoder blocks each target is an "attn" or an "mlp" matrix (or "other"), judged from the
module path and class names inside the block (q/k/v/o vs gate/up/down).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dowser.errors import DowserError

GROUPS = ("decoder", "lm_head", "encoder", "projector")
_ALIASES = {"vision": "encoder", "all": "*"}
_ATTN_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", "expert", "moe", "fc")


@dataclass(frozen=True)
class Target:
    """One probed weight matrix."""

    module: str  # module path, e.g. "model.layers.3.self_attn.q_proj"
    param: str  # weight name as in model.named_parameters(), e.g. "model.layers.3.self_attn.q_proj.weight"
    group: str  # "decoder" | "lm_head" | "encoder" | "projector"
    kind: str  # "attn" | "mlp" | "lm_head" | "other"
    layer: int | None  # index in the decoder's block list; None outside the decoder
    out_features: int  # d_out: length of the sensitivity vector psi
    in_features: int  # d_in: length of the activation vector a
    transposed: bool = False  # Conv1D: the parameter is stored (d_in, d_out)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (recognised without importing transformers)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _features(module: nn.Module) -> tuple[int, int, bool]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, False
    return module.nf, module.nx, True


def _block_lists(root: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every ModuleList of same-class blocks that contain linears, as (path under root, list)."""
    found = []
    for name, mod in root.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(b) for b in mod}) != 1:
            continue
        if any(is_linear(m) for m in mod[0].modules()):
            found.append((name, mod))
    return found


def _n_params(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The language decoder's block list and its module path, or None if the model has none."""
    root = model
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            dec = get_decoder()
            if isinstance(dec, nn.Module):
                root = dec
        except (AttributeError, NotImplementedError, ValueError):
            pass
    lists = _block_lists(root) or _block_lists(model)
    if not lists:
        return None
    # The decoder stack dominates the parameter count of its root.
    _, best = max(lists, key=lambda item: _n_params(item[1]))
    path = next(n for n, m in model.named_modules() if m is best)
    return path, best


def _kind(relpath: str, block: nn.Module) -> str:
    """attn / mlp from the path inside the block and the classes along it."""
    words = [relpath.lower()]
    mod = block
    for part in relpath.split(".")[:-1]:
        mod = getattr(mod, part)
        words.append(type(mod).__name__.lower())
    text = " ".join(words)
    if any(w in text for w in _ATTN_WORDS):
        return "attn"
    if any(w in text for w in _MLP_WORDS):
        return "mlp"
    leaf = relpath.split(".")[-1].lower()
    if leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "qkv"):
        return "attn"
    if leaf in ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"):
        return "mlp"
    return "other"


def _tied_to_input(model: nn.Module, head: nn.Module) -> bool:
    get_in = getattr(model, "get_input_embeddings", None)
    try:
        emb = get_in() if callable(get_in) else None
    except (AttributeError, NotImplementedError):
        emb = None
    return emb is not None and getattr(emb, "weight", None) is getattr(head, "weight", None)


def all_targets(model: nn.Module) -> list[Target]:
    """Every linear of the model as a Target, in module order, with its group and kind."""
    param_names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(p), name)
    dec = find_decoder_layers(model)
    dec_path, dec_list = dec if dec else ("", None)
    other_lists = [
        (p, lst) for p, lst in _block_lists(model) if lst is not dec_list and p != dec_path
    ]
    head = _output_head(model)
    # A head tied to the input embedding is skipped: freezing it would freeze the embedding.
    skip_head = head is not None and _tied_to_input(model, head)

    targets = []
    for name, mod in model.named_modules():
        if not is_linear(mod) or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        d_out, d_in, transposed = _features(mod)
        param = param_names.get(id(mod.weight), f"{name}.weight")
        layer, kind = None, "other"
        if mod is head:
            if skip_head:
                continue
            group, kind = "lm_head", "lm_head"
        elif dec_list is not None and name.startswith(dec_path + "."):
            group = "decoder"
            idx, _, rel = name[len(dec_path) + 1 :].partition(".")
            layer = int(idx)
            kind = _kind(rel, dec_list[layer])
        elif any(name.startswith(p + ".") for p, _ in other_lists):
            group = "encoder"
        else:
            group = "projector"
        targets.append(Target(name, param, group, kind, layer, d_out, d_in, transposed))
    return targets


def _output_head(model: nn.Module) -> nn.Module | None:
    get_out = getattr(model, "get_output_embeddings", None)
    try:
        head = get_out() if callable(get_out) else None
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Module) else None


def select_targets(
    model: nn.Module, layers: str | Sequence[str] | None = None, *, include_lm_head: bool = True
) -> list[Target]:
    """The targets to probe.

    `layers`: None for the decoder (the reference); group names ("decoder", "lm_head",
    "encoder" or its alias "vision", "projector", "all"), as a list or comma-separated; or a
    regular expression searched in module paths. `include_lm_head` adds the output head.
    """
    targets = all_targets(model)
    if not targets:
        raise DowserError("the model has no nn.Linear or Conv1D layers to probe")
    if layers is None:
        groups = {"decoder"}
        pattern = None
    else:
        items = [s.strip() for s in layers.split(",")] if isinstance(layers, str) else list(layers)
        items = [_ALIASES.get(s, s) for s in items if s]
        if items and all(s in GROUPS or s == "*" for s in items):
            groups = set(GROUPS) if "*" in items else set(items)
            pattern = None
        else:
            groups = None
            source = layers if isinstance(layers, str) else "|".join(layers)
            try:
                pattern = re.compile(source)
            except re.error as e:
                raise DowserError(
                    f"layers={source!r} is neither group names nor a regex: {e}"
                ) from None
    asked = set(groups) if groups is not None else None
    if groups is not None and include_lm_head:
        groups.add("lm_head")
    if asked and not any(t.group in asked for t in targets):
        raise DowserError(
            f"layers={layers!r}: this model has no {', '.join(sorted(asked))} layers; groups "
            f"present: {', '.join(sorted({t.group for t in targets}))}"
        )
    chosen = [
        t
        for t in targets
        if (groups is not None and t.group in groups)
        or (pattern is not None and pattern.search(t.module))
    ]
    if not chosen:
        available = sorted({t.group for t in targets})
        example = ", ".join(t.module for t in targets[:3])
        raise DowserError(
            f"layers={layers!r} matched no linear layer; groups present: {', '.join(available)}; "
            f"module names look like: {example}"
        )
    return chosen
