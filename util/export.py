"""Export a checkpoint into the ecosystem, each format checked against this project's outputs.

    python util/export.py --checkpoint outputs/finetune/checkpoint-best.pth --format onnx --output exported/onnx
    python util/export.py --checkpoint CKPT --format hf --output exported/hf_beit      # save_pretrained folder
    python util/export.py --checkpoint CKPT --format timm --output exported/beit.safetensors

onnx: `classifier.onnx` (when the checkpoint has a classifier), `segmenter.onnx` (a segmentation
checkpoint: images of any size in, per-pixel logits at that size out), `image_encoder.onnx` and
`text_encoder.onnx`, `image_embedding.onnx` / `text_embedding.onnx` when it has an ITC head, and
`image_text_matching.onnx` when it has the pooler and ITM head (VLMo's re-ranker: images,
`input_ids`, `attention_mask` in, no-match / match logits out), `fusion.onnx` for a VQA or NLVR2 checkpoint (images, and for NLVR2 `images_2`, with `input_ids` and
`attention_mask` in, the answer or true/false logits out) (dynamic batch; text also dynamic length),
verified with onnxruntime.
hf: `BeitForImageClassification` (with a classifier) or `BeitModel`, reloaded with
`from_pretrained` and compared. timm: a Beit state dict (+ `timm_kwargs.json` for `create_model`).
Every export gets a `run_info.json` (preprocessing, class names, text tokenizer), so util/predict.py
and util/search.py run from the export alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from common.checkpoint_io import atomic_write, save_safetensors  # noqa: E402
from common.errors import UserError, cli_entry  # noqa: E402
from models.backbone import HoldsBackbone  # noqa: E402
from models.classifier import ImageClassifier  # noqa: E402
from models.fusion_classifier import FusedPairClassifier  # noqa: E402
from models.run_info import write_beside  # noqa: E402
from models.segmenter import Segmenter  # noqa: E402
from serving import open_servable  # noqa: E402

TOLERANCE = 1e-4


def _check(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    diff = (ours.float() - torch.as_tensor(theirs).float()).abs().max().item()
    print(f"  {name}: max abs diff {diff:.2e}")
    if diff > TOLERANCE:
        raise UserError(f"exported {name} differs from the checkpoint by {diff:.2e} (> {TOLERANCE}); please report this")
    return diff


class _TextEncoder(nn.Module):
    def __init__(self, backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_text(input_ids, attention_mask)


class _ImageEncoder(nn.Module):
    def __init__(self, backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(images)


class _ImageEmbedding(nn.Module):
    """Normalised ITC embedding of images (what search ranks with)."""

    def __init__(self, backbone, itc_head) -> None:
        super().__init__()
        self.backbone, self.itc_head = backbone, itc_head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.itc_head.embed_image(self.backbone.encode_image(images)[:, 0])


class _TextEmbedding(nn.Module):
    def __init__(self, backbone, itc_head) -> None:
        super().__init__()
        self.backbone, self.itc_head = backbone, itc_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.itc_head.embed_text(self.backbone.encode_text(input_ids, attention_mask)[:, 0])


class _Segmenter(nn.Module):
    """Per-pixel logits `[B, classes, H, W]` of images of any size: resized to the crop size the
    backbone was built for and back (whole-image inference; on crop-size windows the resizes are
    identities, so serving slides windows through this same graph)."""

    def __init__(self, segmenter) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.crop = segmenter.backbone.cfg.img_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        scaled = nn.functional.interpolate(images, size=(self.crop, self.crop), mode="bilinear", align_corners=False)
        return nn.functional.interpolate(self.segmenter(scaled), size=size, mode="bilinear", align_corners=False)


class _Fusion(nn.Module):
    """A fused-pair classifier with its images as separate inputs (ONNX takes no lists)."""

    def __init__(self, classifier: FusedPairClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *images, input_ids, attention_mask = inputs
        return self.classifier(list(images), input_ids, attention_mask)


class _Matching(nn.Module):
    """Image-text matching logits `[B, 2]` of (image, caption) pairs: the re-ranker of retrieval."""

    def __init__(self, backbone, pooler, itm_head) -> None:
        super().__init__()
        self.backbone, self.pooler, self.itm_head = backbone, pooler, itm_head

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.itm_head(self.pooler(self.backbone.encode_pair(images, input_ids, attention_mask)))


TEXT_AXES = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"}}


def text_check_inputs(cfg, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Another batch size and a padded text of another length than the traced ones."""
    ids, mask = torch.randint(1, cfg.vocab_size, (3, 11), generator=gen), torch.ones(3, 11, dtype=torch.long)
    mask[0, 7:] = 0
    return ids, mask


def pair_check_inputs(cfg, images_per_text: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Other images, another batch size and a padded text of another length than the traced ones."""
    images = tuple(torch.randn(3, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen)
                   for _ in range(images_per_text))
    return images + text_check_inputs(cfg, gen)


def fusion_job(model: FusedPairClassifier, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple:
    image_names = ["images", "images_2"][:model.images_per_text]
    axes = {**{n: {0: "batch"} for n in image_names}, **TEXT_AXES}
    return ("fusion", _Fusion(model), (*[images] * model.images_per_text, ids, mask),
            image_names + ["input_ids", "attention_mask"], axes)


def export_onnx(model: nn.Module, output: Path, itc_head: nn.Module | None = None,
                matching: tuple[nn.Module, nn.Module] | None = None) -> dict[str, float]:
    """Encoders (and classifier, ITC embeddings when the checkpoint has them) as ONNX, each checked
    with onnxruntime at another batch size (and text length) than the traced one."""
    try:
        import onnx  # noqa: F401 - the exporter needs it
        import onnxruntime as ort
    except ImportError:
        raise UserError("--format onnx needs the onnx and onnxruntime packages: pip install onnx onnxruntime") from None

    backbone = model.backbone if isinstance(model, HoldsBackbone) else model
    cfg = backbone.cfg
    output.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen)
    ids = torch.randint(1, cfg.vocab_size, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    jobs = [("image_encoder", _ImageEncoder(backbone), (images,), ["images"], {"images": {0: "batch"}})]
    if isinstance(model, ImageClassifier):
        jobs.insert(0, ("classifier", model, (images,), ["images"], {"images": {0: "batch"}}))
    if isinstance(model, Segmenter):
        spatial = {0: "batch", 2: "height", 3: "width"}
        jobs.insert(0, ("segmenter", _Segmenter(model), (images,), ["images"], {"images": spatial, "output": spatial}))
    if isinstance(model, FusedPairClassifier):
        jobs.insert(0, fusion_job(model, images, ids, mask))
    jobs.append(("text_encoder", _TextEncoder(backbone), (ids, mask), ["input_ids", "attention_mask"], TEXT_AXES))
    if itc_head is not None:
        jobs.append(("image_embedding", _ImageEmbedding(backbone, itc_head), (images,), ["images"], {"images": {0: "batch"}}))
        jobs.append(("text_embedding", _TextEmbedding(backbone, itc_head), (ids, mask), ["input_ids", "attention_mask"],
                     TEXT_AXES))
    if matching is not None:
        jobs.append(("image_text_matching", _Matching(backbone, *matching), (images, ids, mask),
                     ["images", "input_ids", "attention_mask"], {"images": {0: "batch"}, **TEXT_AXES}))
    diffs = {}
    for name, module, inputs, names, axes in jobs:
        path = output / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape checks that hold for the traced shapes
            torch.onnx.export(module.eval(), inputs, str(path), input_names=names, output_names=["output"],
                              dynamic_axes={"output": {0: "batch"}, **axes}, opset_version=17, dynamo=False)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        # check at another batch size (and text length) than the traced one
        if name.startswith("text_"):
            check = text_check_inputs(cfg, gen)
        elif name in ("fusion", "image_text_matching"):
            check = pair_check_inputs(cfg, model.images_per_text if name == "fusion" else 1, gen)
        elif name == "segmenter":  # another size than the traced one, not square
            check = (torch.randn(3, cfg.in_chans, cfg.img_size + 24, cfg.img_size - 8, generator=gen),)
        else:
            check = (torch.randn(3, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen),)
        got = session.run(None, {n: t.numpy() for n, t in zip(names, check)})[0]
        with torch.no_grad():
            diffs[name] = _check(str(path), module(*check), got)
    return diffs


def export_timm(model: nn.Module, output: Path) -> dict[str, float]:
    from conversion.beit_export import timm_kwargs, to_timm

    classifier = isinstance(model, ImageClassifier)
    backbone = model.backbone if classifier else model
    tensors = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    num_classes, mean_pool = 0, True
    if classifier:
        tensors.update({f"pooler_norm.{k}": v for k, v in model.pooler_norm.state_dict().items()})
        tensors.update({f"classifier.{k}": v for k, v in model.classifier.state_dict().items()})
        num_classes, mean_pool = model.classifier.out_features, not model.use_cls
    else:
        mean_pool = False
    timm_model, state = to_timm(tensors, backbone.cfg, num_classes, mean_pool)
    save_safetensors(output.with_suffix(".safetensors"), state)
    kwargs = timm_kwargs(backbone.cfg, num_classes, mean_pool)
    text = json.dumps(kwargs, indent=1)
    atomic_write(output.with_suffix(".timm_kwargs.json"), lambda tmp: Path(tmp).write_text(text))
    images = torch.randn(2, backbone.cfg.in_chans, backbone.cfg.img_size, backbone.cfg.img_size)
    with torch.no_grad():
        ours = model(images) if classifier else backbone.encode_image(images)
        theirs = timm_model(images) if classifier else timm_model.forward_features(images)
    return {"timm": _check(str(output.with_suffix(".safetensors")), ours, theirs)}


def export_hf(model: nn.Module, output: Path, class_names: list[str] | None) -> dict[str, float]:
    from transformers import BeitForImageClassification, BeitModel

    from conversion.beit_export import to_hf

    classifier = isinstance(model, ImageClassifier)
    backbone = model.backbone if classifier else model
    tensors = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    num_classes = 0
    if classifier:
        tensors.update({f"pooler_norm.{k}": v for k, v in model.pooler_norm.state_dict().items()})
        tensors.update({f"classifier.{k}": v for k, v in model.classifier.state_dict().items()})
        num_classes = model.classifier.out_features
    id2label = dict(enumerate(class_names)) if class_names else None
    hf = to_hf(tensors, backbone.cfg, num_classes, classifier and not model.use_cls, id2label)
    hf.save_pretrained(str(output))
    reloaded = (BeitForImageClassification.from_pretrained(str(output)) if classifier
                else BeitModel.from_pretrained(str(output), add_pooling_layer=False)).eval()
    images = torch.randn(2, backbone.cfg.in_chans, backbone.cfg.img_size, backbone.cfg.img_size)
    with torch.no_grad():
        if classifier:
            return {"hf": _check(str(output), model(images), reloaded(pixel_values=images).logits)}
        return {"hf": _check(str(output), backbone.encode_image(images), reloaded(pixel_values=images).last_hidden_state)}


@cli_entry
def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint of any stage, or a fine-tuned classifier")
    p.add_argument("--format", choices=["onnx", "hf", "timm"], required=True)
    p.add_argument("--output", required=True, help="onnx/hf: a folder; timm: a file name (.safetensors)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    output = Path(args.output)
    if output.exists() and not args.overwrite and (output.is_file() or any(output.iterdir())):
        raise UserError(f"--output {output} exists and is not empty; pass --overwrite or choose another path")
    servable = open_servable(args.checkpoint)
    model = servable.model
    kind = (f"classifier ({model.classifier.out_features} classes)" if isinstance(model, ImageClassifier) else
            f"segmenter ({model.num_classes} classes)" if isinstance(model, Segmenter) else
            f"{model.task} classifier ({model.num_classes} outputs)" if isinstance(model, FusedPairClassifier)
            else "backbone")
    print(f"exporting the {kind} of {args.checkpoint} as {args.format} to {output}")
    if args.format != "onnx" and isinstance(model, (Segmenter, FusedPairClassifier)):  # HF/timm BEiT have no such head
        print(f"  {args.format} has no {'UPerNet' if isinstance(model, Segmenter) else 'fusion'} head: exporting the "
              f"backbone only (--format onnx keeps the whole model)")
        model = model.backbone
    if args.format == "onnx":
        heads = servable.heads
        matching = (heads["pooler"], heads["itm_head"]) if {"pooler", "itm_head"} <= set(heads) else None
        diffs = export_onnx(model, output, heads.get("itc_head"), matching)
    elif args.format == "timm":
        diffs = export_timm(model, output)
        output = output.with_suffix(".safetensors")
    else:
        diffs = export_hf(model, output, servable.class_names if isinstance(model, ImageClassifier) else None)
    info = {**servable.info, "preprocessing": servable.preprocessing,
            **({"class_names": servable.class_names} if servable.class_names else {}), "exported_from": args.checkpoint}
    print(f"  wrote {write_beside(output, info)} (preprocessing, class names, text tokenizer)")
    return diffs


if __name__ == "__main__":
    main()
