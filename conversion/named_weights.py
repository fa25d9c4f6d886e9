"""Weights by name: every flag that takes a weights file (`--init_from`, `--finetune`,
`--d_vae_weight_path`, `--teacher`, `--tokenizer`, `util/convert_beit_ckpt.py --input`) also takes
a registered name (`beit_base_patch16_224_pt22k`), `hf-hub:ORG/NAME[@revision]` or an `https://`
URL. The file is fetched once into the standard cache (common/downloads.py: checked, reused
offline, one download for many processes), and what needs converting (BEiT's layouts) is converted
once, the result cached beside it; MAE's, ContinualTransformer's and this project's files load as
they are. A local path is used as given."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.console import say
from common.downloads import Expected, cache_dir, fetch_hf, fetch_url, held

HF_PREFIX = "hf-hub:"
BEIT_BLOB = "https://conversationhub.blob.core.windows.net/beit-share-public"
MAE_FILES = "https://dl.fbaipublicfiles.com/mae"


@dataclass(frozen=True)
class NamedWeights:
    """A registered starting point: where it comes from, how it is checked and read."""

    url: str  # an https:// file or hf-hub:ORG/NAME
    kind: str  # beit (converted once), mae / vqkd (read as they are), dall_e (a folder with encoder.pkl), text_tokenizer
    what: str  # one line for --list
    licence: str
    size: str = ""  # as the publisher lists it, for --list (checked against the server's length when fetched)
    sha256: str | None = None  # the publisher's, or the prefix in a torch.hub-style file name


def _beit(name: str, what: str, size: str) -> tuple[str, NamedWeights]:
    return name, NamedWeights(f"{BEIT_BLOB}/beit/{name}.pth", "beit", what, "MIT (microsoft/unilm)", size)


def _beit2(name: str, what: str, size: str) -> tuple[str, NamedWeights]:
    return name, NamedWeights(f"{BEIT_BLOB}/beitv2/{name}.pth", "beit", what, "MIT (microsoft/unilm)", size)


def _mae(folder: str, name: str, what: str, size: str) -> tuple[str, NamedWeights]:
    return name, NamedWeights(f"{MAE_FILES}/{folder}/{name}.pth", "mae", what, "CC BY-NC 4.0 (facebookresearch/mae)", size)


REGISTRY: dict[str, NamedWeights] = dict([
    _beit("beit_base_patch16_224_pt22k", "BEiT-base, self-supervised on ImageNet-22k (with its MIM head)", "≈0.4 GB"),
    _beit("beit_base_patch16_224_pt22k_ft22k", "BEiT-base, then fine-tuned on ImageNet-22k", "≈0.4 GB"),
    _beit("beit_base_patch16_224_pt22k_ft22kto1k", "BEiT-base, fine-tuned on 22k then 1k (ContinualTransformer's init)",
          "≈0.4 GB"),
    _beit("beit_base_patch16_384_pt22k_ft22kto1k", "the same at 384 px", "≈0.4 GB"),
    _beit("beit_large_patch16_224_pt22k", "BEiT-large, self-supervised on ImageNet-22k", "≈1.2 GB"),
    _beit("beit_large_patch16_224_pt22k_ft22k", "BEiT-large, then fine-tuned on ImageNet-22k", "≈1.2 GB"),
    _beit("beit_large_patch16_224_pt22k_ft22kto1k", "BEiT-large, fine-tuned on 22k then 1k", "≈1.2 GB"),
    _beit("beit_large_patch16_384_pt22k_ft22kto1k", "the same at 384 px", "≈1.2 GB"),
    _beit2("beitv2_base_patch16_224_pt1k", "BEiT v2-base, VQ-KD targets on ImageNet-1k (1600 epochs)", "≈0.4 GB"),
    _beit2("beitv2_base_patch16_224_pt1k_ft21k", "BEiT v2-base, then fine-tuned on ImageNet-21k", "≈0.4 GB"),
    _beit2("beitv2_large_patch16_224_pt1k", "BEiT v2-large, VQ-KD targets on ImageNet-1k", "≈1.2 GB"),
    _beit2("beitv2_large_patch16_224_pt1k_ft21k", "BEiT v2-large, then fine-tuned on ImageNet-21k", "≈1.2 GB"),
    ("vqkd_encoder_base_decoder_3x768x12_clip", NamedWeights(
        f"{BEIT_BLOB}/beitv2/vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth", "vqkd",
        "BEiT v2's VQ-KD tokenizer (CLIP teacher): --d_vae_type vqkd", "MIT (microsoft/unilm)", "≈0.8 GB", "d5036aa7")),
    ("dall_e_encoder", NamedWeights("https://cdn.openai.com/dall-e/encoder.pkl", "dall_e",
                                    "OpenAI's DALL-E dVAE encoder: --d_vae_type dall-e (BEiT's targets)",
                                    "MIT (openai/DALL-E)", "≈0.1 GB")),
    _mae("pretrain", "mae_pretrain_vit_base", "MAE ViT-base encoder (ImageNet-1k, 1600 epochs)", "≈0.3 GB"),
    _mae("pretrain", "mae_pretrain_vit_large", "MAE ViT-large encoder", "≈1.2 GB"),
    _mae("pretrain", "mae_pretrain_vit_huge", "MAE ViT-huge/14 encoder", "≈2.5 GB"),
    _mae("visualize", "mae_visualize_vit_base", "MAE ViT-base with its decoder (raw pixels)", "≈0.4 GB"),
    _mae("visualize", "mae_visualize_vit_large", "MAE ViT-large with its decoder (raw pixels)", "≈1.3 GB"),
    ("vit_base_patch16_224.mae", NamedWeights("hf-hub:timm/vit_base_patch16_224.mae", "mae",
                                              "timm's copy of MAE's ViT-base encoder", "CC BY-NC 4.0", "≈0.3 GB")),
    ("vit-mae-base", NamedWeights("hf-hub:facebook/vit-mae-base", "mae", "Hugging Face ViTMAEForPreTraining, base",
                                  "Apache-2.0 (model card)", "≈0.4 GB")),
    ("bert-base-uncased", NamedWeights("hf-hub:google-bert/bert-base-uncased", "text_tokenizer",
                                       "BERT's WordPiece vocabulary: --tokenizer", "Apache-2.0", "≈0.5 MB")),
])
# what is fetched of a hub repository: (needed: of each group the first it has, optional)
HUB_FILES = {"text_tokenizer": ((("vocab.txt",),), ("tokenizer_config.json", "special_tokens_map.json")),
             "model": ((("model.safetensors", "pytorch_model.bin"),), ("config.json",))}


def is_remote_name(value: str | None) -> bool:
    """A value the flags fetch rather than read: a registered name, hf-hub:, or a URL."""
    return bool(value) and (value in REGISTRY or value.startswith((HF_PREFIX, "https://", "http://")))


def list_table() -> str:
    rows = ["| name | what | size | licence |", "| --- | --- | --- | --- |"]
    rows += [f"| {name} | {w.what} | {w.size} | {w.licence} |" for name, w in REGISTRY.items()]
    return "\n".join(rows)


def resolve(value: str | None, flag: str, convert: bool = True) -> str | None:
    """A local path for the value of a weights flag: fetched (and, with `convert`, converted) when it
    names weights, as given otherwise."""
    if value is None or not is_remote_name(value) or Path(value).exists():
        return value
    entry = REGISTRY.get(value)
    source = entry.url if entry is not None else value
    kind = entry.kind if entry is not None else "auto"
    if source.startswith(HF_PREFIX):
        repo, _, revision = source[len(HF_PREFIX):].partition("@")
        needed, optional = HUB_FILES["text_tokenizer" if kind == "text_tokenizer" else "model"]
        local = fetch_hf(repo, revision or None, needed, optional)
        if kind != "text_tokenizer":
            local = transformers_folder_or_weights(local)
    else:
        local = fetch_url(source, Expected(sha256=entry.sha256) if entry is not None else Expected())
    if kind == "dall_e":
        return str(dall_e_folder(local))
    if convert and kind in ("beit", "auto") and needs_conversion(local):
        return str(converted(local, value))
    say(f"{flag} {value}: {local}")
    return str(local)


def transformers_folder_or_weights(folder: Path) -> Path:
    """A transformers model folder is read as a folder (its config.json says the model type); timm's
    and others' repositories hold a state dict, which is read as a file."""
    config = folder / "config.json"
    if config.is_file() and "model_type" in json.loads(config.read_text()):
        return folder
    return next(folder / name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).is_file())


def dall_e_folder(encoder_file: Path) -> Path:
    """--d_vae_weight_path takes a folder holding encoder.pkl: one beside the downloaded file."""
    folder = encoder_file.with_name(encoder_file.stem + "_dall_e")
    link = folder / "encoder.pkl"
    if not link.exists():
        folder.mkdir(parents=True, exist_ok=True)
        link.symlink_to(encoder_file)
    return folder


def needs_conversion(local: Path) -> bool:
    """BEiT's layouts (unilm, timm, Hugging Face) are converted; every other file loads as it is."""
    if local.is_dir():
        config = local / "config.json"
        return config.is_file() and json.loads(config.read_text()).get("model_type") == "beit"
    from models.checkpoints import read_model_checkpoint

    return read_model_checkpoint(local).backbone_config is None  # not ours, ContinualTransformer's or MAE's


def converted(local: Path, name: str) -> Path:
    """BEiT's weights in this project's layout, converted once and kept beside the download."""
    from conversion.beit import convert_file

    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    output = (local.with_name(local.name.removesuffix(".pth") + ".converted.safetensors") if local.is_file()
              else cache_dir() / "converted" / f"{safe}.safetensors")  # not inside the hub's own cache
    with held(output.with_name(output.name + ".lock")):
        if not output.is_file():
            say(f"{name}: converting {local} once into {output}")
            convert_file(local, output, say=say)
    return output
