"""The data settings of pretraining runs (each field is a flag; see `common.config_args`), owned
by the data layer that reads them, and the bundle the pretraining data builders take."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from common.config_args import flag
from common.flag_scopes import both, mode_reads, when

SYNTHETIC = "synthetic"


def is_synthetic(cfg) -> bool:
    """The embedded world, asked for by name (`--data_path synthetic`): a run never falls back to it."""
    return cfg.data.data_path == SYNTHETIC


SYNTHETIC_WORLD = when("runs with --data_path synthetic", is_synthetic)
WEBDATASET = when("runs with --webdataset", lambda cfg: cfg.text.webdataset)
IMAGE_VIEWS, MASKING = mode_reads("image_views"), mode_reads("masking")
BLOCK_MASKS = both(MASKING, when("runs with --mask_strategy block", lambda cfg: cfg.views.mask_strategy == "block"))
INTERPOLATIONS = ("bicubic", "bilinear", "lanczos", "nearest", "random")  # random: bilinear or bicubic per image


def allow_outside_flag(scope=None):
    """`--allow_outside_data_path`, the same in pretraining and fine-tuning."""
    return flag(False, "pair files may name images outside --data_path (absolute paths, '..'); by default such pairs "
                       "are skipped and counted", scope=scope)


@dataclass(frozen=True)
class DataSettings:
    data_path: str | None = flag(None, "image folder (searched recursively); text modes: a caption file; "
                                       "'synthetic' for the embedded world", shown_default="none: required")
    data_weights: tuple[float, ...] | None = flag(None, "sources given as --data_path \"A::B\" (image folders or "
                                                       "--webdataset shards): each one's share of every epoch, e.g. 3 1",
                                                  nargs="+", shown_default="equal", minimum=0)
    eval_data_path: str | None = flag(None, "held-out images", shown_default="a --val_fraction of --data_path")
    val_fraction: float = flag(0.05, "fraction of --data_path held out (deterministic by file name)", minimum=0,
                                below=1)
    bands: str | None = flag(None, "for .npy tiles: three band indices as R,G,B, e.g. 3,2,1", shown_default="the first three")
    synthetic_train_size: int = flag(2000, "scenes in the synthetic training split", minimum=1, scope=SYNTHETIC_WORLD)
    synthetic_val_size: int = flag(500, "scenes in the synthetic held-out split", minimum=1, scope=SYNTHETIC_WORLD)
    synthetic_render_size: int = flag(96, "pixels of a rendered synthetic scene", minimum=8, scope=SYNTHETIC_WORLD)
    max_train_samples: int | None = flag(None, "use only the first N training samples (quick trials)", shown_default="all",
                                          minimum=1)
    max_val_samples: int | None = flag(None, "use only the first N held-out samples", shown_default="all", minimum=1)
    max_bad_samples: int | None = flag(None, "stop once more unreadable samples than this were skipped", minimum=0,
                                       shown_default="no limit")
    num_workers: int = flag(2, "DataLoader worker processes", minimum=0)
    allow_outside_data_path: bool = allow_outside_flag(mode_reads("pairs"))
    pin_mem: bool | None = flag(None, "pin host memory for faster copies to the GPU",
                                action=argparse.BooleanOptionalAction, shown_default="on with a GPU")
    no_pin_mem: bool = flag(False, "ContinualTransformer's spelling of --no-pin_mem")


@dataclass(frozen=True)
class TextSettings:
    tokenizer: str | None = flag(None, "BERT WordPiece tokenizer: local folder or hub name",
                                 shown_default="bert-base-uncased for text modes")
    data_file_path: tuple[str, ...] | None = flag(
        None, "captions (.json list / .jsonl / .txt) or image-text pairs (.json/.jsonl with filename)", nargs="+",
        shown_default="the synthetic world", scope=mode_reads("text"))
    eval_data_file_path: str | None = flag(None, "held-out captions / pairs", shown_default="a --val_fraction",
                                           scope=mode_reads("text"))
    webdataset: bool = flag(False, "image-text pairs from WebDataset tar shards: --data_path DIR, glob, "
                                   "shards/{00000..00099}.tar, pipe:COMMAND, or s3:// gs:// https:// URLs (fsspec)")
    train_num_samples: int | None = flag(None, "pairs in the --webdataset shards (the epoch length)", scope=WEBDATASET)
    dataset_resampled: bool = flag(False, "--webdataset: each reader draws whole shards with replacement (open_clip's "
                                          "--dataset-resampled) instead of splitting them", scope=WEBDATASET)
    shuffle_buffer: int = flag(0, "--webdataset: shuffle samples through a buffer of this many (0: the shards' "
                                  "order)", minimum=0, scope=WEBDATASET)
    shard_retries: int = flag(3, "--webdataset: times a remote shard or pipe: command whose stream breaks (dropped "
                                 "connection, timeout, object gone) is opened again before it is skipped", minimum=0,
                                scope=WEBDATASET)
    shard_timeout: float = flag(60.0, "--webdataset: seconds a remote shard may take to connect, and between two reads",
                                minimum=0.1, scope=WEBDATASET)
    train_data_upsampling_factors: str | None = flag(None, "not supported: refused with what to do instead")
    max_text_len: int = flag(40, "tokens per caption, [CLS] and [SEP] included", scope=mode_reads("text"))
    max_text_len_of_initckpt: int = flag(196, "text positions of a model built from scratch")
    mlm_probability: float = flag(0.15, "fraction of caption tokens masked for MLM (whole words)",
                                  scope=mode_reads("mlm"))
    vocab_size: int | None = flag(None, "text vocabulary the model must have (a check: the tokenizer decides it)",
                                  shown_default="the tokenizer's")


@dataclass(frozen=True)
class ViewSettings:
    mask_strategy: str = flag("block", "BEiT blockwise masks, or independent per-patch (ContinualTransformer)",
                              choices=("block", "random"), scope=MASKING)
    num_mask_patches: int | None = flag(None, "patches masked per image (block)", shown_default="75/196 of the patches",
                                        scope=BLOCK_MASKS)
    max_mask_patches_per_block: int | None = flag(None, "largest block (block)", shown_default="--num_mask_patches",
                                                  scope=BLOCK_MASKS)
    min_mask_patches_per_block: int = flag(16, "smallest block (block)", scope=BLOCK_MASKS)
    mask_ratio: float = flag(0.75, "image_mae: the share of each image's patches masked, at random (MAE; "
                                   "ContinualTransformer's flag)", minimum=0.01, below=1, scope=mode_reads("mae"))
    mim_probability: float = flag(0.55, "masking probability per patch (random)",
                                  scope=both(MASKING, when("runs with --mask_strategy random",
                                                           lambda cfg: cfg.views.mask_strategy == "random")))
    min_crop_scale: float = flag(0.08, "smallest random crop, as a fraction of the image area", scope=IMAGE_VIEWS)
    color_jitter: float = flag(0.4, "brightness/contrast/saturation jitter (0: off)", scope=IMAGE_VIEWS)
    imagenet_default_mean_and_std: bool = flag(False, "normalise with ImageNet's mean/std instead of 0.5/0.5",
                                               scope=IMAGE_VIEWS)
    disable_imagenet_default_mean_and_std: bool = flag(False, "normalise with 0.5/0.5 even where a preset asks for "
                                                              "ImageNet's mean/std (ContinualTransformer's flag)",
                                                       scope=IMAGE_VIEWS)
    train_interpolation: str = flag("bicubic", "resampling of the backbone view", choices=INTERPOLATIONS,
                                    scope=IMAGE_VIEWS)
    second_interpolation: str | None = flag(None, "resampling of the visual-tokenizer view (a later stage's report "
                                                   "reads it too)", choices=INTERPOLATIONS,
                                            shown_default="bicubic for --d_vae_type vqkd (BEiT v2's recipe), else "
                                                          "lanczos (BEiT's)")


@dataclass(frozen=True)
class PretrainDataConfig:
    """Everything the pretraining data builders read."""

    data: DataSettings
    text: TextSettings
    views: ViewSettings
    image_size: int
    second_image_size: int
    seed: int
    index_cache: str | None = None  # where the training folder's file index is kept (a resumed run reuses it)
    masks: str = "beit"  # BEiT's masks (--mask_strategy) or MAE's (--mask_ratio), as the mode takes them


@dataclass(frozen=True)
class FinetuneDataSettings:
    data_path: str | None = flag(None, "image tasks: folder with train/<class>/ and val/<class>/; retrieval: the "
                                       "image root; vqa / nlvr2: the VQAv2 / NLVR2 folder")
    data_file_path: str | None = flag(None, "text_classification: .csv/.json/.jsonl of text,label; retrieval: "
                                            "image-caption .json/.jsonl, or Karpathy's dataset_coco.json / "
                                            "dataset_flickr30k.json")
    eval_data_file_path: str | None = flag(None, "held-out texts / pairs", shown_default="a --val_fraction")
    val_fraction: float = flag(0.1, "fraction of --data_file_path held out (deterministic)", minimum=0, below=1)
    tokenizer: str | None = flag(None, "text tasks: BERT tokenizer folder or hub name",
                                 shown_default="the checkpoint's, else bert-base-uncased")
    max_text_len: int = flag(40, "tokens per text, [CLS] and [SEP] included")
    karpathy_eval_split: str = flag("test", "image_text_retrieval with Karpathy's dataset_coco.json / "
                                            "dataset_flickr30k.json as --data_file_path: the split evaluated (training "
                                            "takes train + restval)", choices=("test", "val"))
    rerank_k: int = flag(0, "image_text_retrieval: also train the matching head (ITM, hard negatives) and re-rank "
                            "each image's and caption's contrastive top k with it on the fused pair (VLMo); both "
                            "rankings are reported (0: contrastive only)")
    vqa_train_splits: tuple[str, ...] = flag(("train2014",), "vqa: the VQAv2 splits trained on (VLMo's test-dev "
                                                              "runs: train2014 val2014)", nargs="+")
    vqa_eval_split: str = flag("val2014", "vqa: the split evaluated; one without annotations (test-dev2015, "
                                          "test2015) only with --eval, writing the results file alone")
    vqa_answers: int = flag(3129, "vqa: answers in the vocabulary, the most frequent of the training questions' human "
                                  "answers (VLMo: 3129)")
    vqa_soft_score: str = flag("min_n_over_3", "vqa: training target of an answer n humans gave: min(1, n/3), or "
                                               "the official leave-one-out accuracy (0.3/0.6/0.9/1: VLMo, ViLT)",
                               choices=("min_n_over_3", "leave_one_out"))
    vqa_scoring: str = flag("official", "vqa: which spellings of an answer match: today's official evaluation "
                                        "(GT-Vision-Lab/VQA since its 2021 fix: humans who agree are compared "
                                        "verbatim, humans who disagree and the prediction normalised fully) or "
                                        "the code before that fix (the prediction always normalised, the humans "
                                        "only for punctuation)", choices=("official", "official_pre2021"))
    nlvr2_eval_split: str = flag("dev", "nlvr2: the split evaluated", choices=("dev", "test1"))
    eval_data_path: str | None = flag(None, "held-out image folder", shown_default="DATA_PATH/val")
    model_selection_fraction: float | None = flag(
        None, "image classification and linear probe: fraction of the training images held out (by file name) "
              "to choose the best epoch on, so the reported val accuracy is not the one it was picked on; 0: pick "
              "on the val set (BEiT)", shown_default="0.2 with --recipe small_data, else 0")
    max_bad_samples: int | None = flag(None, "stop once more unreadable samples than this were skipped", minimum=0,
                                       shown_default="no limit")
    num_workers: int = flag(2, "DataLoader worker processes", minimum=0)
    allow_outside_data_path: bool = allow_outside_flag()


@dataclass(frozen=True)
class AugmentSettings:
    recipe: str = flag("auto", "fine-tuning recipe: beit (ImageNet: the defaults below), small_data (no Mixup/CutMix, "
                               "RandAugment, random erasing, smoothing or drop path; batch 16, blr 3e-3, layer decay 0.75, a "
                               "model-selection split), auto: small_data below 5000 training images",
                       choices=("auto", "beit", "small_data"))
    aa: str = flag("rand-m9-mstd0.5-inc1", "timm RandAugment policy ('' for none)")
    reprob: float = flag(0.25, "random erasing probability")
    mixup: float = flag(0.8, "Mixup alpha (0: off)")
    cutmix: float = flag(1.0, "CutMix alpha (0: off)")
    mixup_prob: float = flag(1.0, "probability of Mixup or CutMix per batch")
    mixup_switch_prob: float = flag(0.5, "probability of CutMix instead of Mixup")
    smoothing: float = flag(0.1, "label smoothing")
    min_crop_scale: float | None = flag(None, "smallest random crop, as a fraction of the image area",
                                        shown_default="0.08 (BEiT) for images, 0.5 (VLMo) for image-text tasks")
    crop_pct: float = flag(0.875, "held-out view: centre crop of the resized image")
    imagenet_default_mean_and_std: bool = flag(False, "normalise with ImageNet's mean/std instead of 0.5/0.5")


@dataclass(frozen=True)
class SegmentationDataSettings:
    class_names: str | None = flag(None, "semantic_segmentation: class names, one per line (index order)",
                                   shown_default="DATA_PATH/class_names.txt, else ADE20K's objectInfo150.txt")
    reduce_zero_label: bool = flag(False, "semantic_segmentation: masks use 0 for unlabelled and classes from 1 "
                                          "(ADE20K); read 0 as ignored and shift the rest down, as mmseg")
    bands: str | None = flag(None, "semantic_segmentation on .npy tiles: three band indices as R,G,B, e.g. 3,2,1",
                             shown_default="the first three")
    scale_ratio_range: tuple[float, ...] = flag((0.5, 2.0), "semantic_segmentation: random rescale of the base "
                                                            "scale in training (BEiT/mmseg: 0.5 2.0)", nargs=2)
    photometric_distortion: bool = flag(True, "semantic_segmentation: brightness/contrast/saturation/hue jitter of "
                                              "training images (never the masks)",
                                        action=argparse.BooleanOptionalAction)
