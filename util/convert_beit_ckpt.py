"""Convert BEiT weights into this project's backbone checkpoint.

    python util/convert_beit_ckpt.py --input beit_base_patch16_224_pt22k.pth --output checkpoints/beit_base_pt22k.safetensors
    python util/convert_beit_ckpt.py --input hf/beit-base-patch16-224 --output checkpoints/beit_base.safetensors --image_size 384

Reads microsoft/unilm `.pth` (pt22k and fine-tuned), timm state dicts (`.pth`/`.safetensors`) and
Hugging Face BEiT model folders. Never runs pickled code.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.checkpoint_io import save_weights  # noqa: E402
from common.errors import UserError, cli_entry  # noqa: E402
from conversion.beit import convert, infer_config, read_source, target_config  # noqa: E402
from models.config import FFN_KINDS  # noqa: E402
from models.pretrained import describe  # noqa: E402
from models.registry import list_models  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="BEiT .pth/.safetensors file or Hugging Face model folder")
    p.add_argument("--output", required=True, help="where to write: .safetensors (recommended) or .pth")
    p.add_argument("--model", choices=list_models(), default=None,
                   help="registered variant the weights must fit (default: the source's own architecture)")
    p.add_argument("--image_size", type=int, default=None,
                   help="target resolution; position tables are interpolated (default: the source's)")
    p.add_argument("--ffn", choices=FFN_KINDS, default="shared",
                   help="shared: one FFN for all modalities; multiway: VLMo experts, each a copy of the image FFN")
    p.add_argument("--vocab_size", type=int, default=30522, help="text vocabulary (bert-base-uncased: 30522)")
    p.add_argument("--max_text_len_of_initckpt", type=int, default=196, help="text positions the model can hold")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights the source lacks (text embeddings)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    if output.suffix not in (".safetensors", ".pth", ".pt"):
        raise UserError(f"--output {output} must end in .safetensors, .pth or .pt")
    if output.exists() and not args.overwrite:
        raise UserError(f"--output {output} already exists; pass --overwrite or choose another path")
    src = read_source(args.input)
    src_cfg = infer_config(src, args.model)
    dst_cfg = target_config(src_cfg, args.model, args.image_size, args.ffn, args.vocab_size, args.max_text_len_of_initckpt)
    tensors, report = convert(src, src_cfg, dst_cfg, seed=args.seed)
    print(f"source: {args.input} ({src.kind}, {len(src.tensors)} tensors): {describe(src_cfg)}")
    print(f"target: {describe(dst_cfg)}")
    for line in report.lines():
        print("  " + line)
    save_weights(output, tensors, dst_cfg.to_dict(), {"source": str(args.input)})
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
