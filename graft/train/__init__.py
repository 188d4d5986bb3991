"""Training (chapter 7): recipes, optimizers, schedules, the loop, checkpoints, search.

from graft.train import Trainer, load_recipe

recipe = load_recipe("recipes/classification.yaml", ["optim.lr=3e-5"])
Trainer(model, recipe, train_examples, collate, eval_examples).fit()
"""

from graft.train.config import Recipe, load_recipe, with_overrides
from graft.train.loop import Trainer
from graft.train.sampler import StepSampler

__all__ = ["Recipe", "StepSampler", "Trainer", "load_recipe", "with_overrides"]
