"""One pretraining epoch and one evaluation pass, where MAE, BEiT and ContinualTransformer keep them
(`from engine_pretrain import train_one_epoch`): the implementation is `training/engine_pretrain.py`,
which the run library uses, so that nothing below the entry scripts imports a root file."""
from training.engine_pretrain import evaluate, train_one_epoch

__all__ = ["evaluate", "train_one_epoch"]
