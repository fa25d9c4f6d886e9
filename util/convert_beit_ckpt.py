"""Convert BEiT weights (or a ContinualTransformer checkpoint) into this project's checkpoint.

    python util/convert_beit_ckpt.py            # as ContinualTransformer: checkpoints/beit_base_patch16_224_pt22k_ft22kto1k.pth
                                                # -> checkpoints/beit_base_patch16_224_pt22k_ft22kto1k_transfertovlmo.pth
    python util/convert_beit_ckpt.py --input beit_base_patch16_224_pt22k.pth --output checkpoints/beit_base_pt22k.safetensors
    python util/convert_beit_ckpt.py --input hf/beit-base-patch16-224 --output checkpoints/beit_base.safetensors --image_size 384
    python util/convert_beit_ckpt.py --input their_run/checkpoint-99.pth --output checkpoints/theirs.safetensors \
        --dall_e_output checkpoints/their_dall_e   # and the DALL-E tokenizer the run carries

Reads microsoft/unilm `.pth` (pt22k and fine-tuned), timm state dicts (`.pth`/`.safetensors`),
Hugging Face BEiT model folders, ContinualTransformer checkpoints of every kind, and MAE's weights
(facebookresearch/mae's `mae_pretrain_vit_*.pth` / `mae_visualize_vit_*.pth`, timm's `vit_*.mae`,
Hugging Face `ViTMAEForPreTraining` folders; these also load directly as `--init_from`). Never runs
pickled code.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.checkpoint_io import Checkpoint, read_checkpoint, save_weights  # noqa: E402
from common.errors import UserError, cli_entry  # noqa: E402
from conversion.beit import BeitTarget, convert_file  # noqa: E402
from conversion.named_weights import list_table, resolve  # noqa: E402
from models import mae_weights  # noqa: E402
from models.config import FFN_KINDS, BackboneConfig  # noqa: E402
from models.continual_transformer import is_continual_transformer, translate  # noqa: E402
from models.lora import plain_names  # noqa: E402
from models.lora_checkpoints import fold_adapters  # noqa: E402
from models.pretrained import describe  # noqa: E402
from models.registry import list_models  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=None, help=f"BEiT .pth/.safetensors file, Hugging Face model folder, "
                                                 f"ContinualTransformer checkpoint or MAE weights; or a name (--list), "
                                                 f"hf-hub:ORG/NAME or https:// URL, fetched once "
                                                 f"(default: {DEFAULT_INPUT})")
    p.add_argument("--output", default=None, help="where to write: .safetensors (recommended) or .pth (default: the "
                                                  "input's name + _transfertovlmo.pth, as ContinualTransformer names it)")
    p.add_argument("--model", choices=list_models(), default=None,
                   help="registered variant the weights must fit (default: the source's own architecture)")
    p.add_argument("--image_size", type=int, default=None,
                   help="target resolution; position tables are interpolated (default: the source's)")
    p.add_argument("--ffn", choices=FFN_KINDS, default="shared",
                   help="shared: one FFN for all modalities; multiway: VLMo experts, each a copy of the image FFN")
    p.add_argument("--vlffn_start_layer_index", type=int, default=None,
                   help="--ffn multiway: the first block whose image-text pairs go through the vision-language "
                        "expert (default: the model's, VLMo-base 10; two below the top for other depths)")
    p.add_argument("--vocab_size", type=int, default=30522, help="text vocabulary (bert-base-uncased: 30522)")
    p.add_argument("--max_text_len_of_initckpt", type=int, default=196, help="text positions the model can hold")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights the source lacks (text embeddings)")
    p.add_argument("--dall_e_output", default=None,
                   help="a ContinualTransformer run checkpoint carries the DALL-E tokenizer it trained with: write its "
                        "encoder (and decoder) here as encoder.safetensors (decoder.safetensors), a folder that "
                        "--d_vae_weight_path reads")
    p.add_argument("--early_layers", type=int, default=None,
                   help="BEiT v2 pretraining checkpoints: the block whose patch tokens its patch aggregation "
                        "(cls_pt_layers) reads (default: depth - 3, BEiT v2's 9 of 12 and 21 of 24)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--list", action="store_true", help="print the weights --input (and every weights flag of the "
                   "runs) takes by name: where they come from, size and licence")
    return p


DEFAULT_INPUT = "checkpoints/beit_base_patch16_224_pt22k_ft22kto1k.pth"  # where ContinualTransformer's README puts it


def default_paths(args) -> tuple[str, Path]:
    source = args.input or DEFAULT_INPUT
    if args.input is None and not Path(source).exists():
        raise UserError(f"no --input given and {DEFAULT_INPUT} (ContinualTransformer's default) does not exist; put the "
                        f"BEiT checkpoint there or pass --input FILE --output FILE")
    output = Path(args.output) if args.output else Path(source).with_name(Path(source).stem + "_transfertovlmo.pth")
    return source, output


def refuse_taken_dall_e_output(folder: str | None, overwrite: bool) -> None:
    """Checked before anything is converted or written."""
    taken = [str(p) for p in (Path(folder or "") / f"{part}.safetensors" for part in ("encoder", "decoder"))
             if folder and p.exists()]
    if taken and not overwrite:
        raise UserError(f"--dall_e_output: {taken[0]} already exists; pass --overwrite or choose another folder")


def write_carried_dall_e(ckpt: Checkpoint, folder: str | None) -> None:
    """The DALL-E encoder and decoder a run checkpoint carries, as files --d_vae_weight_path reads."""
    from models.visual_tokenizers.dall_e_loader import infer_config, infer_decoder_config, save_dalle_part

    parts = {part: ckpt.extra[f"dall_e_{part}"] for part in ("encoder", "decoder") if ckpt.extra.get(f"dall_e_{part}")}
    if not parts:
        if folder:
            raise UserError(f"--dall_e_output: {ckpt.path} carries no DALL-E tokenizer (only run checkpoints of "
                            f"ContinualTransformer's image stages do)")
        return
    if folder is None:
        print(f"  it carries the DALL-E {' and '.join(parts)} it trained with; --dall_e_output DIR writes them as "
              f"a folder for --d_vae_weight_path")
        return
    infer = {"encoder": infer_config, "decoder": infer_decoder_config}
    for part, tensors in parts.items():
        save_dalle_part(Path(folder) / f"{part}.safetensors", tensors, infer[part](tensors))
    print(f"wrote its DALL-E {' and '.join(parts)} to {folder} (use --d_vae_type dall-e --d_vae_weight_path {folder})")


def convert_continual_transformer(raw: Checkpoint, source: str, output: Path, args) -> None:
    """Their checkpoints load directly everywhere; converting one writes it in this project's format."""
    ckpt = translate(raw)
    print(f"source: {source} (ContinualTransformer, {len(ckpt.model)} tensors)")
    for line in ckpt.extra.get("conversion_notes") or []:
        print("  " + line)
    tensors = plain_names(ckpt.model)
    if ckpt.extra.get("lora"):
        tensors = fold_adapters(ckpt)[0]
        print(f"  merged its LoRA adapters (rank {ckpt.extra['lora']['rank']}, alpha 1)")
    save_weights(output, tensors, ckpt.backbone_config, {"source": str(source)}, ckpt.info)
    print(f"wrote {output}")
    write_carried_dall_e(ckpt, args.dall_e_output)


def convert_mae(raw: Checkpoint | None, source: str, output: Path, args) -> None:
    """MAE's weights (facebookresearch/mae, timm, Hugging Face ViTMAE) load directly everywhere; converting
    one writes it in this project's format, its decoder as the mae_decoder head."""
    given = [flag for flag, value in (("--image_size", args.image_size), ("--model", args.model),
                                      ("--vlffn_start_layer_index", args.vlffn_start_layer_index),
                                      ("--dall_e_output", args.dall_e_output), ("--early_layers", args.early_layers))
             if value is not None] + (["--ffn multiway"] if args.ffn != "shared" else [])
    if given:
        raise UserError(f"{' '.join(given)} shape a BEiT conversion; {source} is MAE's and converts as it is (a run's "
                        f"--image_size resizes its positions when it loads it)")
    ckpt = mae_weights.read_hf_folder(Path(source)) if raw is None else mae_weights.translate(raw)
    print(f"source: {source} ({ckpt.info['origin']}, {len(ckpt.model)} tensors): "
          f"{describe(BackboneConfig.from_dict(ckpt.backbone_config))}")
    for line in ckpt.extra.get("conversion_notes") or []:
        print("  " + line)
    save_weights(output, ckpt.model, ckpt.backbone_config, {"source": str(source)}, ckpt.info)
    print(f"wrote {output}")


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.list:
        print(list_table() + "\n\nAlso hf-hub:ORG/NAME[@revision] and https:// URLs; fetched once into the standard "
              "caches (HF_HOME, TORCH_HOME), checked, reused offline (HF_HUB_OFFLINE=1).")
        return
    if args.input is not None:
        args.input = resolve(args.input, "--input", convert=False)  # a name is fetched; converting is this script's
    source, output = default_paths(args)
    if output.suffix not in (".safetensors", ".pth", ".pt"):
        raise UserError(f"--output {output} must end in .safetensors, .pth or .pt")
    if output.exists() and not args.overwrite:
        raise UserError(f"--output {output} already exists; pass --overwrite or choose another path")
    refuse_taken_dall_e_output(args.dall_e_output, args.overwrite)
    raw = read_checkpoint(source) if Path(source).is_file() else None
    if raw is not None and is_continual_transformer(raw):
        return convert_continual_transformer(raw, source, output, args)
    if mae_weights.is_hf_vit_folder(Path(source)) or (raw is not None and mae_weights.is_mae(raw)):
        return convert_mae(raw, source, output, args)
    if args.dall_e_output:
        raise UserError(f"--dall_e_output: {source} is not a ContinualTransformer run checkpoint, which is what "
                        f"carries a DALL-E tokenizer")
    if args.vlffn_start_layer_index is not None and args.ffn != "multiway":
        raise UserError("--vlffn_start_layer_index places VLMo's vision-language expert; add --ffn multiway")
    convert_file(source, output, BeitTarget(args.model, args.image_size, args.ffn, args.vocab_size,
                                             args.max_text_len_of_initckpt, args.vlffn_start_layer_index, args.seed,
                                             args.early_layers))


if __name__ == "__main__":
    main()
