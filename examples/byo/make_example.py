"""Make a bring-your-own example: an ImageFolder of PNG images and two models of your own.

    python examples/byo/make_example.py OUT_DIR

writes ``OUT_DIR/images/<class>/<n>.png`` (the digits as 8x8 RGB PNGs, standing in for your
data), and ``OUT_DIR/old.pt`` / ``OUT_DIR/new.pt``: state dicts of ``my_models.digit_mlp`` and
``my_models.digit_cnn``, adversarially trained outside rcat (PGD, eps 0.1), the old one on less
data, standing in for your two model versions. Then follow the README's "Your own models and data".
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torchattacks
from PIL import Image
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from my_models import digit_cnn, digit_mlp


def write_images(root: Path) -> None:
    bunch = load_digits()
    for index, (image, label) in enumerate(zip(bunch.images, bunch.target, strict=True)):
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        grey = np.round(image / 16.0 * 255).astype(np.uint8)
        Image.fromarray(np.stack([grey] * 3, axis=-1)).save(folder / f"{index:04d}.png")


def train(network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    attack = torchattacks.PGD(network, eps=0.1, alpha=0.05, steps=5)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            x_adv = attack(images[batch], labels[batch])
            network.train()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(network(x_adv), labels[batch]).backward()
            optimizer.step()
    return network.eval()


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/byo/make_example.py OUT_DIR")
    out = Path(sys.argv[1])
    write_images(out / "images")
    bunch = load_digits()
    images = torch.tensor(np.round(bunch.images / 16.0 * 255) / 255, dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1)
    labels = torch.tensor(bunch.target)
    generator = torch.Generator().manual_seed(0)
    subset = torch.randperm(len(labels), generator=generator)[:400]
    torch.save(train(digit_mlp(), images[subset], labels[subset], epochs=8, seed=1).state_dict(), out / "old.pt")
    torch.save(train(digit_cnn(), images, labels, epochs=4, seed=2).state_dict(), out / "new.pt")
    print(f"wrote {out / 'images'} ({len(labels)} images), {out / 'old.pt'}, {out / 'new.pt'}")


if __name__ == "__main__":
    main()
