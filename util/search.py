"""Search images with text, or captions with an image, using a checkpoint's contrastive (ITC) head.
The image folder is embedded once and cached; later queries only embed the text.

    python util/search.py --checkpoint outputs/s3_itc/merged_model.safetensors --images photos/ \\
        --query "a dog running on the beach" --query "two children" --topk 5
    python util/search.py --checkpoint CKPT --image_query photo.jpg --captions captions.json --topk 5
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.checkpoint_io import atomic_write, load_safetensors_file, save_safetensors  # noqa: E402
from common.errors import UserError, cli_entry  # noqa: E402
from custom_datasets.classification_data import recorded_transform  # noqa: E402
from custom_datasets.image_folder import list_image_files  # noqa: E402
from custom_datasets.image_io import open_rgb  # noqa: E402
from custom_datasets.text_collate import tokenize_captions  # noqa: E402
from custom_datasets.text_data import CaptionCorpus  # noqa: E402
from serving import open_servable  # noqa: E402


class Embedder:
    """Images and texts -> normalised ITC embeddings of a checkpoint or an ONNX export."""

    def __init__(self, source: str, tokenizer: str | None, device: torch.device) -> None:
        self.servable = open_servable(source).to(device)
        if not self.servable.has_itc:
            raise UserError(f"{source} has no image-text (ITC) head; use a checkpoint of an image_text_itc or "
                            f"compound_pretrain stage (or its merged_model.safetensors), or its ONNX export")
        self.tokenizer = self.servable.text_tokenizer(tokenizer)
        if self.tokenizer is None:
            raise UserError(f"{source} does not record its text tokenizer; pass --tokenizer")
        self.max_len = self.servable.max_text_len
        self.transform = recorded_transform(self.servable.preprocessing)  # the run's held-out view

    @torch.no_grad()
    def images(self, paths: list[Path], batch_size: int = 32) -> tuple[torch.Tensor, list[Path], list[Path]]:
        embeddings, kept, failed = [], [], []
        for start in range(0, len(paths), batch_size):
            tensors = []
            for path in paths[start:start + batch_size]:
                try:
                    tensors.append(self.transform(open_rgb(path)))
                    kept.append(path)
                except Exception:  # noqa: BLE001 - unreadable images are reported and left out
                    failed.append(path)
            if tensors:
                embeddings.append(self.servable.embed_images(torch.stack(tensors)))
        if not embeddings:
            raise UserError("none of the images could be read")
        return torch.cat(embeddings), kept, failed

    @torch.no_grad()
    def texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            enc = tokenize_captions(self.tokenizer, texts[start:start + batch_size], self.max_len)
            out.append(self.servable.embed_texts(enc["input_ids"], enc["attention_mask"]))
        return torch.cat(out)


def file_state(path: Path) -> list:
    """What changes when a file is replaced or edited in place: its size and modification time."""
    info = path.stat()
    return [str(path.resolve()), info.st_size, info.st_mtime_ns]


def cached_image_embeddings(embedder: Embedder, checkpoint: str, folder: Path, cache_dir: Path):
    """Embeddings of every readable image under `folder`, recomputed when the checkpoint, the file
    list or any file (replaced or edited in place: its size or modification time) changes."""
    files = list_image_files(folder, "--images")
    key = hashlib.sha1(json.dumps([file_state(Path(checkpoint))] + [file_state(f) for f in files]).encode()).hexdigest()[:16]
    cache = cache_dir / f"{key}.safetensors"
    index = cache.with_suffix(".json")
    if cache.is_file() and index.is_file():
        return load_safetensors_file(cache)[0]["embeddings"], [Path(p) for p in json.loads(index.read_text())], []
    embeddings, kept, failed = embedder.images(files)
    text = json.dumps([str(p) for p in kept])
    atomic_write(index, lambda tmp: Path(tmp).write_text(text))  # the index first: an embedding file alone is unused
    save_safetensors(cache, {"embeddings": embeddings})
    return embeddings, kept, failed


@cli_entry
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", help="folder of images to search (text -> images)")
    p.add_argument("--query", action="append", default=[], help="a text query (repeatable)")
    p.add_argument("--image_query", help="an image (image -> captions)")
    p.add_argument("--captions", help="captions to search: .json / .jsonl / .txt (image -> captions)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--tokenizer", default=None, help="default: the one recorded in the checkpoint")
    p.add_argument("--cache_dir", default="outputs/search_cache")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.topk < 1:
        raise UserError(f"--topk {args.topk}: list at least 1 result per query")
    if not ((args.images and args.query) or (args.image_query and args.captions)):
        raise UserError("give --images DIR with --query TEXT (text -> images), or --image_query IMAGE with "
                        "--captions FILE (image -> captions)")
    embedder = Embedder(args.checkpoint, args.tokenizer, torch.device(args.device))
    results: dict = {}
    if args.images and args.query:
        bank, paths, failed = cached_image_embeddings(embedder, args.checkpoint, Path(args.images), Path(args.cache_dir))
        for path in failed:
            print(f"{path}: unreadable, left out")
        scores = embedder.texts(args.query) @ bank.t()  # [Q, I]
        for query, row in zip(args.query, scores):
            top = row.topk(min(args.topk, len(paths)))
            results[query] = [{"image": str(paths[i]), "score": round(float(s), 4)} for s, i in zip(top.values, top.indices)]
            print(f"{query!r}: " + ", ".join(f"{Path(r['image']).name} ({r['score']:.3f})" for r in results[query]))
    if args.image_query and args.captions:
        image, _, failed = embedder.images([Path(args.image_query)])
        corpus = list(CaptionCorpus([args.captions]).texts())
        scores = (image @ embedder.texts(corpus).t())[0]  # [T]
        top = scores.topk(min(args.topk, len(corpus)))
        results[args.image_query] = [{"caption": corpus[i], "score": round(float(s), 4)} for s, i in zip(top.values, top.indices)]
        for r in results[args.image_query]:
            print(f"{r['score']:.3f}  {r['caption']}")
    return results


if __name__ == "__main__":
    main()
