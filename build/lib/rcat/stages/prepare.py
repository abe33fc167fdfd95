"""Stage ``prepare``: load the data source, split it, write the splits and their manifest."""

from __future__ import annotations

from typing import Any

import torch

from rcat.config import Params
from rcat.data import load_dataset, save_split, split_dataset
from rcat.results import Layout
from rcat.safe_io import write_json
from rcat.tracking import Tracker


def prepare(params: Params, layout: Layout, tracker: Tracker | None = None) -> dict[str, Any]:
    """Load the data source, split it (seeded, stratified), write each split and a manifest of digests."""
    dataset = load_dataset(params.data.source, params.data.resize, params.data.center_crop)
    splits = split_dataset(dataset, params.data, params.seed)
    manifest: dict[str, Any] = {"source": params.data.source, "num_classes": dataset.num_classes, "classes": list(dataset.classes),
                                "input_shape": list(dataset.images.shape[1:]), "seed": params.seed, "splits": {}}
    for name, split in splits.items():
        digest = save_split(split, layout.split(name))
        counts = torch.bincount(split.labels, minlength=dataset.num_classes).tolist()
        manifest["splits"][name] = {"n_samples": len(split), "digest": digest, "class_counts": counts}
    write_json(layout.manifest, manifest)
    if tracker is not None:
        with tracker.child("prepare", "stage") as run:
            run.params({"data.source": params.data.source, **{f"data.{n}.digest": s["digest"] for n, s in manifest["splits"].items()}})
            run.metrics({f"{n}/n_samples": s["n_samples"] for n, s in manifest["splits"].items()})
            run.artifact(layout.manifest)
    return manifest

