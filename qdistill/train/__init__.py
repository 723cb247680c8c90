"""The training loop and the methods as its configurations."""

from qdistill.train.config import METHODS, Method, TrainConfig, read_yaml
from qdistill.train.loop import Events, Phase, TrainResult, evaluate, fit, resolve_device, train

__all__ = ["METHODS", "Events", "Method", "Phase", "TrainConfig", "TrainResult", "evaluate", "fit", "read_yaml", "resolve_device", "train"]
