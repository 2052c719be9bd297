"""Minimal SimCLR/MoCo trainer with in-loop CSS scores, data sets, augmentations, models, evaluation."""

from coreset_ext.train.augment import Augment
from coreset_ext.train.data import ArrayDataset, load_dataset
from coreset_ext.train.losses import contrastive_step_loss
from coreset_ext.train.trainer import TrainConfig, Trainer, TrainResult, train

__all__ = ["ArrayDataset", "Augment", "TrainConfig", "TrainResult", "Trainer", "contrastive_step_loss",
           "load_dataset", "train"]
