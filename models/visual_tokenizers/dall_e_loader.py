"""Load OpenAI's `encoder.pkl` safely and cache its tensors as safetensors."""
from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch

from common.checkpoint_io import atomic_write, load_safetensors_file
from common.errors import UserError
from models.visual_tokenizers.dall_e import DalleEncoder, DalleEncoderConfig
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


def read_encoder_pickle(path: Path) -> tuple[dict[str, torch.Tensor], DalleEncoderConfig]:
    """Tensors and hyper-parameters of a pickled `dall_e.encoder.Encoder`, without running its code."""
    try:
        root = load_module_pickle(path, ALLOWED_MODULES)
    except UnsafePickleError as err:
        raise UserError(f"{path} refers to {err}, which a DALL-E encoder never contains; refusing to load it "
                        f"(use OpenAI's original encoder.pkl)") from None
    except (pickle.UnpicklingError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise UserError(f"{path} is not a readable DALL-E encoder.pkl ({type(err).__name__}); download it again") from None
    if getattr(root, "qualname", "") != "dall_e.encoder.Encoder":
        raise UserError(f"{path} holds {getattr(root, 'qualname', type(root).__name__)}, not dall_e.encoder.Encoder; "
                        f"pass the DALL-E encoder.pkl (not decoder.pkl)")
    state = record_state(root)
    cfg = DalleEncoderConfig(**{k: int(state[k]) for k in asdict(DalleEncoderConfig()) if k in state})
    return named_parameters(root), cfg


# generous bounds around OpenAI's encoder (4 groups, 256 hidden, 2 blocks, 8192 tokens): a file
# claiming more is crafted or corrupt, and is refused before anything is allocated
CONFIG_LIMITS = {"group_count": (1, 8), "n_hid": (1, 4096), "n_blk_per_group": (1, 16), "input_channels": (1, 16),
                 "vocab_size": (2, 65536)}


def check_config(cfg: DalleEncoderConfig, source: str) -> None:
    for name, (low, high) in CONFIG_LIMITS.items():
        value = getattr(cfg, name)
        if not low <= value <= high:
            raise UserError(f"{source} declares a DALL-E encoder with {name}={value} (expected {low}..{high}); the file is "
                            f"corrupt or not OpenAI's encoder.pkl: download it again")


def infer_config(tensors: dict[str, torch.Tensor]) -> DalleEncoderConfig:
    """The hyper-parameters from tensor shapes (encoder weights stored without them)."""
    n_hid, channels = tensors["blocks.input.w"].shape[:2]
    groups = {k.split(".")[1] for k in tensors if k.startswith("blocks.group_")}
    blocks = {k.split(".")[2] for k in tensors if k.startswith("blocks.group_1.block_")}
    return DalleEncoderConfig(group_count=len(groups), n_hid=n_hid, n_blk_per_group=len(blocks),
                              input_channels=channels, vocab_size=tensors["blocks.output.conv.w"].shape[0])


def encoder_from_tensors(tensors: dict[str, torch.Tensor], cfg: DalleEncoderConfig | None, source: str) -> DalleEncoder:
    """An eval-mode encoder; the tensors must match the architecture exactly (checked on the meta
    device first, so a file with absurd shapes allocates nothing)."""
    if cfg is None:
        try:
            cfg = infer_config(tensors)
        except KeyError:
            raise UserError(f"{source} holds no DALL-E encoder weights (blocks.input.w ...)") from None
    check_config(cfg, source)
    with torch.device("meta"):
        expected = DalleEncoder(cfg).state_dict()
    if set(expected) != set(tensors) or any(expected[k].shape != tensors[k].shape for k in expected):
        missing = sorted(set(expected) - set(tensors))[:3]
        raise UserError(f"{source} does not match the DALL-E encoder architecture (e.g. missing {missing}); "
                        f"it may be a different model")
    encoder = DalleEncoder(cfg)
    encoder.load_state_dict({k: v.float() for k, v in tensors.items()})
    return encoder.eval().requires_grad_(False)


def load_dalle_encoder(weight_path: str | Path, cache: bool = True) -> DalleEncoder:
    """An eval-mode `DalleEncoder` from `encoder.pkl` (or its cached `encoder.safetensors`)."""
    path = _locate(weight_path)
    if path.suffix == ".safetensors":
        tensors, meta = load_safetensors_file(path)
        cfg = DalleEncoderConfig(**{k: int(v) for k, v in meta.items() if k in asdict(DalleEncoderConfig())})
        tensors = {k.removeprefix("encoder."): v for k, v in tensors.items()}
    else:
        tensors, cfg = read_encoder_pickle(path)
    encoder = encoder_from_tensors(tensors, cfg, str(path))
    if cache and path.suffix != ".safetensors":
        target = path.with_name(CACHE_NAME)
        try:
            from safetensors.torch import save_file

            meta = {k: str(v) for k, v in asdict(cfg).items()}
            atomic_write(target, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta))
            log.info("cached DALL-E encoder tensors as %s", target)
        except OSError as err:
            log.warning("could not cache %s (%s); encoder.pkl will be parsed again next time", target, err)
    return encoder
