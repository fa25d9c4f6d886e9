"""Speed and peak memory against HF and timm BEiT at the same configuration. Each implementation
runs in its own process so peak memory is its own.

Implementations run in interleaved rounds (A, B, C, A, B, C, ...), one fresh process each, so a
neighbour's load hits all of them alike; each row is the median over rounds of each process's median
step, with the spread, and its speed relative to the reference (HF sdpa). `ours_bf16` is ours under
bf16 autocast (CPU or GPU), `ours_compiled` ours with training's `--compile` (torch.compile of each
block and of the visual tokenizer), `ours_bf16_compiled` both (`--amp bf16 --compile`).

`--mode encode`: forward+backward of `encode_image` vs HF `BeitModel` (sdpa, eager) and timm Beit.
`--mode adamw`: one AdamW step over the backbone's parameters, for-loop vs foreach vs fused.
`--mode tokenizer`: the DALL-E encoder in fp32, channels-last, bf16 and compiled, and the k-means
tokenizer in fp32 and bf16: speed and id agreement.
`--mode loader`: what one DataLoader worker spends per image on decode, the two views, the mask
and collate (generated 500x375 JPEGs), and the workers a device at `--target_rate` images/s needs.
`--sweep` (with encode or mim): our step time and peak memory at each image size x batch size.
`--mode index`: indexing and splitting an image folder's file list (1M and 14M generated paths,
ImageNet-1k and -22k sizes), one core.
`--mode mlm`: one text MLM training step (15% of the tokens predicted, backward, AdamW) of our
backbone's text path vs HF `BertForMaskedLM` of the same width and depth (BERT's 30522 words).
`--mode itc`: one image-text contrastive step (both encoders, projections, symmetric InfoNCE,
backward, AdamW) vs a two-tower reference: HF `BeitModel` + `BertModel` with the same loss.
`--mode mae`: one whole MAE pretraining step (the visible quarter of the patches encoded, the
decoder over every patch, normalised-pixel loss, backward, AdamW) of an MAE-shaped backbone (absolute
positions, no relative bias, as MAE's weights load) vs HF `ViTMAEForPreTraining` of the same sizes.
`--mode epochs`: whole `image_mae` and `image_mim` training epochs of the same backbone on the same
data (main_pretrain_cook.py, interleaved runs): images per second, loader and tokenizer included.
`--mode mim`: one whole BEiT pretraining step: DALL-E tokenization of the second view (ours vs the
`dall-e` package's Encoder), masked forward, MIM loss, backward and AdamW step, vs HF
`BeitForMaskedImageModeling`. Random weights: speed does not depend on their values.

    python experiments/benchmark.py                                   # BEiT-base, 224 px, batch 8, CPU
    python experiments/benchmark.py --mode mim --device cuda --amp bf16 --batch_size 64
    ONEDNN_MAX_CPU_ISA=AVX2 python experiments/benchmark.py --mode mim --impls ours ours_bf16 hf_sdpa   # a CPU without
                                                     # native bf16 (AVX2-only), emulated by capping oneDNN
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from training.optim import ADAMW_IMPLS, adamw_options  # noqa: E402

IMPLS = ("ours", "ours_bf16", "ours_compiled", "ours_bf16_compiled", "hf_sdpa", "hf_eager", "timm")
MIM_IMPLS = ("ours", "ours_bf16", "ours_compiled", "ours_bf16_compiled", "hf_sdpa", "hf_eager")  # also mlm and itc: no timm reference
TRAINING_MODES = ("mim", "mlm", "itc", "mae")  # an optimizer step is part of what is timed
TEXT_VOCAB, TEXT_LENGTH = 30522, 40
KMEANS_VOCAB = 256  # the k-means tokenizer a run fits by default
DEFAULT_IMPLS = ("ours", "hf_sdpa", "hf_eager", "timm")  # ours_* on request: compiling takes minutes
REFERENCE = "hf_sdpa"
VISUAL_VOCAB = 8192
SIZES = {"tiny": (192, 4, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


def hf_config(impl: str, size: str, image_size: int):
    from transformers import BeitConfig

    dim, depth, heads = SIZES[size]
    return BeitConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * dim,
                      image_size=image_size, use_shared_relative_position_bias=True, layer_norm_eps=1e-6,
                      use_mean_pooling=False, drop_path_rate=0.0, use_mask_token=True, vocab_size=VISUAL_VOCAB,
                      attn_implementation=impl.split("_")[1])


def build(impl: str, size: str, image_size: int) -> tuple[torch.nn.Module, callable]:
    """encode mode: (model, images -> features)."""
    dim, depth, heads = SIZES[size]
    if impl.startswith("ours"):
        from models import create_model

        model = create_model(f"vlmo_{size}_patch16", img_size=image_size)
        return model, model.encode_image
    if impl.startswith("hf"):
        from transformers import BeitModel

        model = BeitModel(hf_config(impl, size, image_size), add_pooling_layer=False)
        return model, lambda x: model(pixel_values=x).last_hidden_state
    import timm

    model = timm.create_model("beit_base_patch16_224", pretrained=False, embed_dim=dim, depth=depth, num_heads=heads,
                              img_size=image_size, num_classes=0, global_pool="token")
    return model, model.forward_features


def build_mim(impl: str, size: str, image_size: int) -> tuple[torch.nn.Module, callable]:
    """mim mode: (trainable model, (images, tokenizer_images, mask) -> loss), tokenizer included."""
    import torch.nn.functional as F

    if impl.startswith("ours"):
        from models import create_model
        from models.modes import ImageMIM, ModeOptions
        from models.visual_tokenizers import DalleTokenizer
        from models.visual_tokenizers.dall_e import DalleEncoder

        tokenizer = DalleTokenizer(DalleEncoder())
        task = ImageMIM(create_model(f"vlmo_{size}_patch16", img_size=image_size, drop_path_rate=0.0),
                       ModeOptions(visual_vocab_size=VISUAL_VOCAB))

        def step(images, token_images, mask):
            ids = tokenizer.get_codebook_indices(token_images)
            return task({"image": images, "bool_masked_pos": mask, "visual_token_ids": ids})["loss"]

        return torch.nn.ModuleList([task, tokenizer]), step
    from dall_e import map_pixels
    from dall_e.encoder import Encoder
    from transformers import BeitForMaskedImageModeling

    encoder = Encoder().eval().requires_grad_(False)
    model = BeitForMaskedImageModeling(hf_config(impl, size, image_size))

    def step(images, token_images, mask):
        with torch.no_grad():  # the way unilm's BEiT script tokenizes
            ids = encoder(map_pixels(token_images)).argmax(1).flatten(1)
        logits = model(pixel_values=images, bool_masked_pos=mask).logits  # [B, N, V], every patch
        return F.cross_entropy(logits[mask].float(), ids[mask])

    return torch.nn.ModuleList([model, encoder]), step


def build_mae(impl: str, size: str, image_size: int) -> tuple[torch.nn.Module, callable]:
    """mae mode: (trainable model, (images, mask) -> loss): MAE's ViT (absolute sine-cosine positions,
    no layer scale, no relative bias) and decoder, norm_pix_loss, mask ratio 0.75."""
    from models.modes.image_mae import decoder_defaults

    dim, depth, heads = SIZES[size]
    width, blocks, decoder_heads = decoder_defaults(dim, depth)  # MAE's 512 x 8 x 16 from base up
    if impl.startswith("ours"):
        from models import create_model
        from models.modes import ImageMAE, ModeOptions
        from models.modes.image_mae import MAEShape

        backbone = create_model(f"vlmo_{size}_patch16", img_size=image_size, drop_path_rate=0.0, use_rel_pos_bias=False,
                                use_abs_pos_emb=True, layer_scale_init_value=0.0)
        task = ImageMAE(backbone, ModeOptions(mae=MAEShape(width, blocks, decoder_heads, 0.75, True)))
        return task, lambda images, mask: task({"image": images, "bool_masked_pos": mask})["loss"]
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    model = ViTMAEForPreTraining(ViTMAEConfig(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * dim,
        image_size=image_size, patch_size=16, qkv_bias=True, layer_norm_eps=1e-6, decoder_hidden_size=width,
        decoder_num_hidden_layers=blocks, decoder_num_attention_heads=decoder_heads,
        decoder_intermediate_size=4 * width, mask_ratio=0.75, norm_pix_loss=True,
        attn_implementation=impl.split("_")[1]))
    return model, lambda images, mask: model(pixel_values=images).loss  # it draws its own masks, on the device


def mae_masks(batch: int, grid: int, device: torch.device) -> torch.Tensor:
    """MAE's masks (3/4 of the patches of each image), made as the data loader makes them."""
    n = grid * grid
    order = torch.rand(batch, n, device=device).argsort(1)
    return torch.zeros(batch, n, dtype=torch.bool, device=device).scatter_(1, order[:, int(n * 0.25):], True)


def bert_config(impl: str, size: str):
    from transformers import BertConfig

    dim, depth, heads = SIZES[size]
    return BertConfig(vocab_size=TEXT_VOCAB, hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                      intermediate_size=4 * dim, attn_implementation=impl.split("_")[1])


def build_mlm(impl: str, size: str, image_size: int) -> tuple[torch.nn.Module, callable]:
    """mlm mode: (trainable model, (ids, mask, labels) -> loss)."""
    import torch.nn.functional as F

    if impl.startswith("ours"):
        from models import create_model
        from models.modes import TextMLM

        task = TextMLM(create_model(f"vlmo_{size}_patch16", img_size=image_size, vocab_size=TEXT_VOCAB,
                                    max_text_len=TEXT_LENGTH, drop_path_rate=0.0))
        return task, lambda ids, mask, labels: task({"mlm_input_ids": ids, "attention_mask": mask,
                                                     "mlm_labels": labels})["loss"]
    from transformers import BertForMaskedLM

    model = BertForMaskedLM(bert_config(impl, size))

    def step(ids, mask, labels):
        logits = model(input_ids=ids, attention_mask=mask).logits  # [B, L, V], every position, as HF does
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    return model, step


def build_itc(impl: str, size: str, image_size: int) -> tuple[torch.nn.Module, callable]:
    """itc mode: (trainable model, (images, ids, mask) -> loss); the reference is two HF towers."""
    from models.modes.image_text_itc import contrastive_loss

    if impl.startswith("ours"):
        from models import create_model
        from models.modes import ImageTextITC

        task = ImageTextITC(create_model(f"vlmo_{size}_patch16", img_size=image_size, vocab_size=TEXT_VOCAB,
                                         max_text_len=TEXT_LENGTH, drop_path_rate=0.0))
        return task, lambda images, ids, mask: task({"image": images, "input_ids": ids, "attention_mask": mask})["loss"]
    from transformers import BeitModel, BertModel

    from models.heads import ITCHead

    dim = SIZES[size][0]
    towers = torch.nn.ModuleDict({"image": BeitModel(hf_config(impl, size, image_size), add_pooling_layer=False),
                                  "text": BertModel(bert_config(impl, size), add_pooling_layer=False),
                                  "head": ITCHead(dim)})

    def step(images, ids, mask):
        head = towers["head"]
        image = head.embed_image(towers["image"](pixel_values=images).last_hidden_state[:, 0])
        text = head.embed_text(towers["text"](input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])
        return contrastive_loss(image, text, head.scale(), lambda x: x)["loss_itc"]

    return towers, step


def text_batch(b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Captions of varied length (padded to TEXT_LENGTH) and 15% of their tokens as MLM targets."""
    ids = torch.randint(1000, TEXT_VOCAB, (b, TEXT_LENGTH), device=device)
    lengths = torch.randint(TEXT_LENGTH // 2, TEXT_LENGTH + 1, (b,), device=device)
    mask = (torch.arange(TEXT_LENGTH, device=device)[None] < lengths[:, None]).long()
    labels = torch.full_like(ids, -100)
    chosen = (torch.rand(ids.shape, device=device) < 0.15) & mask.bool()
    labels[chosen] = ids[chosen]
    return ids, mask, labels


def workload(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """(the model, a closure computing the loss of one step) for --mode and --worker."""
    b, size = args.batch_size, args.image_size
    images = torch.randn(b, 3, size, size, device=device)
    if args.mode == "mim":
        model, loss_fn = build_mim(args.worker, args.size, size)
        token_images = torch.rand(b, 3, size // 2, size // 2, device=device)
        grid = size // 16
        mask = torch.zeros(b, grid * grid, dtype=torch.bool, device=device)
        mask[:, : round(grid * grid * 75 / 196)] = True  # BEiT's 75 of 196
        mask = mask[:, torch.randperm(grid * grid, device=device)]
        forward = lambda: loss_fn(images, token_images, mask)  # noqa: E731
    elif args.mode == "mae":
        model, loss_fn = build_mae(args.worker, args.size, size)
        mask = mae_masks(b, size // 16, device)
        forward = lambda: loss_fn(images, mask)  # noqa: E731
    elif args.mode in ("mlm", "itc"):
        model, loss_fn = (build_mlm if args.mode == "mlm" else build_itc)(args.worker, args.size, size)
        ids, attention, labels = text_batch(b, device)
        forward = ((lambda: loss_fn(ids, attention, labels)) if args.mode == "mlm" else  # noqa: E731
                   (lambda: loss_fn(images, ids, attention)))
    else:
        model, features = build(args.worker, args.size, size)
        forward = lambda: features(images).float().pow(2).mean()  # noqa: E731
    return model, forward


def worker(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    device = torch.device(args.device)
    bf16_row = args.worker in ("ours_bf16", "ours_bf16_compiled")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get("bf16" if bf16_row else args.amp)
    model, forward = workload(args, device)
    model.to(device).train()
    if args.worker.endswith("_compiled"):  # what training's --compile compiles: each block and the visual tokenizer
        from models.visual_tokenizers import DalleTokenizer
        from training.compilation import compile_modules

        backbone = next(m for m in model.modules() if isinstance(getattr(m, "blocks", None), torch.nn.ModuleList))
        compile_modules(backbone.blocks, next((m for m in model.modules() if isinstance(m, DalleTokenizer)), None))
    # --adamw_impl is one of our flags (training's --adamw_impl): the references keep torch's default
    adamw_impl = args.adamw_impl if args.worker.startswith("ours") else "auto"
    optimizer = (torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6,
                                   **adamw_options(adamw_impl)) if args.mode in TRAINING_MODES else None)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = forward()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    step = sorted(times)[len(times) // 2]
    print(json.dumps({"impl": args.worker, "step_s": step, "images_per_s": args.batch_size / step, "peak_mb": peak_mb}))


def imagenet_like_paths(n: int, classes: int = 21841) -> list[str]:
    """`n` relative paths laid out as ImageNet-22k's (one folder per WordNet id)."""
    return [f"n{(i * 7919) % classes:08d}/n{(i * 7919) % classes:08d}_{i}.JPEG" for i in range(n)]


def index_benchmark(counts: list[int], scan_files: int) -> None:
    """Indexing and splitting generated path lists (what a run does before its first step), and the
    folder walk itself on `scan_files` real (empty) files."""
    import shutil
    import tempfile

    from custom_datasets.file_index import FileTable, scan

    print("| paths | index + split (s) | per million (s) | table MiB |\n| --- | --- | --- | --- |")
    for n in counts:
        paths = imagenet_like_paths(n)
        start = time.perf_counter()
        table = FileTable(paths, held_out_fraction=0.05)
        took = time.perf_counter() - start
        print(f"| {n:,} | {took:.1f} | {took / n * 1e6:.2f} | {(table.blob.nbytes + table.offsets.nbytes) / 2**20:.0f} |")
        del paths, table
    if scan_files:
        root = Path(tempfile.mkdtemp())
        for i, rel in enumerate(imagenet_like_paths(scan_files, classes=100)):
            (root / rel).parent.mkdir(exist_ok=True)
            (root / rel).touch()
        start = time.perf_counter()
        found = scan(root)
        took = time.perf_counter() - start
        start = time.perf_counter()
        old = sorted(p for p in root.rglob("*") if p.is_file())  # the walk it replaced
        old_took = time.perf_counter() - start
        shutil.rmtree(root)
        print(f"\nwalking {len(found):,} files: scandir {took:.2f}s, Path.rglob + is_file {old_took:.2f}s "
              f"({len(old):,} found)")


def interleaved_timings(calls: dict[str, Callable[[], object]], rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds of each call, `steps` in a row per call and round, the calls taking turns each round
    (in this process: for kernels of the same work, where a shared load must hit all alike)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(steps):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return times


def adamw_benchmark(size: str, rounds: int, steps: int) -> None:
    """One AdamW step over a backbone's parameters, per implementation (for-loop, foreach, fused),
    interleaved in rounds, and the largest weight difference to the for-loop after the same steps."""
    from models import create_model
    models = {impl: create_model(f"vlmo_{size}_patch16") for impl in ADAMW_IMPLS}
    for model in models.values():
        model.load_state_dict(models["for_loop"].state_dict())
        for i, param in enumerate(model.parameters()):
            param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(i)) * 1e-3
    optims = {impl: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.05, **adamw_options(impl))
              for impl, m in models.items()}
    times = interleaved_timings({impl: optim.step for impl, optim in optims.items()}, rounds, steps)
    n = sum(p.numel() for p in models["for_loop"].parameters())
    reference = dict(models["for_loop"].named_parameters())
    print(f"AdamW step over {size} ({n / 1e6:.1f}M parameters), {rounds} rounds of {steps} steps, "
          f"CPU x{torch.get_num_threads()} threads")
    print("| implementation | step (ms) | speed vs for_loop | max weight diff to for_loop |\n| --- | --- | --- | --- |")
    base = statistics.median(times["for_loop"])
    for impl in ADAMW_IMPLS:
        diff = max((p - reference[name]).abs().max().item() for name, p in models[impl].named_parameters())
        median = statistics.median(times[impl])
        print(f"| {impl} | {median * 1e3:.1f} | {base / median:.2f}x | {diff:.1e} |")


def imagenet_like_jpegs(folder: Path, count: int, size: tuple[int, int] = (500, 375)) -> list[Path]:
    """JPEGs of ImageNet's typical size and quality with photo-like content (smooth gradients, edges
    and noise, which is what makes a JPEG slow or fast to decode)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(count):
        base = np.stack([np.sin(xx / rng.uniform(20, 80) + c) * np.cos(yy / rng.uniform(20, 80) - c) for c in range(3)], -1)
        pixels = np.clip(127 + 90 * base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        paths.append(folder / f"{i:05d}.JPEG")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def per_image_seconds(paths: list[Path], work) -> float:
    start = time.perf_counter()
    for path in paths:
        work(path)
    return (time.perf_counter() - start) / len(paths)


def half_size_decode(path: Path):
    """PIL decodes the JPEG at 1/2 scale (DCT scaling)."""
    from PIL import Image

    with Image.open(path) as img:
        img.draft("RGB", (img.width // 2, img.height // 2))
        return img.convert("RGB")


def jitter_and_flip(transform, image):
    """The whole-image part of the two views: colour jitter and flip, with their random draws."""
    return transform.whole_image_part(image, transform.plan(image.size))


def loader_stages(count: int, image_size: int, batch_size: int, jpeg_folder: str | None,
                  jpeg_size: tuple[int, int] = (500, 375)) -> dict:
    """Seconds per image of each stage, and a `source` line saying what was timed."""
    import tempfile

    from custom_datasets.image_io import PLAN_KEY, open_rgb
    from custom_datasets.masking import BlockwiseMaskGenerator, default_num_mask_patches
    from custom_datasets.transforms import TwoViewConfig, TwoViewTransform

    with tempfile.TemporaryDirectory() as tmp:
        if jpeg_folder:
            paths = sorted(p for p in Path(jpeg_folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:count]
            if not paths:
                raise SystemExit(f"--jpeg_folder {jpeg_folder} holds no .jpg/.jpeg files")
        else:
            paths = imagenet_like_jpegs(Path(tmp), count, jpeg_size)
        images = [open_rgb(p) for p in paths]
        transform = TwoViewTransform(TwoViewConfig(image_size=image_size, second_image_size=image_size // 2))
        grid = image_size // 16
        masks = BlockwiseMaskGenerator((grid, grid), default_num_mask_patches(grid * grid))

        reduced = []

        def as_the_loader_reads(path):  # the crop planned first, the JPEG decoded at the size it allows
            image = open_rgb(path, transform.draft_planner)
            reduced.append(image.size != image.info[PLAN_KEY][1])
            return transform(image)

        views = [transform(img) for img in images[:batch_size]]
        samples = [{"image": v, "tokenizer_image": t, "mask": torch.from_numpy(masks())} for v, t in views]
        stages = {
            "decode (PIL, full size)": per_image_seconds(paths, open_rgb),
            "decode at 1/2 scale (PIL draft)": per_image_seconds(paths, half_size_decode),
            f"two views ({image_size} + {image_size // 2} px crop, jitter, flip)": per_image_seconds(
                images, transform),
            "  of which colour jitter + flip of the whole image": per_image_seconds(images, partial(jitter_and_flip,
                                                                                                   transform)),
            "block mask": per_image_seconds(range(len(paths)), lambda _: masks()),
            f"collate (batch {batch_size}, per image)": per_image_seconds(
                range(8), lambda _: torch.utils.data.default_collate(samples)) / batch_size,
            "decode + two views as the loader reads (draft where the crop allows)": per_image_seconds(
                paths, as_the_loader_reads),
        }
        stages["reduced"] = sum(reduced) / len(reduced)
        stages["shards"] = shard_rows(paths)
    n = len(images)
    stages["source"] = (f"{n} JPEGs from {jpeg_folder} (mean {sum(i.width for i in images) / n:.0f}x"
                        f"{sum(i.height for i in images) / n:.0f})" if jpeg_folder
                        else f"{n} generated {jpeg_size[0]}x{jpeg_size[1]} JPEGs (quality 90)")
    return stages


def write_shard(paths: list[Path], shard: Path) -> None:
    """The JPEGs as one img2dataset-layout tar shard (KEY.jpg + KEY.txt)."""
    import io
    import tarfile

    with tarfile.open(shard, "w") as tar:
        for i, path in enumerate(paths):
            tar.add(path, arcname=f"{i:09d}.jpg")
            caption = tarfile.TarInfo(f"{i:09d}.txt")
            caption.size = len(b"a photo")
            tar.addfile(caption, io.BytesIO(b"a photo"))


def _seconds_per_sample(source, warm: bool = False) -> float:
    """`warm`: read the shard once untimed first (fsspec's imports and session: ~0.15 s once per
    worker, not per shard)."""
    from custom_datasets.webdataset_pairs import read_shard

    if warm:
        sum(1 for _ in read_shard(source))
    start = time.perf_counter()
    read = sum(1 for sample in read_shard(source) if sample is not None)
    return (time.perf_counter() - start) / max(read, 1)


def shard_rows(paths: list[Path]) -> dict[str, float]:
    """Seconds per sample reading and decoding the JPEGs from a tar shard: a local file, the stream
    of `pipe:cat`, an HTTP server on the loopback interface (through `pipe:curl` and through
    fsspec), and an S3-compatible server on loopback (moto, through fsspec/s3fs; when installed)."""
    import importlib.util
    import tempfile

    from experiments.loopback_server import start_loopback_server

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "00000.tar"
        write_shard(paths, shard)
        for name, source in (("local tar shard", shard), ("pipe:cat of the shard", f"pipe:cat {shard}")):
            rows[f"read + decode from a {name}"] = _seconds_per_sample(source)
        server, port = start_loopback_server(["-m", "http.server", "{port}", "--bind", "127.0.0.1"], tmp)
        try:
            url = f"http://127.0.0.1:{port}/00000.tar"
            rows["read + decode over HTTP from a loopback server (pipe:curl)"] = _seconds_per_sample(f"pipe:curl -sf {url}")
            rows["read + decode over HTTP from a loopback server (fsspec)"] = _seconds_per_sample(url, warm=True)
        finally:
            server.terminate()
            server.wait(timeout=10)
        if importlib.util.find_spec("moto") and importlib.util.find_spec("s3fs"):
            rows["read + decode from a loopback S3 server (moto; fsspec/s3fs)"] = _s3_row(shard, tmp)
    return rows


def _s3_row(shard: Path, tmp: str) -> float:
    import boto3

    from experiments.loopback_server import start_loopback_server

    env = {"AWS_ACCESS_KEY_ID": "benchmark", "AWS_SECRET_ACCESS_KEY": "benchmark", "AWS_DEFAULT_REGION": "us-east-1"}
    server, port = start_loopback_server(["-m", "moto.server", "-H", "127.0.0.1", "-p", "{port}"], tmp)
    saved = dict(os.environ)
    os.environ.update(env, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket="benchmark")
        client.upload_file(str(shard), "benchmark", "00000.tar")
        return _seconds_per_sample("s3://benchmark/00000.tar", warm=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.terminate()
        server.wait(timeout=10)


def loader_benchmark(count: int, image_size: int, batch_size: int, target_rate: float,
                     jpeg_folder: str | None = None, jpeg_size: tuple[int, int] = (500, 375)) -> None:
    """What one DataLoader worker spends per image on each stage of the image-MIM pipeline, and how
    many workers a device consuming `target_rate` images/s needs (on generated JPEGs, or on the
    first `count` JPEGs under `jpeg_folder`)."""
    import math

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs on one thread
    try:
        stages = loader_stages(count, image_size, batch_size, jpeg_folder, jpeg_size)
    finally:
        torch.set_num_threads(threads)  # this process's other work keeps its threads (and its numbers)
    print(f"image-MIM input pipeline, {stages.pop('source')}, one worker (1 thread)")
    reduced, shards = stages.pop("reduced"), stages.pop("shards")
    as_read = stages.pop("decode + two views as the loader reads (draft where the crop allows)")
    mask_and_collate = sum(v for k, v in stages.items() if k.startswith(("block mask", "collate")))
    full = sum(v for k, v in stages.items() if "draft" not in k and "of which" not in k)
    print("| stage | ms per image | images/s |\n| --- | --- | --- |")
    for name, seconds in stages.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {1 / seconds:.0f} |")
    print(f"| **whole sample (full-size decode)** | {full * 1e3:.2f} | {1 / full:.0f} |")
    loader = as_read + mask_and_collate
    print(f"| **whole sample as the loader reads it** (decode at the reduced size the crop allows: "
          f"{100 * reduced:.0f}% of crops) | {loader * 1e3:.2f} | {1 / loader:.0f} |")
    print(f"\na device consuming {target_rate:,.0f} images/s needs {math.ceil(target_rate * loader):d} such workers "
          f"(one core each; {math.ceil(target_rate * full):d} decoding every image at full size)")
    print("\nstreamed from tar shards instead of files (the same JPEGs; full-size decode, one worker):\n"
          "| source | ms per image | images/s | workers for the device |\n| --- | --- | --- | --- |")
    for name, seconds in shards.items():
        per_sample = seconds + full - stages["decode (PIL, full size)"]  # the views, mask and collate as above
        print(f"| {name} | {seconds * 1e3:.2f} | {1 / seconds:.0f} | {math.ceil(target_rate * per_sample):d} |")


EPOCH_RUN = ["--model", "vlmo_tiny_patch16", "--image_size", "64", "--patch_size", "8", "--data_path", "synthetic",
             "--synthetic_render_size", "64", "--synthetic_val_size", "64", "--batch_size", "64", "--blr", "1.5e-3",
             "--min_crop_scale", "0.5", "--drop_path", "0", "--no_pictures", "--save_per_epochs", "1000"]
EPOCH_MODES = {"image_mim": ["--visual_vocab_size", "128", "--second_image_size", "32", "--tokenizer_fit_images", "500"],
               "image_mae": []}


def epoch_images_per_second(mode: str, images: int, epochs: int, workers: int, out: Path) -> float:
    """A training run of `mode` in its own process; the last epoch's images/s as its progress line
    says (training steps with their data loading and, for MIM, the tokenizer; evaluation apart)."""
    import re
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, str(Path(__file__).resolve().parents[1] / "main_pretrain_cook.py"), *EPOCH_RUN,
            *EPOCH_MODES[mode], "--exp_name", mode, "--synthetic_train_size", str(images), "--epochs", str(epochs),
            "--num_workers", str(workers), "--print_freq", "100000", "--output_dir", str(out)]
    run = subprocess.run(argv, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{mode}: {run.stderr.strip().splitlines()[-1:]}")
    rates = re.findall(rf"Epoch \[{epochs - 1}\] \[\d+/\d+\].* ([\d.]+) samples/s", run.stdout)
    return float(rates[-1])


def epochs_benchmark(images: int, epochs: int, workers: int, rounds: int) -> dict[str, float]:
    """image_mae against image_mim epochs, interleaved rounds; median images/s of each."""
    import tempfile

    rates: dict[str, list[float]] = {mode: [] for mode in EPOCH_MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for mode in EPOCH_MODES:
                rates[mode].append(epoch_images_per_second(mode, images, epochs, workers, Path(tmp) / mode))
    medians = {mode: statistics.median(r) for mode, r in rates.items()}
    print(f"\ntraining epochs, tiny model at 64 px (64 patches), {images} synthetic scenes, batch 64, {workers} loader "
          f"workers, {cpu_description()}; epoch {epochs - 1} of each run, {rounds} interleaved rounds\n"
          f"| mode | images/s (median) | runs | vs image_mim |\n| --- | --- | --- | --- |")
    for mode, value in medians.items():
        print(f"| {mode} | {value:.1f} | {', '.join(f'{r:.0f}' for r in rates[mode])} | "
              f"{value / medians['image_mim']:.2f}x |")
    return medians


def tokenizer_benchmark(batch_size: int, image_size: int, rounds: int, steps: int) -> None:
    """The visual tokenizers on photo-like views: the DALL-E encoder (random weights) in fp32,
    channels-last, bf16 autocast and training's `--compile`, and a fitted k-means tokenizer in fp32
    (as training runs both, outside autocast) and under bf16 autocast; time per batch and how many
    token ids agree with each tokenizer's fp32 ids."""
    import copy
    import tempfile

    from custom_datasets.image_io import open_rgb
    from custom_datasets.transforms import TwoViewConfig, TwoViewTransform
    from models.visual_tokenizers.dall_e import DalleEncoder, map_pixels
    from models.visual_tokenizers.kmeans import KMeansTokenizer, fit_kmeans, patch_vectors

    torch.manual_seed(0)
    transform = TwoViewTransform(TwoViewConfig(image_size=image_size, second_image_size=image_size // 2))
    fit_count = max(KMEANS_VOCAB * 2 // (image_size // 16) ** 2 + 1, batch_size)  # enough patches to fit on
    with tempfile.TemporaryDirectory() as tmp:
        views = torch.stack([transform(open_rgb(p))[1] for p in imagenet_like_jpegs(Path(tmp), batch_size + fit_count)])
    views, fit_views = views[:batch_size], views[batch_size:]
    pixels = map_pixels(views)
    grid = image_size // 16
    kmeans = KMeansTokenizer(fit_kmeans(patch_vectors(fit_views, grid).flatten(0, 1), KMEANS_VOCAB, iters=10), grid)
    encoder = DalleEncoder().eval().requires_grad_(False)
    # what training's --compile does to the encoder it keeps channels-last (its own copy: the eager
    # variants switch the other's memory format back and forth)
    compiled = torch.compile(copy.deepcopy(encoder).to(memory_format=torch.channels_last))
    dalle = {"fp32": (torch.contiguous_format, None, False), "fp32 channels-last": (torch.channels_last, None, False),
             "bf16 autocast": (torch.contiguous_format, torch.bfloat16, False),
             "bf16 channels-last": (torch.channels_last, torch.bfloat16, False),
             "fp32 channels-last, --compile": (torch.channels_last, None, True),
             "bf16 channels-last, --compile": (torch.channels_last, torch.bfloat16, True)}

    @torch.no_grad()
    def dalle_ids(fmt, dtype, compile_it):
        model = compiled if compile_it else encoder.to(memory_format=fmt)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return model(pixels.to(memory_format=fmt)).float().argmax(1)

    def kmeans_ids(dtype):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return kmeans.get_codebook_indices(views)

    calls = {("DALL-E", name): partial(dalle_ids, *variant) for name, variant in dalle.items()}
    calls |= {("k-means", f"({KMEANS_VOCAB} tokens) fp32"): partial(kmeans_ids, None),
              ("k-means", f"({KMEANS_VOCAB} tokens) bf16 autocast"): partial(kmeans_ids, torch.bfloat16)}
    for call in calls.values():  # compiles (not timed)
        call()
    fp32_key = {kind: (kind, name) for kind, name in reversed(list(calls))}  # each tokenizer's first row: fp32
    references = {kind: calls[key]() for kind, key in fp32_key.items()}
    times = interleaved_timings(calls, rounds, steps)
    print(f"visual tokenizers, batch {batch_size} at {image_size // 2} px, {rounds} rounds of {steps}, "
          f"CPU x{torch.get_num_threads()} threads")
    print("| tokenizer | variant | s per batch | speed vs its fp32 | ids equal to its fp32 |\n"
          "| --- | --- | --- | --- | --- |")
    for (kind, name), call in calls.items():
        base = statistics.median(times[fp32_key[kind]])
        agree = (call() == references[kind]).float().mean().item()
        median = statistics.median(times[(kind, name)])
        print(f"| {kind} | {name} | {median:.4f} | {base / median:.2f}x | {100 * agree:.2f}% |")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["encode", "mim", "mae", "epochs", "mlm", "itc", "index", "adamw", "loader",
                                      "tokenizer"], default="encode")
    p.add_argument("--num_images", type=int, default=200, help="loader mode: generated JPEGs; epochs mode: "
                   "synthetic training scenes")
    p.add_argument("--num_workers", type=int, default=2, help="epochs mode: DataLoader workers of each run")
    p.add_argument("--target_rate", type=float, default=2500.0, help="loader mode: images/s one device consumes")
    p.add_argument("--jpeg_folder", help="loader mode: time these JPEGs instead of generated ones")
    p.add_argument("--jpeg_size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"),
                   help="loader mode: size of the generated JPEGs (ImageNet's typical size by default)")
    p.add_argument("--num_paths", type=int, nargs="+", default=[1_000_000, 14_000_000],
                   help="index mode: generated path-list sizes")
    p.add_argument("--scan_files", type=int, default=100_000, help="index mode: real files to walk (0: skip)")
    p.add_argument("--size", choices=sorted(SIZES), default="base")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds, one process per implementation each")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--adamw_impl", choices=("auto",) + ADAMW_IMPLS, default="auto",
                   help="training modes: our rows' AdamW kernel, as training's --adamw_impl (the references keep "
                        "torch's default)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=None,
                   help="default: ours, hf_sdpa, hf_eager and (encode) timm; ours_bf16 and ours_*compiled on request")
    p.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--sweep", action="store_true", help="encode/mim: our step at every --sweep_image_sizes x "
                   "--sweep_batch_sizes, one process each (the cost curve)")
    p.add_argument("--sweep_image_sizes", type=int, nargs="+", default=[224, 384])
    p.add_argument("--sweep_batch_sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if args.mode == "index":
        return index_benchmark(args.num_paths, args.scan_files)
    if args.mode == "adamw":
        return adamw_benchmark(args.size, args.rounds, args.steps)
    if args.mode == "tokenizer":
        return tokenizer_benchmark(args.batch_size, args.image_size, args.rounds, args.steps)
    if args.mode == "epochs":
        return epochs_benchmark(args.num_images, args.steps, args.num_workers, args.rounds)
    if args.mode == "loader":
        return loader_benchmark(args.num_images, args.image_size, args.batch_size, args.target_rate, args.jpeg_folder,
                                tuple(args.jpeg_size))
    if args.worker:
        return worker(args)
    if args.sweep:
        return sweep(args, [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--sweep"])
    args.impls = args.impls or [i for i in DEFAULT_IMPLS if i in (MIM_IMPLS if args.mode in TRAINING_MODES else IMPLS)]
    if args.mode in TRAINING_MODES and "timm" in args.impls:
        p.error(f"--mode {args.mode} compares with HF models (timm has no MIM head, no text tower); drop timm")
    rows = interleaved_rounds(args.impls, args.rounds, argv if argv is not None else sys.argv[1:])
    hw = torch.cuda.get_device_name() if args.device == "cuda" else cpu_description()
    what = {"mim": "MIM training step (DALL-E tokenize + forward + backward + AdamW)",
            "mlm": f"text MLM training step ({TEXT_LENGTH} tokens, 15% predicted; forward + backward + AdamW)",
            "itc": f"ITC training step (image + {TEXT_LENGTH}-token text, InfoNCE; forward + backward + AdamW)",
            "mae": "MAE training step (the visible quarter encoded, decoder, normalised-pixel loss; backward + AdamW)"}.get(
        args.mode, "encode_image forward+backward")
    adamw = f", our AdamW {args.adamw_impl}" if args.mode in TRAINING_MODES and args.adamw_impl != "auto" else ""
    print(f"\n{what}, {args.size} {args.image_size}px, batch {args.batch_size}, amp={args.amp}, {hw}{adamw}; "
          f"{args.rounds} interleaved rounds of {args.steps} steps")
    print_rows(rows, "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB",
               {"mlm": "captions/s", "itc": "pairs/s"}.get(args.mode, "images/s"))


def cpu_description() -> str:
    """Threads, whether bf16 is native (the rows under bf16 depend on it), and a oneDNN cap that
    emulates a CPU without it (ONEDNN_MAX_CPU_ISA=AVX2)."""
    import os

    from training.precision import cpu_speedup, native_support

    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (f"CPU x{torch.get_num_threads()} threads ({native_support('bf16')}"
            + (f"; oneDNN capped at {cap}" if cap else "") + f"; a bf16 linear layer runs {cpu_speedup('bf16'):.2f}x "
            f"as fast as fp32)")


def sweep(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    """Our step at every image size x batch size, one process each: how time and peak memory grow
    (the cost curve); a size that fails (out of memory) ends its row of batch sizes."""
    rows = []
    for size in args.sweep_image_sizes:
        for batch in args.sweep_batch_sizes:
            result = run_worker("ours", argv + ["--image_size", str(size), "--batch_size", str(batch)])
            rows.append({"image_size": size, "batch": batch, **result})
            if "error" in result:
                break
    peak = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    print(f"\n{args.mode} cost curve, ours, {args.size}, amp={args.amp}, {args.device}; median of {args.steps} steps\n"
          f"| image size | batch | step (s) | images/s | {peak} |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        cells = (f"error: {r['error']} | | |" if "error" in r else
                 f"{r['step_s']:.3f} | {r['images_per_s']:.1f} | {r['peak_mb']:.0f} |")
        print(f"| {r['image_size']} | {r['batch']} | {cells}")
    return rows


def run_worker(impl: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--worker", impl, "--impls", impl]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"impl": impl, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved_rounds(impls: list[str], rounds: int, argv: list[str]) -> list[dict]:
    """Each implementation once per round, in turn; per implementation the median over rounds (of each
    process's median step), the spread and the worst peak memory; the first error ends its row."""
    runs: dict[str, list[dict]] = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            if not (runs[impl] and "error" in runs[impl][-1]):
                runs[impl].append(run_worker(impl, argv))
    rows = []
    for impl, results in runs.items():
        if "error" in results[-1]:
            rows.append(results[-1])
            continue
        steps = sorted(r["step_s"] for r in results)
        rows.append({"impl": impl, "step_s": statistics.median(steps), "min_s": steps[0], "max_s": steps[-1],
                     "images_per_s": statistics.median(r["images_per_s"] for r in results),
                     "peak_mb": max(r["peak_mb"] for r in results)})
    return rows


def print_rows(rows: list[dict], peak: str, unit: str = "images/s") -> None:
    reference = next((r for r in rows if r["impl"] == REFERENCE and "error" not in r), None)
    print(f"| implementation | step (s) | spread (s) | {unit} | {peak} | speed vs {REFERENCE} |\n"
          f"| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | error: {r['error']} | | | | |")
            continue
        ratio = f"{reference['step_s'] / r['step_s']:.2f}x" if reference else "n/a"
        print(f"| {r['impl']} | {r['step_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | {r['images_per_s']:.1f} | "
              f"{r['peak_mb']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
