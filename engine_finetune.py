"""One fine-tuning epoch and one evaluation pass, where MAE and BEiT keep them
(`from engine_finetune import train_one_epoch`): the implementation is `training/engine_finetune.py`,
which the run library uses, so that nothing below the entry scripts imports a root file."""
from training.engine_finetune import evaluate, train_one_epoch

__all__ = ["evaluate", "train_one_epoch"]
