"""ContinualTransformer's files as its own code writes them (github.com/YifanXu74/ContinualTransformer),
for tests. Its model is rebuilt here with the submodules its `ContinualModel` registers, under the
same attribute names, so `state_dict()` yields the keys its files hold; nothing of this project's
model code is used:
- `transformer`: its `LoraTransformer` (modules_cook/backbone_modules.py): `patch_embed.proj`,
  `cls_token`, blocks of `norm1`, `attn` (`qkv` without bias, `q_bias`, `v_bias`, `proj`), `norm2`,
  `mlp` (`fc1`, `fc2`), `gamma_1`, `gamma_2`, and `norm`; every linear layer a loralib `Linear`
  whose `lora_A` / `lora_B` exist with a rank > 0 and which merges them into its weight on `eval()`;
- `relative_position_bias_table` (all layers' heads side by side), `mask_token`, `logit_scale`;
- `mim_processor.d_vae`: BEiT's `Dalle_VAE`, whose `load_model` sets OpenAI's `encoder` and
  `decoder` (the `dall_e` package's modules, small random ones here) as attributes;
- `mim_score` (transform, decoder, bias), `text_embeddings` (transformers' `BertEmbeddings`),
  `token_type_embeddings`, `pooler`, `mlm_score` (transformers' `BertPredictionHeadTransform`),
  `itc_head` (`fc_img`, `fc_txt`), `itc_scores` (no weights).
The writers follow util/misc.py: `save_model` (`{'model', 'optimizer', 'epoch', 'scaler', 'args'}`
with the argparse Namespace itself), `save_merged_model` (`model.eval()`, then the whole state dict,
adapters included), and `ContinualModel.convert_pretrained_weight` (BEiT's keys prefixed with
`transformer.`, per-layer tables concatenated into a copy of the model's zero-initialised table)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import dall_e
import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertConfig, BertEmbeddings, BertPredictionHeadTransform

from tests.ct_reference import Dims


class LoraLinear(nn.Linear):
    """loralib's Linear with lora_alpha 1 (scaling 1/rank): the merge happens in `train(False)`."""

    def __init__(self, inp: int, out: int, rank: int, bias: bool = True) -> None:
        super().__init__(inp, out, bias=bias)
        self.rank, self.merged = rank, False
        if rank:
            self.lora_A = nn.Parameter(torch.zeros(rank, inp))
            self.lora_B = nn.Parameter(torch.zeros(out, rank))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.rank and mode == self.merged:  # merge on eval(), unmerge on train()
            delta = self.lora_B.data @ self.lora_A.data / self.rank
            self.weight.data += -delta if mode else delta
            self.merged = not mode
        return self


class Attention(nn.Module):
    def __init__(self, d: Dims, rank: int) -> None:
        super().__init__()
        self.qkv = LoraLinear(d.dim, 3 * d.dim, rank, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(d.dim)), nn.Parameter(torch.zeros(d.dim))
        self.proj = LoraLinear(d.dim, d.dim, rank)


class Mlp(nn.Module):
    def __init__(self, d: Dims, rank: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = LoraLinear(d.dim, 4 * d.dim, rank), LoraLinear(4 * d.dim, d.dim, rank)


class Block(nn.Module):
    def __init__(self, d: Dims, rank: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d.dim, eps=1e-6), Attention(d, rank)
        self.norm2, self.mlp = nn.LayerNorm(d.dim, eps=1e-6), Mlp(d, rank)
        self.gamma_1, self.gamma_2 = nn.Parameter(0.1 * torch.ones(d.dim)), nn.Parameter(0.1 * torch.ones(d.dim))


class PatchEmbed(nn.Module):
    def __init__(self, d: Dims) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, d.dim, d.patch, d.patch)


class LoraTransformer(nn.Module):
    def __init__(self, d: Dims, rank: int) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d.dim))
        self.pos_embed = None  # relative positions only: not a parameter, not in the state dict
        self.blocks = nn.ModuleList(Block(d, rank) for _ in range(d.depth))
        self.norm = nn.LayerNorm(d.dim, eps=1e-6)


class DalleVAE(nn.Module):
    """BEiT's `Dalle_VAE`: its encoder and decoder are assigned by `load_model`."""

    def __init__(self, d: Dims) -> None:
        super().__init__()
        self.encoder = dall_e.encoder.Encoder(n_hid=16, vocab_size=d.visual_vocab, n_blk_per_group=1)
        self.decoder = dall_e.decoder.Decoder(n_init=8, n_hid=16, vocab_size=d.visual_vocab, n_blk_per_group=1)


class MIMProcessor(nn.Module):
    def __init__(self, d: Dims) -> None:
        super().__init__()
        self.d_vae = DalleVAE(d)
        self.d_vae.requires_grad_(False)


class MIMHead(nn.Module):
    def __init__(self, d: Dims) -> None:
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(d.dim, d.dim), nn.GELU(), nn.LayerNorm(d.dim, eps=1e-6))
        self.decoder = nn.Linear(d.dim, d.visual_vocab, bias=False)
        self.bias = nn.Parameter(torch.zeros(d.visual_vocab))


class MLMHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))


class Pooler(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)


class ITCHead(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc_img, self.fc_txt = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)


class ContinualModel(nn.Module):
    def __init__(self, d: Dims, rank: int = 0) -> None:
        super().__init__()
        self.transformer = LoraTransformer(d, rank)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(d.image_rows + 2 * d.text_len + 2,
                                                                     d.depth * d.heads))
        self.mim_processor = MIMProcessor(d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d.dim))
        self.mim_score = MIMHead(d)
        bert = BertConfig(vocab_size=d.vocab, hidden_size=d.dim, max_position_embeddings=40,
                          position_embedding_type="rel_pos")
        self.text_embeddings = BertEmbeddings(bert)
        self.token_type_embeddings = nn.Embedding(2, d.dim)
        self.pooler = Pooler(d.dim)
        self.mlm_score = MLMHead(bert)
        self.itc_head = ITCHead(d.dim)
        self.itc_scores = nn.Module()
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))


def their_args(**changes) -> argparse.Namespace:
    """main_pretrain_cook.py's flags as its parser and init_distributed_mode leave them (what
    save_model stores, as the Namespace itself)."""
    args = dict(batch_size=64, epochs=400, accum_iter=1, save_per_epochs=20, model="vlmo_base_patch16", model_weight="",
                image_size=32, second_image_size=32, mask_ratio=0.75, norm_pix_loss=False, drop_path_rate=0.1,
                d_vae_type="dall-e", d_vae_weight_path="checkpoints/dall_e_tokenizer_weight/", weight_decay=0.05,
                lr=0.0003, blr=1e-3, min_lr=0.0, warmup_epochs=40, data_path="data/ILSVRC2012/train/",
                data_file_path=None, output_dir="outputs/image_mim/", log_dir="outputs/image_mim/", device="cuda",
                seed=0, resume="", start_epoch=0, num_workers=10, pin_mem=True,
                disable_imagenet_default_mean_and_std=False, train_interpolation="bicubic",
                second_interpolation="lanczos", webdataset=False, train_num_samples=None,
                train_data_upsampling_factors=None, world_size=8, local_rank=0, dist_on_itp=False, dist_url="env://",
                lora_rank=0, exception=["norm.weight", "norm.bias", "cls_token", "pos_embed"],
                self_regularization=False, reg_loss_weight=1.0, exp_name="image_mim", max_text_len=196,
                max_text_len_of_initckpt=196, vocab_size=30522, mlm_probability=0.15, mim_probability=0.55,
                img_vocab_size=8192, aggregate_itc=True, disable_aggregate_itc=False, force_vae=False, debug=False,
                save_merged_lora_model=False, convert_ckpt=False, rank=0, gpu=0, distributed=True,
                dist_backend="nccl")
    args.update(changes)
    return argparse.Namespace(**args)


def optimizer_after_a_step(model: nn.Module) -> dict:
    """AdamW over what trains (timm's param_groups_weight_decay skips frozen weights), one step taken."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in trainable if p.dim() <= 1], "weight_decay": 0.0},
                                   {"params": [p for p in trainable if p.dim() > 1], "weight_decay": 0.05}],
                                  lr=1e-4, betas=(0.9, 0.95))
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in trainable:
        p.grad = None
    return optimizer.state_dict()


def save_model(model: nn.Module, path: Path, epoch: int, args: argparse.Namespace, old_transformers: bool = False):
    """util/misc.py save_model, with a GradScaler's state. `old_transformers`: transformers before
    4.31 kept `text_embeddings.position_ids` in the state dict."""
    state = model.state_dict()
    if old_transformers:
        state["text_embeddings.position_ids"] = torch.arange(40)[None]
    torch.save({"model": state, "optimizer": optimizer_after_a_step(model), "epoch": epoch,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                           "_growth_tracker": 0}, "args": args}, path)
    return path


def mark_only_lora_as_trainable(model: ContinualModel) -> None:
    """custom_loralib's: adapters, plus the `exception` names (norms, cls_token), train in `transformer`."""
    for name, p in model.transformer.named_parameters():
        p.requires_grad = "lora_" in name or name.endswith(("norm.weight", "norm.bias", "cls_token"))


def save_merged_model(model: nn.Module, path: Path) -> Path:
    """util/misc.py save_merged_model: eval() merges loralib's adapters, the whole state dict is saved."""
    model.eval()
    torch.save({"model": model.state_dict()}, path)
    return path


def convert_pretrained_weight(beit_state: dict[str, torch.Tensor], model: ContinualModel, path: Path) -> Path:
    """ContinualModel.convert_pretrained_weight on a BEiT `{'model': ...}`: per-layer tables go into
    a copy of the model's table; every other key, whatever it is, gets the `transformer.` prefix."""
    converted, per_layer = {}, {}
    for key, value in beit_state.items():
        if "attn.relative_position_bias_table" in key:
            per_layer[int(key.split(".attn.")[0].split(".")[-1])] = value
            continue
        converted["transformer." + key] = value
    if per_layer:
        stacked = torch.cat([per_layer[i] for i in sorted(per_layer)], dim=1)
        table = model.relative_position_bias_table.data.clone()
        table[: stacked.shape[0]] = stacked
        converted["relative_position_bias_table"] = table
    torch.save({"model": converted}, path)
    return path
