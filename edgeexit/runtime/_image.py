"""Raw images to a package's pixel input, with the image processor settings it ships.

A package exported from a Hugging Face image model (``export hf``) records its processor's
settings in ``preprocessing.image``: size, mean, std, rescale factor and channel count.  Images
given as uint8 (N, H, W, C) or (N, C, H, W) at that size become float32 (N, C, H, W):
``(x * rescale - mean) / std`` per channel.  Resizing is the caller's: an image of another
size is refused, naming the size to resize to.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InputError


def image_settings(manifest: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The package's image processor settings, or None."""
    pre = manifest.get("preprocessing")
    image = pre.get("image") if isinstance(pre, Mapping) else None
    return image if isinstance(image, Mapping) else None


def pixels_from_images(images: np.ndarray, settings: Mapping[str, Any]) -> np.ndarray:
    """uint8 images (N, H, W, C) or (N, C, H, W) -> normalized float32 (N, C, H, W)."""
    channels = int(settings.get("channels", 3))
    height, width = (int(v) for v in settings["size"])
    if images.dtype != np.uint8 or images.ndim != 4:
        raise InputError(f"raw images are uint8 (N, H, W, C) or (N, C, H, W); got {images.dtype} {images.shape}")
    if images.shape[1:] == (height, width, channels):
        images = images.transpose(0, 3, 1, 2)
    elif images.shape[1:] != (channels, height, width):
        raise InputError(f"images of shape {images.shape[1:]}: this package takes {height}x{width} images with "
                         f"{channels} channels; resize them first (as the model's image processor does)")
    mean = np.asarray(settings.get("mean", [0.0] * channels), np.float32).reshape(1, channels, 1, 1)
    std = np.asarray(settings.get("std", [1.0] * channels), np.float32).reshape(1, channels, 1, 1)
    scale = np.float32(settings.get("rescale", 1 / 255))
    return np.ascontiguousarray((images.astype(np.float32) * scale - mean) / std)
