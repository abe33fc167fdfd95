"""Device selection, seeding and code provenance shared by every stage.

torch is imported by the functions that use it: a stage that only reads per-sample results
(``decide``) records the code's revision without paying for importing torch.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from rcat.errors import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; an explicit CUDA device must exist."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"params.yaml: device '{name}' requested but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for data order.

    On CPU the same seed gives bit-identical results. On CUDA, cuDNN autotuning is disabled and
    deterministic kernels are preferred, but some scatter/atomic kernels stay non-deterministic.
    """
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def code_revision(root: str | Path = ".") -> str:
    """The git commit of the code, with ``+dirty`` when tracked files are modified; ``unknown`` outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            # dvc.lock and data/ are pipeline outputs, not code: their changes do not make the code dirty
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock", ":!data"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")
