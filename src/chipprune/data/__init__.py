"""Image data for calibration and evaluation: CIFAR-10 and image-folder trees, as folders or tarballs."""

from .batching import batches
from .sources import DataError, ImageSplit, load_split

__all__ = ["DataError", "ImageSplit", "batches", "load_split"]
