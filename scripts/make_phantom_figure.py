"""Draw the phantom overview figure: one image per class (columns) for every device (rows).

Each column shows the same breast (same anatomy seed and case) on every device, with the
ground-truth lesion contour drawn thinly in red. Usage::

    .venv/bin/python scripts/make_phantom_figure.py docs/phantom.png

The PNG is palette-quantised to stay small (well under 300 KB).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from PIL import Image

from bench.phantom import DEVICES, generate_image, sample_anatomy
from bench.phantom.generator import PhantomSpec
from bench.types import CLASSES, Label


def pick_cases(seed: int) -> dict[Label, int]:
    """Typical cases: first normal; oval circumscribed hypo/anechoic benign; shadowing spiculated cancer."""
    picks = {Label.NORMAL: 0}
    for k in range(200):
        d = sample_anatomy(Label.BENIGN, seed, k).lesion.descriptors()
        typical = d["shape"] == "oval" and d["margin"] == "circumscribed"
        if (
            typical
            and d["echo_pattern"] in ("anechoic", "hypoechoic")
            and d["posterior_features"] == "enhancement"
        ):
            picks[Label.BENIGN] = k
            break
    for k in range(200):
        d = sample_anatomy(Label.MALIGNANT, seed, k).lesion.descriptors()
        if "spiculated" in d["margin"] and d["posterior_features"] == "shadowing":
            picks[Label.MALIGNANT] = k
            break
    picks.setdefault(Label.BENIGN, 0)
    picks.setdefault(Label.MALIGNANT, 0)
    return picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output PNG, e.g. docs/phantom.png")
    parser.add_argument("--seed", type=int, default=0, help="anatomy seed")
    parser.add_argument("--dpi", type=int, default=80)
    args = parser.parse_args()

    cases = pick_cases(args.seed)
    # A spec whose per-class case numbers reach the picked cases; index = offset + case.
    count = max(cases.values()) + 1
    spec = PhantomSpec(normal=count, benign=count, malignant=count, seed=args.seed)
    offsets = {Label.NORMAL: 0, Label.BENIGN: count, Label.MALIGNANT: 2 * count}

    devices = list(DEVICES.values())
    fig, axes = plt.subplots(len(devices), len(CLASSES), figsize=(8.4, 2.45 * len(devices)))
    for row, device in enumerate(devices):
        for col, label in enumerate(CLASSES):
            image = generate_image(spec, offsets[label] + cases[label], device)
            ax = axes[row, col]
            ax.imshow(image.rgb, interpolation="bilinear")
            if image.mask.any():
                ax.contour(
                    image.mask.astype(float), levels=[0.5], colors=["#ff3030"], linewidths=0.6, alpha=0.7
                )
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if row == 0:
                descriptors = image.anatomy.get("descriptors")
                extra = f"\n{descriptors['shape']}, {descriptors['margin']}" if descriptors else "\nno lesion"
                ax.set_title(f"{label.value} (case {cases[label]}){extra}", fontsize=8)
            if col == 0:
                ax.set_ylabel(
                    f"{device.name}\n{device.geometry}, {device.frequency_mhz:g} MHz\n"
                    f"{device.image_size[0]}x{device.image_size[1]}",
                    fontsize=8,
                )
    fig.suptitle(
        f"bench.phantom: same breasts (seed {args.seed}) on {len(devices)} simulated devices", fontsize=9
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98), h_pad=0.4, w_pad=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=args.dpi, format="png", facecolor="white")
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as rendered:
        small = rendered.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    small.save(args.out, optimize=True)
    chosen = ", ".join(f"{label.value} {case}" for label, case in cases.items())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB); cases: {chosen}")


if __name__ == "__main__":
    main()
