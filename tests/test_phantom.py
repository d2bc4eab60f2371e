"""Tests of the procedural B-mode phantom (bench.phantom).

``bench.phantom`` registers the ``phantom`` dataset provider when imported. It is imported
inside the fixture, not at module level, so that collecting this file does not register
the provider before tests/test_data.py exercises the provider hook with a fake "phantom".
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from bench.data import eval_mask, file_key, load_mask, load_rgb, read_busi, resolve_dataset
from bench.errors import DatasetError
from bench.types import CLASSES, Label

N_PER_CLASS = 4  # small spec used by most tests: 4 normal, 4 benign, 4 malignant


@pytest.fixture(scope="module")
def ph() -> ModuleType:
    module = importlib.import_module("bench.phantom")
    module.register()  # test_data's provider-hook test unregisters "phantom" when it ends
    return module


@pytest.fixture(scope="module")
def spec(ph: ModuleType):
    return ph.PhantomSpec.per_class(N_PER_CLASS, seed=7)


def lesion_indices(spec, label: Label) -> list[int]:
    return [i for i in range(spec.total) if spec.case(i)[0] is label]


def grey_in_fov(ph: ModuleType, image) -> np.ndarray:
    return image.rgb.max(axis=2)[ph.layout(ph.get_device(image.device)).inside]


# --------------------------------------------------------------------------- determinism


# Pinned output: sha256 of ``rgb.tobytes()`` and ``mask.tobytes()`` of small images that
# between them use every code path (linear and convex probes, scan conversion, spatial
# compounding, speckle reduction, spikes, microlobulation, halo, shadowing, indistinct
# margin, calcifications, callipers and text). Any platform, CPU or library difference
# that changes a single bit fails here. If a deliberate generator change moves them:
# bump GENERATOR_VERSION and update the digests (print them with _digests()).
PINNED_SPEC = {"normal": 1, "benign": 2, "malignant": 2, "seed": 3, "size": [160, 120]}
PINNED = {
    "device-a/3": (
        "69b45d8438ee30a99a5381a591fb500196f3dd651697cf4191b58d3db44e72e7",
        "e479ac5c9cea17eaf6770392b90b1d2a0634967a12a64318ee686691748203cd",
    ),
    "device-b/4": (
        "972a356619fa6a83a616da0c84e578da4b8d2026f4bfe8784d76a3a3fd7e645c",
        "f6bbfe63987870e684d492d7a7b6e8e062ae5890bc1468f6662d5dfc070efafd",
    ),
    "device-d/2": (
        "7dcf2cc02b349c7aac30032aed98bd65facf66ae26b3797c120419b81ab4dd8f",
        "2e734fe9df4b677393ebbc4629ed403afe3e9aac754dd65d6fdda08994ff9601",
    ),
}
# Run in a fresh interpreter (below: with numpy's SIMD kernels switched off) and by the test.
DIGEST_SCRIPT = """
import hashlib, json, sys
import bench.phantom as ph
spec = ph.PhantomSpec(**json.loads(sys.argv[1]))
out = {}
for key in json.loads(sys.argv[2]):
    device, index = key.split("/")
    image = ph.generate_image(spec, int(index), device)
    out[key] = [hashlib.sha256(a.tobytes()).hexdigest() for a in (image.rgb, image.mask)]
print(json.dumps(out))
"""


def _digests(ph: ModuleType) -> dict[str, tuple[str, str]]:
    spec = ph.PhantomSpec(**PINNED_SPEC)
    out = {}
    for key in PINNED:
        device, index = key.split("/")
        image = ph.generate_image(spec, int(index), device)
        assert image.rgb.shape == (120, 160, 3) and image.rgb.flags.c_contiguous and image.mask.any()
        out[key] = (
            hashlib.sha256(image.rgb.tobytes()).hexdigest(),
            hashlib.sha256(image.mask.tobytes()).hexdigest(),
        )
    return out


def test_pinned_checksums(ph: ModuleType) -> None:
    """The same images, bit for bit, on every machine and library build (see docs/phantom.md)."""
    assert ph.GENERATOR_VERSION == "2"  # the digests below belong to this version
    found = _digests(ph)
    for key, (rgb, mask) in PINNED.items():
        assert found[key][1] == mask, f"{key}: lesion mask differs from the pinned one"
        assert found[key][0] == rgb, f"{key}: image bytes differ from the pinned ones"


def test_bits_do_not_depend_on_numpy_simd_kernels(ph: ModuleType) -> None:
    """Another CPU, emulated: numpy with every run-time dispatched SIMD target disabled.

    (The float32 generator of version 1 failed this: most images moved by one grey level
    in a few pixels.)
    """
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    available = [name for name in __cpu_dispatch__ if __cpu_features__.get(name)]
    if not available:
        pytest.skip("this CPU has no SIMD targets beyond numpy's baseline to switch off")
    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES=" ".join(available))
    result = subprocess.run(
        [sys.executable, "-c", DIGEST_SCRIPT, json.dumps(PINNED_SPEC), json.dumps(list(PINNED))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    other = {key: tuple(value) for key, value in json.loads(result.stdout.splitlines()[-1]).items()}
    assert other == _digests(ph), f"with {available} disabled the images differ"


def test_stablemath_is_accurate_and_platform_independent(ph: ModuleType) -> None:
    from bench.phantom import stablemath as sm

    x = np.linspace(-60.0, 60.0, 20001)
    sin, cos = sm.sincos(x)
    assert np.abs(sin - np.sin(x)).max() < 1e-15 and np.abs(cos - np.cos(x)).max() < 1e-15
    y = np.random.default_rng(0).standard_normal((2, 5000)) * np.array([[1e-3], [1e3]])
    assert np.abs(sm.atan2(y[0], y[1]) - np.arctan2(y[0], y[1])).max() < 2e-15
    assert np.abs(sm.atan2(y[1], y[0]) - np.arctan2(y[1], y[0])).max() < 2e-15
    e = np.linspace(-30.0, 30.0, 2001)
    assert np.abs(sm.exp(e) / np.exp(e) - 1.0).max() < 1e-15
    assert (
        sm.atan2(0.0, 0.0) == 0.0 and sm.atan2(0.0, -1.0) == math.pi and sm.atan2(-1.0, 0.0) == -math.pi / 2
    )
    assert isinstance(sm.cos(0.5), float) and sm.cos(0.0) == 1.0 and sm.exp(0.0) == 1.0
    # Only correctly rounded operations: these are the bits on every IEEE-754 machine.
    pinned = {
        sm.sin(1.0): "0x1.aed548f090ceep-1",
        sm.cos(2.5): "-0x1.9a2f7ef858b7dp-1",
        sm.sin(-40.0): "-0x1.7d7f78e027f00p-1",
        sm.atan2(1.0, 3.0): "0x1.4978fa3269ee1p-2",
        sm.atan2(-2.0, -0.5): "-0x1.d0d6a1369bd34p+0",
        sm.exp(0.7): "0x1.01c2a61268986p+1",
        sm.exp(-3.3): "0x1.2e259bb85be85p-5",
    }
    assert {value.hex(): text for value, text in pinned.items()} == {text: text for text in pinned.values()}
    # Scalars and arrays take the same path.
    assert sm.sin(np.array([1.0]))[0] == sm.sin(1.0)


def test_same_call_is_bit_identical_and_seed_matters(ph: ModuleType, spec) -> None:
    from bench.phantom import bmode, generator

    index = lesion_indices(spec, Label.MALIGNANT)[0]
    firsts = {}
    for device in ph.DEVICES:
        first = ph.generate_image(spec, index, device)
        second = ph.generate_image(spec, index, device)
        assert first.rgb.dtype == np.uint8 and first.rgb.ndim == 3 and first.rgb.shape[2] == 3
        assert first.mask.dtype == bool and first.mask.shape == first.rgb.shape[:2]
        assert np.array_equal(first.rgb, second.rgb) and np.array_equal(first.mask, second.mask)
        assert first.anatomy == second.anatomy
        firsts[device] = first
    # Nothing depends on what was computed before (cached layouts, FFT plans, tables).
    ph.layout.cache_clear()
    bmode._transfer.cache_clear()
    generator._tint_table.cache_clear()
    for device in reversed(ph.DEVICES):
        again = ph.generate_image(spec, index, device)
        assert np.array_equal(again.rgb, firsts[device].rgb) and np.array_equal(
            again.mask, firsts[device].mask
        )
    other = ph.generate_image(ph.PhantomSpec.per_class(N_PER_CLASS, seed=8), index, "device-a")
    base = ph.generate_image(spec, index, "device-a")
    assert not np.array_equal(other.rgb, base.rgb)
    assert other.anatomy["lesion"] != base.anatomy["lesion"]


def test_case_numbering_is_independent_of_other_counts(ph: ModuleType) -> None:
    small = ph.PhantomSpec(normal=1, benign=2, malignant=1, seed=3)
    large = ph.PhantomSpec(normal=5, benign=3, malignant=2, seed=3)
    # benign case 1 is index 2 in `small` and index 6 in `large`: the same breast.
    assert small.case(2) == large.case(6) == (Label.BENIGN, 1)
    a = ph.generate_image(small, 2, "device-c")
    b = ph.generate_image(large, 6, "device-c")
    assert np.array_equal(a.rgb, b.rgb)
    with pytest.raises(IndexError):
        small.case(small.total)


def test_anatomy_is_shared_across_devices(ph: ModuleType, spec) -> None:
    """Same (seed, index): same class, lesion parameters, and the same lesion in millimetres."""
    for label in (Label.BENIGN, Label.MALIGNANT):
        index = lesion_indices(spec, label)[1]
        images = {name: ph.generate_image(spec, index, name) for name in ph.DEVICES}
        anatomies = [
            {k: v for k, v in im.anatomy.items() if k not in ("device", "callipers")}
            for im in images.values()
        ]
        assert all(a == anatomies[0] for a in anatomies)
        assert all(im.label is label for im in images.values())
        shapes = {im.rgb.shape for im in images.values()}
        assert len(shapes) == len(images)  # every device has its own image size
        areas, centres = [], []
        for name, image in images.items():
            lay = ph.layout(ph.DEVICES[name])
            assert image.mask.any()
            areas.append(image.mask.sum() * lay.px_mm**2)
            centres.append((lay.s[image.mask].mean(), lay.d[image.mask].mean()))
        areas_arr = np.array(areas)
        # Physical lesion area agrees to a few percent (pixel discretisation and the convex
        # probe's curvature change it slightly), and so does its position in the breast.
        assert areas_arr.max() / areas_arr.min() < 1.12, areas
        centres_arr = np.array(centres)
        assert np.ptp(centres_arr, axis=0).max() < 1.0, centres


# --------------------------------------------------------------------------- classes and masks


def test_class_and_mask_consistency(ph: ModuleType, spec) -> None:
    for index in range(spec.total):
        image = ph.generate_image(spec, index, "device-a" if index % 2 else "device-b")
        lay = ph.layout(ph.get_device(image.device))
        label, _ = spec.case(index)
        assert image.label is label
        if label is Label.NORMAL:
            assert not image.mask.any()
            assert image.anatomy["lesion"] is None
            continue
        assert image.mask.any()
        assert not (image.mask & ~lay.inside).any()  # lesions lie inside the field of view
        components, count = ndimage.label(image.mask, structure=np.ones((3, 3)))
        sizes = np.bincount(components.ravel())[1:]
        assert sizes.max() >= 0.95 * image.mask.sum(), f"{index}: lesion split into {count} parts"


def test_lesion_region_is_exactly_the_mask(ph: ModuleType, spec) -> None:
    """On a linear probe the simulated grid is the display grid: the scatterers that carry the
    lesion's echogenicity are exactly the mask pixels, and hypoechoic lesions are darker inside."""
    from bench.phantom.anatomy import lesion_region

    checked_dark = 0
    for index in lesion_indices(spec, Label.BENIGN) + lesion_indices(spec, Label.MALIGNANT):
        image = ph.generate_image(spec, index, "device-c", return_envelope=True, return_maps=True)
        assert np.array_equal(image.maps["lesion"], image.mask)
        lesion = image.model.lesion
        # ... and it is the lesion region evaluated afresh on the display pixels.
        lay = ph.layout(ph.DEVICES["device-c"])
        rho = lesion_region(lesion, ph.DEVICES["device-c"], lay.x, lay.z)[0]
        assert np.array_equal((rho < 1.0) & lay.inside, image.mask)
        assert image.envelope.dtype == np.float64 and image.maps["echo_db"].dtype == np.float64
        inside_echo = image.maps["echo_db"][image.mask]
        ring = ndimage.binary_dilation(image.mask, iterations=6) & ~image.mask
        if lesion.echo_db < -10 and lesion.echo_pattern != "complex cystic/solid":
            # Scatterer strength inside is the lesion's level (+- its texture), not the tissue's.
            assert np.median(inside_echo) < np.median(image.maps["echo_db"][ring]) - 5
            assert image.envelope[image.mask].mean() < 0.7 * image.envelope[ring].mean()
            checked_dark += 1
    assert checked_dark >= 2


def test_calcifications_lie_inside_the_lesion(ph: ModuleType) -> None:
    found = 0
    for case in range(150):
        lesion = ph.sample_anatomy(Label.MALIGNANT, seed=5, case=case).lesion
        for u, w, _ in lesion.calcifications:
            un, wn = u / lesion.half_width, w / lesion.half_height
            assert math.hypot(un, wn) < 0.71 * lesion.radius(np.array([math.atan2(wn, un)]))[0]
            found += 1
    assert found > 50


def test_overlays_do_not_touch_the_mask(ph: ModuleType, spec) -> None:
    index = lesion_indices(spec, Label.MALIGNANT)[0]
    for device in ph.DEVICES:
        plain = ph.generate_image(spec, index, device, overlays=False)
        dressed = ph.generate_image(spec, index, device)
        assert np.array_equal(plain.mask, dressed.mask)
        assert not np.array_equal(plain.rgb, dressed.rgb)  # labels and ruler are drawn
        # Outside the field of view the plain image is black.
        assert plain.rgb[~ph.layout(ph.DEVICES[device]).inside].max() == 0


def test_feature_distributions_overlap(ph: ModuleType) -> None:
    """Descriptors are drawn from overlapping class distributions (numbers in docs/phantom.md)."""
    n = 300
    found: dict[Label, dict[str, float]] = {}
    for label in (Label.BENIGN, Label.MALIGNANT):
        lesions = [ph.sample_anatomy(label, seed=11, case=k).lesion for k in range(n)]
        found[label] = {
            "irregular": np.mean([x.shape == "irregular" for x in lesions]),
            "oval_or_round": np.mean([x.shape != "irregular" for x in lesions]),
            "taller": np.mean([x.orientation == "not parallel" for x in lesions]),
            "shadow": np.mean([x.posterior_db < 0 for x in lesions]),
            "circumscribed": np.mean([not x.margins for x in lesions]),
        }
    benign, malignant = found[Label.BENIGN], found[Label.MALIGNANT]
    assert 0.18 < benign["irregular"] < 0.4  # some benign lesions look malignant
    assert 0.1 < malignant["oval_or_round"] < 0.3  # and some cancers look benign
    assert benign["taller"] < malignant["taller"] < 0.6
    assert 0.05 < benign["shadow"] < malignant["shadow"] < 0.6
    assert malignant["circumscribed"] < 0.2 < benign["circumscribed"]


# --------------------------------------------------------------------------- speckle


def test_envelope_is_fully_developed_speckle(ph: ModuleType) -> None:
    """Homogeneous scatterers give a Rayleigh envelope: mean/std = 1.91 before log compression."""
    assert abs(ph.RAYLEIGH_SNR - 1.913) < 1e-3
    for name in ("device-a", "device-b", "device-c"):
        device = ph.DEVICES[name]
        lay = ph.layout(device)
        env = ph.simulate_iq_envelope(
            device, None, np.ones(lay.beam_d.shape, dtype=np.float32), np.random.default_rng(1)
        )
        snr = env.mean() / env.std()
        assert abs(snr - ph.RAYLEIGH_SNR) < 0.1, (name, snr)
    # The full generator on a homogeneous calibration phantom: a band around the focus.
    device = ph.DEVICES["device-a"]
    lay = ph.layout(device)
    image = ph.render(ph.uniform_anatomy(), device, return_envelope=True)
    band = lay.inside & (np.abs(lay.d - device.focus_mm) < 4) & (np.abs(lay.s) < 18)
    values = image.envelope[band]
    assert abs(values.mean() / values.std() - ph.RAYLEIGH_SNR) < 0.15
    # Spatial compounding averages partly decorrelated speckle: smoother than Rayleigh.
    compound = ph.DEVICES["device-d"]
    env = ph.simulate_iq_envelope(
        compound, None, np.ones(ph.layout(compound).beam_d.shape, dtype=np.float32), np.random.default_rng(1)
    )
    assert env.mean() / env.std() > ph.RAYLEIGH_SNR + 0.05


def _half_width(envelope: np.ndarray, axis: int) -> float:
    """Lag (samples, interpolated) where the mean autocorrelation along ``axis`` drops to 0.5."""
    x = envelope - envelope.mean()
    spectrum = np.fft.fft(x, axis=axis)
    ac = np.fft.ifft(np.abs(spectrum) ** 2, axis=axis).real
    ac = ac.mean(axis=1 - axis)
    ac = ac / ac[0]
    k = int(np.argmax(ac < 0.5))
    return (k - 1) + (ac[k - 1] - 0.5) / (ac[k - 1] - ac[k])


# --------------------------------------------------------------------------- devices


def test_devices_differ_measurably(ph: ModuleType, spec) -> None:
    assert len(ph.DEVICES) >= 4
    assert {d.geometry for d in ph.DEVICES.values()} == {"linear", "convex"}
    # Speckle size: lateral autocorrelation width (mm) of the 4.5 MHz convex vs the 14 MHz linear.
    widths = {}
    for name in ("device-b", "device-c"):
        device = ph.DEVICES[name]
        lay = ph.layout(device)
        env = ph.simulate_iq_envelope(
            device, None, np.ones(lay.beam_d.shape, np.float32), np.random.default_rng(2)
        )
        widths[name] = (_half_width(env, 1) * lay.dx, _half_width(env, 0) * lay.dz)
    assert widths["device-b"][0] > 2.0 * widths["device-c"][0], widths
    assert widths["device-b"][1] > 1.5 * widths["device-c"][1], widths  # axial grain is pixel-limited

    # Same breasts, different machines: grey-level histograms and colour differ.
    hists: dict[str, np.ndarray] = {}
    tints: dict[str, np.ndarray] = {}
    for name in ph.DEVICES:
        grey, colour = [], []
        for index in range(0, spec.total, 2):
            image = ph.generate_image(spec, index, name)
            grey.append(grey_in_fov(ph, image))
            colour.append(image.rgb[ph.layout(ph.DEVICES[name]).inside].reshape(-1, 3).mean(axis=0))
        hist = np.bincount(np.concatenate(grey) // 8, minlength=32).astype(float)
        hists[name] = hist / hist.sum()
        tints[name] = np.mean(colour, axis=0)
    names = list(ph.DEVICES)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            distance = 0.5 * np.abs(hists[a] - hists[b]).sum()  # total variation, in [0, 1]
            assert distance > 0.15, (a, b, distance)
    ratios = {name: tint[2] / tint[0] for name, tint in tints.items()}  # blue / red
    assert ratios["device-c"] > 1.1 > 1.0 > ratios["device-b"] + 0.15


def test_device_geometry(ph: ModuleType) -> None:
    convex = ph.layout(ph.DEVICES["device-b"])
    linear = ph.layout(ph.DEVICES["device-a"])
    # A fan: black corners at the top, the field of view widens with depth.
    rows = np.flatnonzero(convex.inside.any(axis=1))
    top_width = convex.inside[rows[0] + 5].sum()
    mid_width = convex.inside[(rows[0] + rows[-1]) // 2].sum()
    assert mid_width > 1.3 * top_width
    # A rectangle for the linear probe.
    cols = linear.inside.sum(axis=0)
    assert set(np.unique(cols[cols > 0]).tolist()) == {int(cols.max())}
    # Size override keeps the physical field of view and rescales pixels.
    small = ph.layout(ph.DEVICES["device-a"], (224, 168))
    assert small.shape == (168, 224) and small.px_mm > 1.9 * linear.px_mm
    image = ph.generate_image(ph.PhantomSpec(normal=0, benign=1, malignant=0, size=(224, 168)), 0, "device-a")
    assert image.rgb.shape == (168, 224, 3) and image.mask.any()


# --------------------------------------------------------------------------- dataset provider and export


def test_spec_parsing_and_names(ph: ModuleType) -> None:
    device, spec = ph.parse_phantom_spec("phantom")
    assert device.name == "device-a" and spec == ph.PhantomSpec()
    assert ph.dataset_name(device, spec) == "phantom-device-a"
    device, spec = ph.parse_phantom_spec("Phantom:DEVICE-B?n=20&seed=3&size=256")
    assert device.name == "device-b"
    assert spec.counts() == dict.fromkeys(CLASSES, 20) and spec.seed == 3 and spec.size == (256, 256)
    assert ph.dataset_name(device, spec) == "phantom-device-b-n20-seed3-size256"
    device, spec = ph.parse_phantom_spec("phantom:device-c?n=5&benign=2&size=400x300")
    assert (spec.normal, spec.benign, spec.malignant, spec.size) == (5, 2, 5, (400, 300))
    assert spec.seed == ph.default_seed(device) == 2  # one cohort of breasts per device by default
    assert ph.dataset_name(device, spec) == "phantom-device-c-normal5-benign2-malignant5-size400x300"
    for bad in ("phantom:device-z", "phantom?n=x", "phantom?colour=red", "phantom?size=big", "phantom?n"):
        with pytest.raises(DatasetError):
            ph.parse_phantom_spec(bad)


def test_dataset_provider_generates_once(
    ph: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv(ph.CACHE_ENV, str(cache))
    dataset = resolve_dataset("phantom:device-b?n=2&malignant=3", tmp_path / "data")
    assert dataset.name == "phantom-device-b-normal2-benign2-malignant3"
    assert dataset.counts() == {Label.NORMAL: 2, Label.BENIGN: 2, Label.MALIGNANT: 3}
    assert dataset.problems == []
    assert dataset.root.parent == cache and dataset.root.name.startswith("device-b_")
    assert [p.name for p in cache.iterdir()] == [dataset.root.name]  # no temporary folder left
    sample = dataset["malignant/malignant (2)"]
    assert sample.metadata["device"] == "device-b" and "shape" in sample.metadata
    mask = eval_mask(sample, 64)
    assert mask.usable and mask.mask.any()
    assert not eval_mask(dataset["normal/normal (1)"], 64).mask.any()
    # The stored image is what the generator makes (default seed of device-b: its number - 1).
    spec = ph.PhantomSpec(normal=2, benign=2, malignant=3, seed=ph.default_seed(ph.DEVICES["device-b"]))
    generated = ph.generate_image(spec, 2 + 2 + 1, "device-b")
    assert np.array_equal(load_rgb(sample.image_path), generated.rgb)
    assert np.array_equal(load_mask(sample), generated.mask)

    keys = {s.id: file_key(s.image_path) for s in dataset.samples}
    stamps = {s.id: s.image_path.stat().st_mtime_ns for s in dataset.samples}
    again = resolve_dataset("phantom:device-b?n=2&malignant=3", tmp_path / "data")
    assert again.root == dataset.root and [s.id for s in again.samples] == [s.id for s in dataset.samples]
    assert {s.id: s.image_path.stat().st_mtime_ns for s in again.samples} == stamps  # nothing rewritten
    assert {s.id: file_key(s.image_path) for s in again.samples} == keys
    other = resolve_dataset("phantom:device-b?n=2&malignant=3&seed=9", tmp_path / "data")
    assert other.root != dataset.root and other.name.endswith("-seed9")
    assert len(list(cache.iterdir())) == 2


def test_export_busi_layout(ph: ModuleType, tmp_path: Path) -> None:
    out = ph.export_busi_layout(
        tmp_path / "busi", "device-d", {"normal": 2, "benign": 1, "malignant": 2}, seed=4
    )
    assert out == tmp_path / "busi"
    assert sorted(p.name for p in out.iterdir()) == ["benign", "malignant", "normal", "phantom.json"]
    assert (out / "benign" / "benign (1).png").is_file() and (
        out / "benign" / "benign (1)_mask.png"
    ).is_file()
    dataset = read_busi(out, name="exported")
    assert dataset.counts() == {Label.NORMAL: 2, Label.BENIGN: 1, Label.MALIGNANT: 2}
    assert dataset.problems == []
    for sample in dataset.samples:
        with Image.open(sample.mask_paths[0]) as im:
            assert im.mode == "L"
            levels = set(np.unique(np.asarray(im)).tolist())
        assert levels <= {0, 255}
        assert (255 in levels) == sample.is_lesion  # normal images have an all-zero mask
        assert load_rgb(sample.image_path).shape == (320, 448, 3)
    info = json.loads((out / "phantom.json").read_text())
    assert info["generator_version"] == ph.GENERATOR_VERSION and info["device"]["name"] == "device-d"
    assert len(info["images"]) == 5 and info["images"][2]["descriptors"]["shape"]
    with pytest.raises(FileExistsError):
        ph.export_busi_layout(out, "device-d", 1)
    with pytest.raises(DatasetError, match="not an empty folder"):  # the CLI prints DatasetErrors cleanly
        ph.export_busi_layout(out, "device-d", 1)
    with pytest.raises(DatasetError, match="unknown phantom device"):
        ph.export_busi_layout(tmp_path / "other", "device-z", 1)
    with pytest.raises(DatasetError, match="at least one image"):
        ph.export_busi_layout(tmp_path / "other", "device-a", 0)
    assert [p.name for p in tmp_path.iterdir()] == ["busi"]  # no temporary folder left behind


def test_generator_version_is_in_the_cache_key(ph: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.phantom import dataset as phantom_data

    device, spec = ph.parse_phantom_spec("phantom:device-a?n=1")
    key = phantom_data._cache_key(device, spec)
    monkeypatch.setattr(phantom_data, "GENERATOR_VERSION", ph.GENERATOR_VERSION + "-changed")
    assert phantom_data._cache_key(device, spec) != key
    assert len(key) == 16
