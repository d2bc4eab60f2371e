"""The dataset layer: reading datasets, decoding images and masks, support sampling.

Typical use::

    dataset = resolve_dataset("bus-uclm", default_data_root())
    support = sample_support(dataset, shots=4, seed=0)
    items = [image_item(s) for s in support.samples]
    masks = [eval_mask(s, 336) for s in support.samples]
"""

from bench.data.dataset import Dataset
from bench.data.io import clear_caches, file_key, image_size, load_mask, load_mask_file, load_rgb
from bench.data.masks import (
    EvalMask,
    PixelExclusion,
    eval_mask,
    mask_problems,
    pixel_exclusion,
    pixel_exclusions,
    resize_mask,
)
from bench.data.readers import (
    MANIFEST_COLUMNS,
    is_bus_uclm_layout,
    is_busi_layout,
    read_bus_uclm,
    read_busi,
    read_manifest,
)
from bench.data.resolve import (
    DATA_ROOT_ENV,
    NAMED_DATASETS,
    DatasetFactory,
    dataset_names,
    default_data_root,
    read_path,
    register_dataset_provider,
    resolve_dataset,
    unregister_dataset_provider,
)
from bench.data.summary import CLASS_COLUMNS, DatasetSummary, describe_dataset, image_item
from bench.data.support import SupportSelection, sample_support, support_pool

__all__ = [
    "CLASS_COLUMNS",
    "DATA_ROOT_ENV",
    "MANIFEST_COLUMNS",
    "NAMED_DATASETS",
    "Dataset",
    "DatasetFactory",
    "DatasetSummary",
    "EvalMask",
    "PixelExclusion",
    "SupportSelection",
    "clear_caches",
    "dataset_names",
    "default_data_root",
    "describe_dataset",
    "eval_mask",
    "file_key",
    "image_item",
    "image_size",
    "is_bus_uclm_layout",
    "is_busi_layout",
    "load_mask",
    "load_mask_file",
    "load_rgb",
    "mask_problems",
    "pixel_exclusion",
    "pixel_exclusions",
    "read_bus_uclm",
    "read_busi",
    "read_manifest",
    "read_path",
    "register_dataset_provider",
    "resize_mask",
    "resolve_dataset",
    "sample_support",
    "support_pool",
    "unregister_dataset_provider",
]
