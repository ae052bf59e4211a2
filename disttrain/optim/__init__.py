"""Optimizers and learning-rate schedules; the update rules in ``rules`` also run on servers."""
from disttrain.optim import lr_scheduler, rules
from disttrain.optim.optimizer import SGD, Adagrad, Adam, AdamW, Optimizer, RMSprop
from disttrain.optim.rules import RULES, apply_rows

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "RULES", "apply_rows",
           "lr_scheduler", "rules"]
