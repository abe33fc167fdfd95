"""How images are held in memory: 8-bit pixels where the source has them, float32 in [0, 1] on the way into a model.

A split decoded from 8-bit files (``imagefolder:``, the CIFAR-10 releases) keeps its pixels as
``uint8`` (value v stands for v / 255): a quarter of the float32 tensor, so memory grows with the
data by its size on disk, not four times that. Every consumer converts a batch at a time with
:func:`as_float_images` (``float32(v) / 255``, the very operation the loaders used before, so the
floats a model sees are bit-identical). Other sources (digits, ``npz:``, resized sources) stay
float32.

A split's content digest (:func:`content_digest`) hashes its images *as float32* whatever their
storage, so the same pixels have the same digest stored either way, and digests recorded before
this storage existed still match.
"""

from __future__ import annotations

import hashlib

import torch

from rcat.safe_io import hash_tensor_into

PIXEL_DTYPE = torch.uint8
PIXEL_SCALE = 255.0
"""A stored pixel value v stands for v / PIXEL_SCALE in [0, 1]."""
DIGEST_BLOCK_ELEMENTS = 1 << 22
"""Pixels converted at a time while hashing (16 MB of float32): the digest never holds a float copy of the split."""


def is_pixels(images: torch.Tensor) -> bool:
    """True when ``images`` holds 8-bit pixels (value / 255), False for float images in [0, 1]."""
    return images.dtype == PIXEL_DTYPE


def as_float_images(images: torch.Tensor) -> torch.Tensor:
    """``images`` as float32 in [0, 1]: 8-bit pixels divided by 255 (a new tensor); float images as they are."""
    if is_pixels(images):
        return images.float().div_(PIXEL_SCALE)
    return images


def content_digest(images: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor) -> str:
    """Hex SHA-256 over (images as float32, labels, sample indices): :func:`rcat.safe_io.sha256_tensors` of the
    float32 images, computed for 8-bit pixels a block at a time, so equal for both storages of the same pixels."""
    digest = hashlib.sha256()
    if is_pixels(images):
        flat = images.detach().cpu().contiguous().reshape(-1)
        digest.update(str(torch.float32).encode())
        digest.update(str(tuple(images.shape)).encode())
        for start in range(0, flat.numel(), DIGEST_BLOCK_ELEMENTS):
            block = flat[start : start + DIGEST_BLOCK_ELEMENTS].float().div_(PIXEL_SCALE)
            digest.update(memoryview(block.numpy()).cast("B"))  # type: ignore[arg-type]  # as in rcat.safe_io.hash_tensor_into
    else:
        hash_tensor_into(digest, images)
    hash_tensor_into(digest, labels)
    hash_tensor_into(digest, sample_index)
    return digest.hexdigest()
