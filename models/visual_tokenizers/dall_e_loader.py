"""Load OpenAI's `encoder.pkl` (and, for pictures, `decoder.pkl`) safely and cache their tensors as
safetensors."""
from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from common.checkpoint_io import load_safetensors_file, save_safetensors
from common.errors import UserError
from models.visual_tokenizers.dall_e import DalleEncoder, DalleEncoderConfig
from models.visual_tokenizers.dall_e_decoder import DalleDecoder, DalleDecoderConfig
from models.visual_tokenizers.safe_pickle import UnsafePickleError, load_module_pickle, named_parameters, record_state

log = logging.getLogger(__name__)

ALLOWED_MODULES = ("dall_e.", "torch.nn.modules.")
CACHE_NAME = "encoder.safetensors"


def _locate(weight_path: str | Path) -> Path:
    path = Path(weight_path)
    if path.is_dir():
        for name in (CACHE_NAME, "encoder.pkl"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"--d_vae_weight_path {path} holds neither encoder.pkl nor {CACHE_NAME}; "
                        f"download OpenAI's DALL-E encoder.pkl into it")
    if not path.exists():
        raise UserError(f"--d_vae_weight_path {path} does not exist; point it at the folder holding encoder.pkl")
    return path


@dataclass(frozen=True)
class PickledPart:
    """One of the two dVAE pickles: its class, hyper-parameters and the bounds a genuine file keeps
    (generous around OpenAI's 4 groups, 256 hidden, 2 blocks, 8192 tokens): a file claiming more is
    crafted or corrupt, and is refused before anything is allocated."""

    name: str
    qualname: str
    config: type
    build: Callable
    limits: dict[str, tuple[int, int]]


_SIZES = {"group_count": (1, 8), "n_hid": (1, 4096), "n_blk_per_group": (1, 16), "vocab_size": (2, 65536)}
ENCODER = PickledPart("encoder", "dall_e.encoder.Encoder", DalleEncoderConfig, DalleEncoder,
                      {**_SIZES, "input_channels": (1, 16)})
DECODER = PickledPart("decoder", "dall_e.decoder.Decoder", DalleDecoderConfig, DalleDecoder,
                      {**_SIZES, "n_init": (1, 4096), "output_channels": (1, 16)})


def read_dalle_pickle(path: Path, part: PickledPart = ENCODER) -> tuple[dict[str, torch.Tensor], object]:
    """Tensors and hyper-parameters of a pickled DALL-E encoder or decoder, without running its code."""
    try:
        root = load_module_pickle(path, ALLOWED_MODULES)
    except UnsafePickleError as err:
        raise UserError(f"{path} refers to {err}, which a DALL-E {part.name} never contains; refusing to load it "
                        f"(use OpenAI's original {part.name}.pkl)") from None
    except (pickle.UnpicklingError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise UserError(f"{path} is not a readable DALL-E {part.name}.pkl ({type(err).__name__}); download it again") from None
    if getattr(root, "qualname", "") != part.qualname:
        raise UserError(f"{path} holds {getattr(root, 'qualname', type(root).__name__)}, not {part.qualname}; "
                        f"pass the DALL-E {part.name}.pkl")
    state = record_state(root)
    cfg = part.config(**{k: int(state[k]) for k in asdict(part.config()) if k in state})
    return named_parameters(root), cfg


def check_config(cfg, source: str, part: PickledPart = ENCODER) -> None:
    for name, (low, high) in part.limits.items():
        value = getattr(cfg, name)
        if not low <= value <= high:
            raise UserError(f"{source} declares a DALL-E {part.name} with {name}={value} (expected {low}..{high}); the "
                            f"file is corrupt or not OpenAI's {part.name}.pkl: download it again")


def _groups_and_blocks(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    groups = {k.split(".")[1] for k in tensors if k.startswith("blocks.group_")}
    blocks = {k.split(".")[2] for k in tensors if k.startswith("blocks.group_1.block_")}
    return len(groups), len(blocks)


def infer_config(tensors: dict[str, torch.Tensor]) -> DalleEncoderConfig:
    """The hyper-parameters from tensor shapes (encoder weights stored without them)."""
    n_hid, channels = tensors["blocks.input.w"].shape[:2]
    groups, blocks = _groups_and_blocks(tensors)
    return DalleEncoderConfig(group_count=groups, n_hid=n_hid, n_blk_per_group=blocks,
                              input_channels=channels, vocab_size=tensors["blocks.output.conv.w"].shape[0])


def infer_decoder_config(tensors: dict[str, torch.Tensor]) -> DalleDecoderConfig:
    """The decoder's hyper-parameters from tensor shapes: input [n_init, vocab], output [2*C, n_hid]."""
    n_init, vocab = tensors["blocks.input.w"].shape[:2]
    out2, n_hid = tensors["blocks.output.conv.w"].shape[:2]
    groups, blocks = _groups_and_blocks(tensors)
    return DalleDecoderConfig(group_count=groups, n_init=n_init, n_hid=n_hid, n_blk_per_group=blocks,
                              output_channels=out2 // 2, vocab_size=vocab)


def model_from_tensors(tensors: dict[str, torch.Tensor], cfg, source: str, part: PickledPart = ENCODER) -> nn.Module:
    """An eval-mode encoder or decoder; the tensors must match the architecture exactly (checked on
    the meta device first, so a file with absurd shapes allocates nothing)."""
    check_config(cfg, source, part)
    with torch.device("meta"):
        expected = part.build(cfg).state_dict()
    if set(expected) != set(tensors) or any(expected[k].shape != tensors[k].shape for k in expected):
        missing = sorted(set(expected) - set(tensors))[:3]
        raise UserError(f"{source} does not match the DALL-E {part.name} architecture (e.g. missing {missing}); "
                        f"it may be a different model")
    model = part.build(cfg)
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.eval().requires_grad_(False)


def encoder_from_tensors(tensors: dict[str, torch.Tensor], cfg: DalleEncoderConfig | None, source: str) -> DalleEncoder:
    """An encoder from bare tensors (a ContinualTransformer checkpoint's), its sizes read off their shapes."""
    if cfg is None:
        try:
            cfg = infer_config(tensors)
        except KeyError:
            raise UserError(f"{source} holds no DALL-E encoder weights (blocks.input.w ...)") from None
    return model_from_tensors(tensors, cfg, source)


def decoder_from_tensors(tensors: dict[str, torch.Tensor], source: str) -> DalleDecoder:
    """A decoder from bare tensors (a ContinualTransformer checkpoint's), its sizes read off their shapes."""
    try:
        cfg = infer_decoder_config(tensors)
    except KeyError:
        raise UserError(f"{source} holds no DALL-E decoder weights (blocks.input.w ...)") from None
    return model_from_tensors(tensors, cfg, source, DECODER)


def save_dalle_part(target: Path, tensors: dict[str, torch.Tensor], cfg) -> None:
    """`encoder.safetensors` / `decoder.safetensors`: the tensors and their hyper-parameters, what
    --d_vae_weight_path reads as it reads the pickles (and faster)."""
    save_safetensors(target, tensors, {k: str(v) for k, v in asdict(cfg).items()})


def _load(path: Path, part: PickledPart, cache: bool) -> nn.Module:
    if path.suffix == ".safetensors":
        tensors, meta = load_safetensors_file(path)
        cfg = part.config(**{k: int(v) for k, v in meta.items() if k in asdict(part.config())})
        tensors = {k.removeprefix(f"{part.name}."): v for k, v in tensors.items()}
    else:
        tensors, cfg = read_dalle_pickle(path, part)
    model = model_from_tensors(tensors, cfg, str(path), part)
    if cache and path.suffix != ".safetensors":
        target = path.with_name(f"{part.name}.safetensors")
        try:
            save_dalle_part(target, tensors, cfg)
            log.info("cached DALL-E %s tensors as %s", part.name, target)
        except OSError as err:
            log.warning("could not cache %s (%s); %s will be parsed again next time", target, err, path.name)
    return model


def load_dalle_encoder(weight_path: str | Path, cache: bool = True) -> DalleEncoder:
    """An eval-mode `DalleEncoder` from `encoder.pkl` (or its cached `encoder.safetensors`)."""
    return _load(_locate(weight_path), ENCODER, cache)


def load_dalle_decoder(weight_path: str | Path, cache: bool = True) -> DalleDecoder | None:
    """The `decoder.pkl` (or its cache) kept beside the encoder, or None when there is none."""
    folder = Path(weight_path) if Path(weight_path).is_dir() else Path(weight_path).parent
    for name in ("decoder.safetensors", "decoder.pkl"):
        if (folder / name).is_file():
            return _load(folder / name, DECODER, cache)
    return None
