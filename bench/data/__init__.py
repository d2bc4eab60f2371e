"""The dataset layer: reading datasets, decoding images and masks, support sampling.

Typical use::

    dataset = resolve_dataset("bus-uclm", default_data_root())
    support = sample_support(dataset, shots=4, seed=0)
    items = [image_item(s) for s in support.samples]
    masks = [eval_mask(s, 336) for s in support.samples]
"""

from bench.data.checks import check_no_overlap, deep_check, overlapping_images
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
    is_bus_bra_layout,
    is_bus_uclm_layout,
    is_busi_layout,
    read_bus_bra,
    read_bus_uclm,
    read_busi,
    read_manifest,
)
from bench.data.resolve import (
    DATA_ROOT_ENV,
    DOWNLOAD_HINTS,
    NAMED_DATASETS,
    DatasetFactory,
    dataset_names,
    default_data_root,
    read_path,
    register_dataset_provider,
    resolve_dataset,
    unregister_dataset_provider,
)
from bench.data.summary import (
    CLASS_COLUMNS,
    DEVICE_COLUMN,
    NOT_SET,
    DatasetSummary,
    MetadataCounts,
    describe_dataset,
    image_item,
    metadata_columns,
    metadata_count_header,
    metadata_count_rows,
    metadata_counts,
)
from bench.data.support import SupportSelection, check_support_sizes, sample_support, support_pool

__all__ = [
    "CLASS_COLUMNS",
    "DATA_ROOT_ENV",
    "DEVICE_COLUMN",
    "DOWNLOAD_HINTS",
    "MANIFEST_COLUMNS",
    "NAMED_DATASETS",
    "NOT_SET",
    "Dataset",
    "DatasetFactory",
    "DatasetSummary",
    "EvalMask",
    "MetadataCounts",
    "PixelExclusion",
    "SupportSelection",
    "check_no_overlap",
    "check_support_sizes",
    "clear_caches",
    "dataset_names",
    "deep_check",
    "default_data_root",
    "describe_dataset",
    "eval_mask",
    "file_key",
    "image_item",
    "image_size",
    "is_bus_bra_layout",
    "is_bus_uclm_layout",
    "is_busi_layout",
    "load_mask",
    "load_mask_file",
    "load_rgb",
    "mask_problems",
    "metadata_columns",
    "metadata_count_header",
    "metadata_count_rows",
    "metadata_counts",
    "overlapping_images",
    "pixel_exclusion",
    "pixel_exclusions",
    "read_bus_bra",
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
