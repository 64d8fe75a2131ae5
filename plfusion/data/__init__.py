"""Datasets, transforms and loaders. Importing this package registers every dataset in DATASETS."""
from . import imagenet, rgbd, synthetic_imagenet, synthetic_rgbd  # noqa: F401  (register datasets)
from .image_io import DataError, read_image  # noqa: F401
