"""Data: CIFAR-10/100 in memory, device-side augmentation, test-split access accounting."""

from rift_bn.data.cifar import (
    DATASETS,
    CIFARDataModule,
    CIFARSpec,
    DataError,
    TensorLoader,
    augment,
    augment_params,
    crop_flip,
    ensure_cifar,
    fingerprint,
    load_cifar,
    split_indices,
    to_float,
)

__all__ = [
    "DATASETS",
    "CIFARDataModule",
    "CIFARSpec",
    "DataError",
    "TensorLoader",
    "augment",
    "augment_params",
    "crop_flip",
    "ensure_cifar",
    "fingerprint",
    "load_cifar",
    "split_indices",
    "to_float",
]
