"""BEiT v2's VQ-KD visual tokenizer: a ViT encoder, a task layer into a small code space (32-d in
the released files) and an l2-normalised codebook; a patch's token is its nearest code. Its targets
are semantic: the codebook was trained to reconstruct a teacher's (CLIP's, DINO's, or any stage's)
features, not pixels.

Reads microsoft/unilm's released tokenizers (`vqkd_encoder_base_decoder_{1,3}x768x12_{clip,dino}-*.pth`:
`{"model": state dict}` as `modeling_vqkd.py` and `norm_ema_quantizer.py` name it) with
`torch.load(weights_only=True)`, and the safetensors files util/train_vqkd.py writes in the same
key layout, with their shape and teacher in the metadata. Only the encoder, task layer and codebook
are kept; the decoder, which only served training, is counted and left out."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint_io import load_torch_file
from common.console import say
from common.errors import UserError
from models.visual_tokenizers.vqkd_vit import HEAD_DIM, VitShape, VqkdVit

RELEASED_WIDTH = 768  # every BEiT v2 VQ-KD .pth: a ViT-base encoder

KIND = "vqkd"
REQUIRED = ("encoder.patch_embed.proj.weight", "encoder.pos_embed", "encode_task_layer.0.weight",
            "encode_task_layer.2.weight", "quantize.embedding.weight")
NOT_OURS = ("loss", "teacher", "scaling")  # training-time parts BEiT v2's own loader drops too


class CodebookEmbedding(nn.Module):
    """The codes and their EMA statistics, as buffers named like BEiT v2's `EmbeddingEMA`."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", F.normalize(torch.randn(size, dim), dim=-1))
        self.register_buffer("cluster_size", torch.zeros(size))
        self.register_buffer("embed_avg", self.weight.clone())
        self.register_buffer("initted", torch.zeros(1))


class NormEmaQuantizer(nn.Module):
    """Nearest code of l2-normalised vectors (`quantize.*` in the files); `cluster_size` is the
    EMA of how often each code is used."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.embedding = CodebookEmbedding(size, dim)
        self.register_buffer("cluster_size", torch.zeros(size))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """`[M, dim]` vectors -> `[M]` code ids (squared distance after l2 normalisation, as theirs)."""
        z = F.normalize(z, p=2, dim=-1)
        codes = self.embedding.weight
        dist = z.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * torch.einsum("bd,nd->bn", z, codes)
        return dist.argmin(1)


def task_layer(width: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, out))


class VqkdTokenizer(nn.Module):
    """`get_codebook_indices(images)`: `[B, 3, S, S]` pixels in [0, 1] -> `[B, (S/p)^2]` code ids."""

    def __init__(self, shape: VitShape, codebook_size: int, codebook_dim: int, info: dict | None = None) -> None:
        super().__init__()
        self.encoder = VqkdVit(shape)
        self.encode_task_layer = task_layer(shape.embed_dim, codebook_dim)
        self.quantize = NormEmaQuantizer(codebook_size, codebook_dim)
        self.info = dict(info or {})  # where it came from: teacher, image size, training

    @property
    def vocab_size(self) -> int:
        return self.quantize.embedding.weight.shape[0]

    @property
    def patch_size(self) -> int:
        return self.encoder.shape.patch_size

    compiled_parts_name = "encoder blocks"

    def compiled_parts(self) -> list[nn.Module]:
        """What `--compile` compiles: the encoder's blocks (code_vectors calls them, not the encoder)."""
        return list(self.encoder.blocks)

    def code_vectors(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, N, codebook_dim]` task-layer outputs, before quantisation."""
        x = images.float() * 255.0 / 127.5 - 1.0  # their 'default' pre-processing of [0, 1] pixels
        return self.encode_task_layer(self.encoder.patch_tokens(x).float())

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        z = self.code_vectors(images)
        return self.quantize.nearest(z.reshape(-1, z.shape[-1])).reshape(z.shape[:2])


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        from common.checkpoint_io import load_safetensors_file

        tensors, meta = load_safetensors_file(path)
        if meta.get("kind") != KIND:
            raise UserError(f"{path} is not a VQ-KD tokenizer (its metadata says kind {meta.get('kind')!r}); make one "
                            f"with python util/train_vqkd.py, or pass the matching --d_vae_type")
        return tensors, meta
    try:  # every way a file can fail to be a checkpoint becomes one sentence there
        saved = load_torch_file(path)
    except UserError as err:
        raise UserError(f"--d_vae_weight_path: {err} (--d_vae_type vqkd takes BEiT v2's released VQ-KD .pth or a "
                        f"tokenizer util/train_vqkd.py wrote)") from None
    state = saved.get("model", saved.get("state_dict", saved)) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors (expected {{'model': ...}} as BEiT v2's VQ-KD files)")
    return state, {}


def load_vqkd_tokenizer(path: str | Path, num_heads: int | None = None) -> VqkdTokenizer:
    """A tokenizer from BEiT v2's released `.pth` or our `.safetensors`; its weights exactly.
    `num_heads`: the encoder's attention heads, which a `.pth` does not record (default: 64 dims a
    head, as every released encoder)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--d_vae_weight_path {path} does not exist; pass a VQ-KD tokenizer file (BEiT v2's "
                        f"vqkd_encoder_base_decoder_*.pth, or train one with python util/train_vqkd.py)")
    tensors, meta = _read_tensors(path)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(NOT_OURS)}
    missing = [k for k in REQUIRED if k not in tensors]
    if missing:
        raise UserError(f"{path} is not a VQ-KD tokenizer: it lacks {', '.join(missing)}")
    shape = VitShape(**json.loads(meta["encoder"])) if "encoder" in meta else VitShape.from_tensors(tensors, "encoder.")
    if num_heads is not None:
        shape = dataclasses.replace(shape, num_heads=num_heads)
    elif "encoder" not in meta and shape.embed_dim != RELEASED_WIDTH:
        say(f"{path}: a .pth does not record its encoder's attention heads; read as {shape.num_heads} heads of "
            f"{HEAD_DIM} (BEiT v2's, whose released encoders are {RELEASED_WIDTH} wide with 12). An encoder with other "
            f"heads gives wrong ids: load it with load_vqkd_tokenizer(path, num_heads=N) and save it with "
            f"save_vqkd_tokenizer (a .safetensors records the shape; docs/pretraining.md)")
    size, dim = tensors["quantize.embedding.weight"].shape
    tokenizer = VqkdTokenizer(shape, size, dim, json.loads(meta.get("info", "{}")))
    own = tokenizer.state_dict()
    absent = sorted(set(own) - set(tensors) - {"quantize.cluster_size", "quantize.embedding.initted"})
    if absent:
        raise UserError(f"{path} lacks {len(absent)} tensors of a VQ-KD encoder of its shape ({', '.join(absent[:3])} ...)")
    parts = {k.split(".")[0] for k in own}
    unused = sorted(k for k in tensors if k.split(".")[0] in parts and k not in own)
    if unused:  # e.g. blocks or layer-scale weights this encoder would silently leave out
        raise UserError(f"{path} holds {len(unused)} encoder tensors a VQ-KD encoder of its shape does not have "
                        f"({', '.join(unused[:3])} ...); it is not in BEiT v2's VQ-KD layout")
    wrong = [k for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if wrong:
        raise UserError(f"{path}: {wrong[0]} is {tuple(tensors[wrong[0]].shape)}, not {tuple(own[wrong[0]].shape)} "
                        f"as the rest of the file implies")
    tokenizer.load_state_dict({k: tensors.get(k, own[k]) for k in own})
    tokenizer.info.setdefault("left_out", sorted({k.split(".")[0] for k in tensors} - {k.split(".")[0] for k in own}))
    return tokenizer.eval().requires_grad_(False)


def save_vqkd_tokenizer(tokenizer: VqkdTokenizer, path: str | Path, info: dict) -> None:
    """The tokenizer part (BEiT v2's key layout) as safetensors; the metadata holds the encoder's
    shape and `info` (teacher, image size, training), which the loader returns as `.info`."""
    from common.checkpoint_io import save_safetensors

    tensors = {k: v.detach().cpu().contiguous() for k, v in tokenizer.state_dict().items()}
    save_safetensors(path, tensors, {"kind": KIND, "encoder": json.dumps(tokenizer.encoder.shape.to_dict()),
                                     "info": json.dumps(info)})
