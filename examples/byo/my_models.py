"""A user's own model code, as rcat sees it: a module with a function that returns an nn.Module.

rcat imports it only when a params file or a command line names it (``factory:my_models:digit_cnn@WEIGHTS``),
and loads the weights separately (safetensors, or a state dict read without unpickling code).
"""

from torch import nn


def digit_cnn() -> nn.Module:
    """A small CNN for 3x8x8 RGB images of 10 classes (the example's ImageFolder data)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def digit_mlp() -> nn.Module:
    """A small MLP for the same inputs: the example's 'old' model."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))
