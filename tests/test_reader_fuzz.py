"""Property-based fuzzing of every input reader: images, `.npy` tiles, caption and pair files,
labelled texts, WebDataset shards, checkpoints and DALL-E pickles. Whatever the bytes, a reader
either reads them, skips the sample (None, counted by the collate), or stops with one sentence
(`UserError`); never another exception. Derandomized, so the same cases run every time."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from common.errors import UserError

CASES = 150  # per reader
RUN = settings(max_examples=CASES, derandomize=True, deadline=None, database=None,
               suppress_health_check=list(HealthCheck))
COUNTED: dict[str, int] = {}


def count(name: str) -> None:
    COUNTED[name] = COUNTED.get(name, 0) + 1


def sample_bytes(kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (10, 200, 30)).save(buffer, format=kind)
    return buffer.getvalue()


def mutated(data: bytes):
    """Valid bytes, truncated or with bytes overwritten."""
    return st.tuples(st.integers(0, len(data)), st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)),
                                                          max_size=8)).map(lambda t: _mutate(data, *t))


def _mutate(data: bytes, cut: int, flips) -> bytes:
    out = bytearray(data[:cut] if cut else data)
    for at, value in flips:
        if at < len(out):
            out[at] = value
    return bytes(out)


def only_user_errors(call):
    try:
        return call()
    except UserError:
        return "refused"


@RUN
@given(st.one_of(st.binary(max_size=300), mutated(sample_bytes("PNG")), mutated(sample_bytes("JPEG"))))
def test_images(tmp_path_factory, data):
    from custom_datasets.image_folder import ImageFiles

    folder = tmp_path_factory.mktemp("img")
    Image.new("RGB", (24, 16)).save(folder / "good.png")
    (folder / "fuzz.jpg").write_bytes(data)
    dataset = ImageFiles(folder, lambda image, key=None: {"size": image.size})
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample is None or sample["size"][0] > 0
    count("images")


ARRAYS = st.tuples(
    st.lists(st.integers(0, 40), min_size=0, max_size=4),
    st.sampled_from(["uint8", "uint16", "int32", "float32", "float64", "bool", "complex64"]),
    st.sampled_from([0.0, np.nan, np.inf, -np.inf, 1e30]))


@RUN
@given(ARRAYS, st.one_of(st.none(), st.lists(st.integers(0, 6), min_size=3, max_size=3)))
def test_tiles(tmp_path_factory, spec, bands):
    from custom_datasets.image_folder import ImageFiles

    shape, dtype, special = spec
    folder = tmp_path_factory.mktemp("tile")
    np.save(folder / "a_good.npy", np.full((8, 8, 7), 100, dtype=np.uint16))
    values = np.random.default_rng(len(shape)).uniform(0, 500, size=shape).astype(dtype)
    if values.size and np.issubdtype(values.dtype, np.floating):
        values.flat[0] = special
    np.save(folder / "fuzz.npy", values)
    dataset = only_user_errors(lambda: ImageFiles(folder, lambda image, key=None: {"mode": image.mode},
                                                  [int(b) for b in bands] if bands else None))
    if dataset != "refused":
        for i in range(len(dataset)):
            sample = dataset[i]
            assert sample is None or sample["mode"] == "RGB"
    count("tiles")


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["caption", "filename", "text", "label", "x"]), inner, max_size=4), max_leaves=12)


def lines_of(values, junk):
    return b"\n".join([json.dumps(v).encode() for v in values] + junk)


@RUN
@given(st.sampled_from([".json", ".jsonl", ".txt"]), st.lists(JSON, max_size=6), st.lists(st.binary(max_size=20),
                                                                                          max_size=3))
def test_caption_files(tmp_path_factory, suffix, values, junk):
    from custom_datasets.text_data import CaptionCorpus

    path = tmp_path_factory.mktemp("cap") / f"captions{suffix}"
    path.write_bytes(json.dumps(values).encode() if suffix == ".json" else lines_of(values, junk))
    corpus = only_user_errors(lambda: CaptionCorpus([path]))
    if corpus != "refused":
        for i in range(len(corpus)):
            sample = corpus[i]
            assert sample is None or isinstance(sample["caption"], str)
    count("caption files")


@RUN
@given(st.sampled_from([".json", ".jsonl"]), st.lists(JSON, max_size=6), st.lists(st.binary(max_size=20), max_size=3))
def test_pair_files(tmp_path_factory, suffix, values, junk):
    from custom_datasets.pair_data import ImageCaptionPairs
    from custom_datasets.text_data import read_pairs

    folder = tmp_path_factory.mktemp("pairs")
    path = folder / f"pairs{suffix}"
    path.write_bytes(json.dumps(values).encode() if suffix == ".json" else lines_of(values, junk))
    pairs = only_user_errors(lambda: read_pairs(path, folder))
    if pairs != "refused":
        assert all(isinstance(c, str) and c.strip() for _, captions in pairs for c in captions)
        assert only_user_errors(lambda: ImageCaptionPairs(pairs, lambda image, key=None: {})) == "refused"  # no image exists
    count("pair files")


@RUN
@given(st.sampled_from([".csv", ".json", ".jsonl"]), st.lists(JSON, max_size=6), st.binary(max_size=40))
def test_labelled_texts(tmp_path_factory, suffix, values, raw):
    from custom_datasets.labelled_text import read_labelled_texts

    path = tmp_path_factory.mktemp("lab") / f"texts{suffix}"
    path.write_bytes(raw if suffix == ".csv" else json.dumps(values).encode() if suffix == ".json"
                     else lines_of(values, [raw]))
    result = only_user_errors(lambda: read_labelled_texts(path))
    assert result == "refused" or all(isinstance(t, str) and isinstance(label, str) for t, label in result)
    count("labelled texts")


@RUN
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c/d"]), st.sampled_from([".jpg", ".png", ".txt", ".json", ".bin"]),
                          st.one_of(st.binary(max_size=30), st.just(sample_bytes("PNG")))), max_size=6),
       st.integers(0, 2000))
def test_shards(tmp_path_factory, members, cut):
    from custom_datasets.webdataset_pairs import read_shard

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, ext, data in members:
            info = tarfile.TarInfo(key + ext)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    path = tmp_path_factory.mktemp("shard") / "00000.tar"
    path.write_bytes(raw[:cut] if cut < len(raw) else raw)
    for sample in read_shard(path):
        assert sample is None or (isinstance(sample["caption"], (str, list)) and sample["image"].mode == "RGB")
    count("shards")


TENSORS = st.dictionaries(st.sampled_from(["backbone.cls_token", "transformer.patch_embed.proj.weight", "mim_head.proj.weight",
                                           "w", "relative_position_bias_table"]),
                          st.lists(st.integers(1, 4), min_size=1, max_size=3).map(lambda s: torch.zeros(*s)), max_size=4)


@RUN
@given(st.one_of(st.binary(max_size=200), TENSORS.map(lambda t: {"model": t}),
                 st.tuples(TENSORS, JSON).map(lambda t: {"model": t[0], "backbone_config": t[1]}),
                 TENSORS.map(lambda t: {"model": t, "args": {"lr": 1}})), st.integers(0, 400))
def test_checkpoints(tmp_path_factory, content, cut):
    from models import create_model
    from models.checkpoints import read_model_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
        if cut:
            path.write_bytes(path.read_bytes()[:cut])
    only_user_errors(lambda: read_model_checkpoint(path))
    only_user_errors(lambda: create_model(None, pretrained=str(path)))
    count("checkpoints")


@RUN
@given(st.one_of(st.binary(max_size=200), st.integers(0, 3000)))
def test_dall_e_pickles(tmp_path_factory, content):
    import dall_e

    from models.visual_tokenizers import create_visual_tokenizer

    folder = tmp_path_factory.mktemp("dalle")
    if isinstance(content, bytes):
        (folder / "encoder.pkl").write_bytes(content)
    else:  # a real (small) encoder.pkl, truncated
        torch.save(dall_e.encoder.Encoder(n_hid=8, vocab_size=16, n_blk_per_group=1), folder / "encoder.pkl")
        raw = (folder / "encoder.pkl").read_bytes()
        (folder / "encoder.pkl").write_bytes(raw[:content])
    only_user_errors(lambda: create_visual_tokenizer("dall-e", folder, 32))
    count("DALL-E pickles")


def test_every_reader_was_fuzzed():
    """Runs last in this module: the README reports this total."""
    if len(COUNTED) < 8:
        pytest.skip("run the whole module to count the cases")
    assert all(n >= CASES for n in COUNTED.values()), COUNTED
    print(f"reader fuzzing: {sum(COUNTED.values())} cases over {len(COUNTED)} readers: {COUNTED}")
