"""The registry of downstream tasks (`main_finetune.py --task`). Adding a task is one file and one
entry here, as for the pretraining modes."""
from __future__ import annotations

from models.downstream.base import DownstreamOptions, DownstreamTask, SegmentationOptions
from models.downstream.image_classification import ImageClassification
from models.downstream.image_text_retrieval import ImageTextRetrieval
from models.downstream.linear_probe import LinearProbe
from models.downstream.nlvr2 import NLVR2
from models.downstream.semantic_segmentation import SemanticSegmentation
from models.downstream.text_classification import TextClassification
from models.downstream.vqa import VisualQuestionAnswering

DOWNSTREAM_TASKS: dict[str, type[DownstreamTask]] = {
    task.name: task for task in (ImageClassification, LinearProbe, ImageTextRetrieval, TextClassification,
                                 SemanticSegmentation, VisualQuestionAnswering, NLVR2)
}

__all__ = ["DOWNSTREAM_TASKS", "DownstreamOptions", "DownstreamTask", "ImageClassification", "ImageTextRetrieval",
           "LinearProbe", "NLVR2", "SegmentationOptions", "SemanticSegmentation", "TextClassification",
           "VisualQuestionAnswering"]
