"""LoRA adapters (peft) on every block's attention qkv/proj and FFN fc1/fc2 (never the patch
embedding), the self-regularization penalty, and merging adapters into plain weights.

In checkpoints adapters use plain names: `<module>.weight` is the base weight and
`<module>.lora_A.weight` / `<module>.lora_B.weight` the adapter (peft's `base_layer` and adapter-name
levels are removed), so files do not depend on peft's naming."""
from __future__ import annotations

import re

import torch
from torch import nn

from common.sharded_tensors import is_dtensor, local_part, summed_over_shards, whole_for_local_rows

# full-match regex on module names of the backbone; `patch_embed.proj` does not match
TARGET_MODULES = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp(_imag|_text|_vl)?\.(fc1|fc2))"
ADAPTER = "default"
_PEFT_LEVELS = re.compile(rf"\.base_layer(?=\.)|(?<=\.lora_[AB])\.{ADAPTER}(?=\.)")


def add_lora(backbone: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> nn.Module:
    """Wrap the target linears of `backbone` in place with rank-`rank` adapters (B zero-initialised,
    so the model's outputs are unchanged until training moves B)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGET_MODULES, bias="none")
    inject_adapter_in_model(config, backbone, adapter_name=ADAPTER)
    return backbone


def lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


def delta_weight(layer: nn.Module) -> torch.Tensor:
    """ΔW = scaling · B · A of one adapted linear, shaped like its weight; under FSDP, the rows of
    ΔW this process holds of its weight (B's rows and all of A, which is small)."""
    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight  # [r, in], [out, r]
    return layer.scaling[ADAPTER] * (local_part(b) @ whole_for_local_rows(a))


def self_regularization(module: nn.Module, scaled: bool = True) -> torch.Tensor:
    """Σ over adapted layers of ||W ⊙ ΔW||²_F: an adapter may change a weight little where the
    pretrained weight is large (where the old knowledge lives). `scaled=False` penalises B·A
    without the alpha/rank scaling, as ContinualTransformer does (its λ is ours times rank²/alpha²).
    Under FSDP each process sums its own rows, and the total is summed over the processes."""
    terms, sharded = [], False
    for _, layer in lora_layers(module):
        delta = delta_weight(layer) if scaled else delta_weight(layer) / layer.scaling[ADAPTER]
        terms.append((local_part(layer.base_layer.weight) * delta).pow(2).sum())
        sharded = sharded or is_dtensor(layer.base_layer.weight)
    if not terms:
        raise ValueError("self_regularization needs a model with LoRA adapters")
    return summed_over_shards(torch.stack(terms).sum(), sharded)


# ---- plain-named state dicts -------------------------------------------------------------------
def plain_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft names -> checkpoint names (`qkv.base_layer.weight` -> `qkv.weight`,
    `qkv.lora_A.default.weight` -> `qkv.lora_A.weight`)."""
    return {_PEFT_LEVELS.sub("", k): v for k, v in state.items()}


def is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in plain_names(state).items() if is_adapter_key(k)}


def load_plain_state(module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True):
    """Load a plain-named state dict into a module that may carry peft adapters."""
    own = {_PEFT_LEVELS.sub("", k): k for k in module.state_dict()}
    renamed = {own.get(k, k): v for k, v in state.items()}
    return module.load_state_dict(renamed, strict=strict)


def merge_adapters(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Plain-named state with adapters -> the same state with `W + scaling · B · A` and no adapter keys."""
    merged = {k: v for k, v in state.items() if not is_adapter_key(k)}
    for key in state:
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            a, b = state[key].float(), state[f"{module}.lora_B.weight"].float()
            weight = merged[f"{module}.weight"]
            merged[f"{module}.weight"] = (weight.float() + scaling * (b @ a)).to(weight.dtype)
    return merged
