"""Procedural B-mode breast-ultrasound phantom: images with known ground truth and device shift.

Images are formed the way a scanner forms them (random scatterers with tissue-dependent
echogenicity -> point-spread function in IQ form -> envelope -> TGC -> log compression ->
scan conversion), for three classes (normal, benign, malignant) with exact lesion masks,
on several simulated devices (:data:`DEVICES`). See ``docs/phantom.md``.

Importing this package registers the ``phantom`` dataset provider, so that
``resolve_dataset("phantom:device-b?n=20", root)`` (and ``bench run --targets ...``) works::

    import bench.phantom
    from bench.phantom import PhantomSpec, generate_image, export_busi_layout

    image = generate_image(PhantomSpec(), index=45, device="device-b")
    export_busi_layout("phantom-busi", device="device-c", n_per_class=100)
"""

from bench.data import register_dataset_provider
from bench.phantom.anatomy import LESION_FEATURES, Anatomy, Lesion, Tissue, sample_anatomy, uniform_anatomy
from bench.phantom.bmode import RAYLEIGH_SNR, simulate_iq_envelope
from bench.phantom.dataset import (
    CACHE_ENV,
    DEFAULT_DEVICE,
    ExportExistsError,
    dataset_name,
    default_seed,
    export_busi_layout,
    parse_phantom_spec,
    phantom_cache_dir,
    phantom_dataset,
)
from bench.phantom.devices import DEVICES, DeviceProfile, Layout, get_device, layout
from bench.phantom.generator import GENERATOR_VERSION, PhantomImage, PhantomSpec, generate_image, render

__all__ = [
    "CACHE_ENV",
    "DEFAULT_DEVICE",
    "DEVICES",
    "GENERATOR_VERSION",
    "LESION_FEATURES",
    "RAYLEIGH_SNR",
    "Anatomy",
    "DeviceProfile",
    "ExportExistsError",
    "Layout",
    "Lesion",
    "PhantomImage",
    "PhantomSpec",
    "Tissue",
    "dataset_name",
    "default_seed",
    "export_busi_layout",
    "generate_image",
    "get_device",
    "layout",
    "parse_phantom_spec",
    "phantom_cache_dir",
    "phantom_dataset",
    "register",
    "render",
    "sample_anatomy",
    "simulate_iq_envelope",
    "uniform_anatomy",
]


def register() -> None:
    """(Re-)register the ``phantom`` dataset provider (done at import; idempotent)."""
    register_dataset_provider("phantom", phantom_dataset, replace=True)


register()
