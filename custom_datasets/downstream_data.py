"""Datasets of every downstream task, by data kind: labelled image folders, labelled texts,
image-caption pairs, and image + mask pairs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch.utils.data import Dataset

from common.errors import UserError
from custom_datasets.classification_data import (
    LabelledSample,
    build_classification_datasets,
    build_transform,
    whole_image_transform,
)
from custom_datasets.collate import collate_skipping_bad
from custom_datasets.karpathy_split import TRAIN_SPLITS, is_karpathy_file, read_karpathy
from custom_datasets.labelled_text import LabelledTexts, label_index, read_labelled_texts
from custom_datasets.nlvr2_data import StatementPairs, read_nlvr2_split
from custom_datasets.pair_data import ImageCaptionPairs
from custom_datasets.segmentation_data import SegmentationPairs, find_segmentation_data
from custom_datasets.segmentation_transforms import SegmentationView
from custom_datasets.settings import AugmentSettings, FinetuneDataSettings, SegmentationDataSettings
from custom_datasets.split import file_key, record_keys, split_held_out
from custom_datasets.text_collate import CaptionCollator
from custom_datasets.text_data import read_pairs
from custom_datasets.vqa_data import VQAQuestions, vqa_splits

KIND_NEEDS = {"image_folder": "data_path", "labelled_text": "data_file_path", "image_text_pairs": "data_file_path",
              "segmentation": "data_path", "vqa": "data_path", "nlvr2": "data_path"}


@dataclass
class DownstreamData:
    train: Dataset
    val: Dataset
    train_collate: Callable
    val_collate: Callable
    class_names: list[str] = field(default_factory=list)
    selection: Dataset | None = None  # where checkpoint-best is chosen, when not on `val`
    whole_image: bool = False  # the held-out view is the whole image squashed to a square (VQA, NLVR2)


def image_folders(data: FinetuneDataSettings, aug: AugmentSettings, input_size: int, train_transform=None,
                  val_transform=None) -> DownstreamData:
    train, val, selection = build_classification_datasets(
        data, train_transform or build_transform(aug, input_size, True),
        val_transform or build_transform(aug, input_size, False))
    names = sorted(train.class_to_idx, key=train.class_to_idx.get)
    return DownstreamData(train, val, collate_skipping_bad, collate_skipping_bad, names, selection)


def labelled_texts(data: FinetuneDataSettings, tokenizer) -> DownstreamData:
    examples = read_labelled_texts(data.data_file_path)
    if data.eval_data_file_path:
        train, val = examples, read_labelled_texts(data.eval_data_file_path)
    else:
        train, val = split_held_out(examples, record_keys(len(examples)), data.val_fraction,
                                    f"--data_file_path {data.data_file_path}")
    labels = label_index(train)
    collate = CaptionCollator(tokenizer, data.max_text_len, None, train=False)
    return DownstreamData(LabelledTexts(train, labels), LabelledTexts(val, labels), collate, collate,
                          sorted(labels, key=labels.get))


def train_and_held_out_pairs(data: FinetuneDataSettings) -> tuple[list, list]:
    """Karpathy's split file: its train + restval images and its test (or val) images; a pair file:
    `--eval_data_file_path`, else a `--val_fraction` held out by file name."""
    allow = data.allow_outside_data_path
    if is_karpathy_file(data.data_file_path):
        train = read_karpathy(data.data_file_path, data.data_path, TRAIN_SPLITS, allow)
        if data.eval_data_file_path:
            return train, read_pairs(data.eval_data_file_path, data.data_path, allow, "--eval_data_file_path")
        return train, read_karpathy(data.data_file_path, data.data_path, (data.karpathy_eval_split,), allow)
    pairs = read_pairs(data.data_file_path, data.data_path, allow)
    if data.eval_data_file_path:
        return pairs, read_pairs(data.eval_data_file_path, data.data_path, allow, "--eval_data_file_path")
    return split_held_out(pairs, (file_key(p[0]) for p in pairs), data.val_fraction,
                          f"--data_file_path {data.data_file_path}")


def image_text_pairs(data: FinetuneDataSettings, aug: AugmentSettings, input_size: int, tokenizer) -> DownstreamData:
    train, val = train_and_held_out_pairs(data)
    if len(val) < 2:
        raise UserError(f"--data_file_path {data.data_file_path}: {len(val)} held-out pair is too few to measure "
                        f"retrieval; raise --val_fraction or pass --eval_data_file_path")
    train_set = ImageCaptionPairs(train, LabelledSample(build_transform(aug, input_size, True, image_text=True)))
    val_set = ImageCaptionPairs(val, LabelledSample(build_transform(aug, input_size, False)))
    return DownstreamData(train_set, val_set, CaptionCollator(tokenizer, data.max_text_len, None, train=True),
                          CaptionCollator(tokenizer, data.max_text_len, None, train=False))


def segmentation_pairs(data: FinetuneDataSettings, seg: SegmentationDataSettings, aug: AugmentSettings, crop: int,
                       nb_classes: int | None) -> DownstreamData:
    bands = [int(b) for b in seg.bands.split(",")] if seg.bands else None
    source = find_segmentation_data(data.data_path, seg.class_names, nb_classes, seg.reduce_zero_label, bands)

    def pairs(rows, train: bool) -> SegmentationPairs:
        view = SegmentationView(crop, train, tuple(seg.scale_ratio_range), photometric=seg.photometric_distortion,
                                imagenet_mean_std=aug.imagenet_default_mean_and_std)
        return SegmentationPairs(rows, view, seg.reduce_zero_label, bands, source.scaler, source.class_names)

    return DownstreamData(pairs(source.train_pairs, True), pairs(source.val_pairs, False), collate_skipping_bad,
                          collate_skipping_bad, source.class_names)


def vqa_questions(data: FinetuneDataSettings, aug: AugmentSettings, input_size: int, tokenizer, evaluate_only: bool,
                  recorded_answers: list[str] | None) -> DownstreamData:
    """VQAv2's questions; the class names are the answer vocabulary (a VQA checkpoint's own, when
    fine-tuning or evaluating one further)."""
    train, held_out, vocabulary = vqa_splits(data.data_path, data.vqa_train_splits, data.vqa_eval_split,
                                             data.vqa_answers, evaluate_only, recorded_answers, data.vqa_scoring)

    def questions(rows, train_view: bool, what: str) -> VQAQuestions:
        return VQAQuestions(rows, vocabulary, data.vqa_soft_score,
                            LabelledSample(whole_image_transform(aug, input_size, train_view)), what)

    collate = CaptionCollator(tokenizer, data.max_text_len, None, train=False)
    train_set = questions(train, True, f"VQA {'+'.join(data.vqa_train_splits)}") if train else []
    return DownstreamData(train_set, questions(held_out, False, f"VQA {data.vqa_eval_split}"), collate, collate,
                          vocabulary.answers, whole_image=True)


def nlvr2_statements(data: FinetuneDataSettings, aug: AugmentSettings, input_size: int, tokenizer,
                     evaluate_only: bool) -> DownstreamData:
    def statements(split: str, train_view: bool) -> StatementPairs:
        return StatementPairs(read_nlvr2_split(data.data_path, split),
                              LabelledSample(whole_image_transform(aug, input_size, train_view)), f"NLVR2 {split}")

    collate = CaptionCollator(tokenizer, data.max_text_len, None, train=False)
    train = [] if evaluate_only else statements("train", True)
    return DownstreamData(train, statements(data.nlvr2_eval_split, False), collate, collate, ["false", "true"],
                          whole_image=True)


def build_downstream_data(kind: str, data: FinetuneDataSettings, aug: AugmentSettings, input_size: int,
                          tokenizer=None, segmentation: SegmentationDataSettings | None = None,
                          nb_classes: int | None = None, evaluate_only: bool = False,
                          recorded_class_names: list[str] | None = None) -> DownstreamData:
    if kind == "vqa":
        return vqa_questions(data, aug, input_size, tokenizer, evaluate_only, recorded_class_names)
    if kind == "nlvr2":
        return nlvr2_statements(data, aug, input_size, tokenizer, evaluate_only)
    if kind == "image_folder":
        return image_folders(data, aug, input_size)
    if kind == "segmentation":
        return segmentation_pairs(data, segmentation or SegmentationDataSettings(), aug, input_size, nb_classes)
    if kind == "labelled_text":
        return labelled_texts(data, tokenizer)
    return image_text_pairs(data, aug, input_size, tokenizer)
