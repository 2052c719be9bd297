"""SimCLR/MoCo trainer with in-loop CSS scores over any map-style Dataset or DataLoader; data sets,
augmentations by modality, encoders (built-in, torchvision, timm, your own), embeddings, evaluation."""

from coreset_ext.train.augment import Augment, SignalAugment, VectorAugment
from coreset_ext.train.data import ArrayDataset, as_data, load_dataset, with_index
from coreset_ext.train.embed import score
from coreset_ext.train.trainer import TrainConfig, Trainer, TrainResult, train

__all__ = ["ArrayDataset", "Augment", "SignalAugment", "TrainConfig", "TrainResult", "Trainer", "VectorAugment",
           "as_data", "load_dataset", "score", "train", "with_index"]
