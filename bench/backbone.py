"""The shared frozen CLIP backbone: weights loading, preprocessing, cached features, text side.

Every CLIP-based method gets the same :class:`Backbone` (``ctx.backbone``): an open_clip
model in eval mode with every parameter frozen, plus a :class:`~bench.feature_cache.FeatureCache`
so an image is pushed through the vision tower once per feature configuration, however
many methods, shots, seeds and runs use it.

Preprocessing (explicit, identical for every method — a known source of silent
discrepancies between papers):

- the WHOLE image is resized to a square ``S x S`` (``S`` = :attr:`Backbone.input_size`)
  with PIL bicubic resampling (antialiased when shrinking), aspect ratio NOT kept and
  nothing cropped. open_clip's own eval transform resizes the short side and
  centre-crops; that would cut off image borders, and anomaly maps must cover the
  whole image, so we squash instead;
- grey/RGBA inputs become RGB (channel replicated / alpha dropped);
- values are scaled to [0, 1] and normalised with the mean/std of the model's
  preprocessing config (open_clip's, including the pretrained tag's overrides).

:attr:`Backbone.preprocessing_id` spells this out and is part of the cache key.

Vision features (:meth:`Backbone.image_features`), all float32 on the backbone device:

- ``embeds`` (B, D): what ``model.encode_image`` returns (pooled, projected, NOT normalised);
- ``cls_tokens`` (B, L, W): raw class token after each chosen block (no ln_post, no proj);
- ``patch_tokens`` (B, L, N, W): raw patch tokens after each chosen block, row-major over
  the ``grid`` (N = grid_h * grid_w).

``layers`` are 0-based transformer block indices, always stored sorted ascending (the
order open_clip returns them in); the default is evenly spaced quarters of the depth,
e.g. (5, 11, 17, 23) for 24 blocks. :meth:`Backbone.project_tokens` maps raw tokens into
the joint space (``ln_post`` then ``@ proj``); with the last block among the layers,
``project_tokens(cls_tokens[:, -1]) == embeds`` (up to the fp16 cache rounding).

Features are stored as fp16; a freshly computed batch is rounded the same way before it
is returned, so cache hits and misses give bit-identical tensors. Returned feature
tensors are ordinary tensors (not inference tensors) and may be used in autograd.

Weights (``BackboneSpec.pretrained``): an open_clip tag (``openai``,
``laion2b_s34b_b79k``, ...), a local checkpoint path, ``hf-hub:org/repo`` (weights of that
repo for the named architecture) or ``none`` (deterministic random init: pipeline smoke
tests only, numbers are meaningless). Weights are looked up in the local open_clip /
Hugging Face caches first; without network (or with ``HF_HUB_OFFLINE=1``) a missing file
fails within seconds with a :class:`~bench.errors.BackboneError` that says how to supply it.
A tag trained with QuickGELU on an architecture name that builds GELU (e.g. ``openai`` on
``ViT-L-14-336``) is refused with the ``-quickgelu`` name to use instead.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from PIL import Image

from bench.errors import BackboneError
from bench.feature_cache import CacheStats, FeatureCache
from bench.results import BackboneIdentity
from bench.types import ImageItem

log = logging.getLogger(__name__)

#: Folder of extra open_clip model configs shipped with the harness (e.g. ``bench-tiny-vit``).
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
#: Weights identity of random-init models.
RANDOM_INIT = "random-init"
#: ``--pretrained auto``: standard weights when available, else random init (loudly).
AUTO = "auto"
#: Seed under which every model is constructed (random init is reproducible across runs).
RANDOM_INIT_SEED = 0
#: Seconds to wait when probing whether a download host is reachable.
NETWORK_PROBE_TIMEOUT_S = 5.0
#: Suffixes that mark ``pretrained`` as a file path rather than a tag.
CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt", ".npz")
_TEXT_CHUNK = 256


def _register_model_configs() -> None:
    if MODEL_CONFIG_DIR.is_dir() and not all(
        open_clip.get_model_config(p.stem) is not None for p in MODEL_CONFIG_DIR.glob("*.json")
    ):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


_register_model_configs()


# ---------------------------------------------------------------------------------------
# spec and small helpers
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackboneSpec:
    """What backbone to build. ``layers=None`` = evenly spaced quarters of the depth."""

    model: str
    pretrained: str
    input_size: int | None = None
    layers: tuple[int, ...] | None = None
    cache_dir: Path | None = None
    device: str = "auto"
    #: Images per vision-tower forward pass when filling the cache.
    batch_size: int = 32


@dataclass(frozen=True)
class ImageFeatures:
    """Frozen vision features of B images (see the module docstring for shapes)."""

    embeds: torch.Tensor
    cls_tokens: torch.Tensor
    patch_tokens: torch.Tensor

    def __len__(self) -> int:
        return int(self.embeds.shape[0])


def default_layers(depth: int) -> tuple[int, ...]:
    """Evenly spaced quarters of ``depth`` blocks: 24 -> (5, 11, 17, 23), 12 -> (2, 5, 8, 11)."""
    if depth < 4:
        return tuple(range(depth))
    return tuple(sorted({depth * k // 4 - 1 for k in range(1, 5)}))


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` = CUDA when available, else CPU; anything else is passed to torch."""
    if isinstance(name, torch.device):
        return name
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise BackboneError(f"unknown device {name!r} ({exc}); use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def weights_help(model: str, pretrained: str | None) -> str:
    """How to supply missing weights (appended to every weights error)."""
    example = pretrained or "TAG"
    return (
        "How to supply the weights: (1) on a machine with internet run\n"
        f"    python -c \"import open_clip; open_clip.create_model('{model}', pretrained='{example}')\"\n"
        "  which downloads them into the open_clip / Hugging Face cache (~/.cache/huggingface/hub, or "
        "~/.cache/clip for URL weights; HF_HOME moves it), then copy that cache folder to the same place "
        "here; or (2) pass `--pretrained /path/to/checkpoint.bin` (an open_clip state dict: "
        ".bin/.pt/.pth/.safetensors); or (3) pass `--pretrained none` for deterministic random-init "
        "weights (pipeline smoke tests only: results are then meaningless)."
    )


def _offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if flag.strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub is an open_clip dependency
        return False


def _probe(url: str) -> str | None:
    """None if an HTTPS request to ``url`` gets any HTTP answer within a few seconds, else why not.

    One HEAD request, no retries (huggingface_hub retries a failing request for ~25 s per
    file, open_clip's urllib download has no timeout at all). Any HTTP status, even an
    error, proves the network works; DNS failures, refused or silent connections, TLS
    interception and proxy failures do not. Proxies come from the usual environment
    variables, certificates from the system store plus certifi.
    """
    context = ssl.create_default_context()
    try:
        import certifi

        context.load_verify_locations(certifi.where())
    except (ImportError, OSError):
        pass
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "ultraad-bench"})
    try:
        with opener.open(request, timeout=NETWORK_PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{urlparse(url).hostname} is not reachable ({reason})"


def _sha256_prefix(path: Path, n: int = 12) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:n]


def _looks_like_path(value: str) -> bool:
    return (
        "/" in value
        or "\\" in value
        or value.startswith(("~", "."))
        or value.lower().endswith(CHECKPOINT_SUFFIXES)
    )


# ---------------------------------------------------------------------------------------
# weights resolution (no network unless needed, fast failure without it)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Weights:
    identity: str
    checkpoint: str | None
    preprocess: dict[str, Any]
    #: Set when ``auto`` fell back to random init: shown loudly by the runner.
    warning: str | None = None


def _hf_candidates(filename: str) -> list[str]:
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    filename = filename or HF_WEIGHTS_NAME
    names = []
    if filename == HF_WEIGHTS_NAME:
        names.append(HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    names.append(filename)
    return names


def _hf_file(repo_id: str, filenames: Sequence[str], model: str, pretrained: str, what: str) -> str:
    """A local path to the first of ``filenames`` in ``repo_id``: cache first, then network."""
    try:
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    except ImportError as exc:  # pragma: no cover
        raise BackboneError(
            f"huggingface_hub is not installed, cannot fetch {what}. " + weights_help(model, pretrained)
        ) from exc
    for name in filenames:
        cached = try_to_load_from_cache(repo_id, name)
        if isinstance(cached, str) and os.path.isfile(cached):
            return cached
    if _offline():
        raise BackboneError(
            f"{what} ({repo_id}: {' or '.join(filenames)}) are not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set. " + weights_help(model, pretrained)
        )
    unreachable = _probe(constants.ENDPOINT)
    if unreachable:
        raise BackboneError(
            f"{what} ({repo_id}) are not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the "
            f"network is unavailable: {unreachable}. " + weights_help(model, pretrained)
        )
    errors = []
    for name in filenames:
        try:
            return hf_hub_download(repo_id=repo_id, filename=name)
        except Exception as exc:  # EntryNotFound for the safetensors variant is normal
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    raise BackboneError(
        f"could not download {what} from {repo_id} ({'; '.join(errors)}). " + weights_help(model, pretrained)
    )


def _url_file(url: str, model: str, pretrained: str) -> str:
    cache = Path(os.path.expanduser("~/.cache/clip"))
    target = cache / os.path.basename(urlparse(url).path)
    if target.is_file():
        return str(target)
    if _offline():
        raise BackboneError(
            f"weights {url} are not in the local cache ({target}) and HF_HUB_OFFLINE is set. "
            + weights_help(model, pretrained)
        )
    unreachable = _probe(url)
    if unreachable:
        raise BackboneError(
            f"weights {url} are not in the local cache ({target}) and the network is unavailable: "
            f"{unreachable}. " + weights_help(model, pretrained)
        )
    try:
        from open_clip.pretrained import download_pretrained_from_url

        return download_pretrained_from_url(url)
    except Exception as exc:
        raise BackboneError(f"could not download {url}: {exc}. " + weights_help(model, pretrained)) from exc


def _quickgelu_check(model: str, tag: str, model_cfg: dict[str, Any], tag_cfg: dict[str, Any]) -> None:
    wants = bool(tag_cfg.get("quick_gelu", False))
    has = bool(model_cfg.get("quick_gelu", False))
    if wants == has:
        return
    if wants:
        alternative = f"{model}-quickgelu"
        hint = (
            f"Use --backbone {alternative}"
            if alternative in open_clip.list_models()
            else "Use an architecture name ending in -quickgelu"
        )
        raise BackboneError(
            f"the {tag!r} weights were trained with QuickGELU activations but the architecture name "
            f"{model!r} builds plain GELU; loading them would silently degrade every feature. {hint} "
            f"(same weights, matching activation)."
        )
    base = model.removesuffix("-quickgelu")
    raise BackboneError(
        f"the {tag!r} weights were trained with plain GELU but {model!r} builds QuickGELU; "
        f"use --backbone {base} instead."
    )


def _tag_preprocess(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}


def _resolve_weights(spec: BackboneSpec, model_cfg: dict[str, Any]) -> _Weights:
    from open_clip.pretrained import _clean_tag, get_pretrained_cfg, list_pretrained_tags_by_model

    model, pretrained = spec.model, (spec.pretrained or "").strip()
    if pretrained.lower() in ("none", "random", "random-init", ""):
        return _Weights(RANDOM_INIT, None, {})
    if pretrained.lower() == AUTO:
        return _resolve_auto_weights(spec, model_cfg)

    if pretrained.startswith("hf-hub:"):
        repo = pretrained[len("hf-hub:") :].strip("/")
        if not repo:
            raise BackboneError(f"empty Hugging Face id in --pretrained {pretrained!r}; use hf-hub:org/repo")
        checkpoint = _hf_file(repo, _hf_candidates(""), model, pretrained, "weights")
        preprocess: dict[str, Any] = {}
        config_path = Path(checkpoint).with_name("open_clip_config.json")
        if config_path.is_file():
            try:
                repo_config = json.loads(config_path.read_text())
            except (OSError, ValueError) as exc:
                log.warning("cannot read %s (%s); using the model's default normalisation", config_path, exc)
            else:
                preprocess = _tag_preprocess(repo_config.get("preprocess_cfg", {}))
                repo_model_cfg = repo_config.get("model_cfg", {})
                if repo_model_cfg:  # absent quick_gelu = plain GELU, as in open_clip
                    _quickgelu_check(model, pretrained, model_cfg, repo_model_cfg)
        return _Weights(f"hf-hub:{repo}", checkpoint, preprocess)

    tag_cfg = get_pretrained_cfg(model, pretrained)
    if tag_cfg:
        _quickgelu_check(model, pretrained, model_cfg, tag_cfg)
        if "file" in tag_cfg:
            checkpoint = str(tag_cfg["file"])
        elif tag_cfg.get("hf_hub"):
            repo, filename = os.path.split(tag_cfg["hf_hub"])
            checkpoint = _hf_file(
                repo, _hf_candidates(filename), model, pretrained, f"weights for tag {pretrained!r}"
            )
        elif tag_cfg.get("url"):
            checkpoint = _url_file(tag_cfg["url"], model, pretrained)
        else:
            raise BackboneError(
                f"open_clip lists tag {pretrained!r} for {model} without a source. "
                + weights_help(model, pretrained)
            )
        return _Weights(_clean_tag(pretrained), checkpoint, _tag_preprocess(tag_cfg))

    path = Path(pretrained).expanduser()
    if path.is_file():
        return _Weights(f"file:{path.name}:{_sha256_prefix(path)}", str(path), {})
    if path.exists():
        raise BackboneError(
            f"--pretrained {pretrained} is a directory, not a checkpoint file. " + weights_help(model, None)
        )
    if _looks_like_path(pretrained):
        raise BackboneError(f"checkpoint file {path} does not exist. " + weights_help(model, None))
    tags = list_pretrained_tags_by_model(model)
    known = (
        f"known tags for {model}: {', '.join(tags)}"
        if tags
        else f"open_clip knows no pretrained tags for {model}"
    )
    raise BackboneError(
        f"--pretrained {pretrained!r} is neither a pretrained tag of {model} nor an existing file ({known}). "
        + weights_help(model, tags[0] if tags else None)
    )


def _resolve_auto_weights(spec: BackboneSpec, model_cfg: dict[str, Any]) -> _Weights:
    """``--pretrained auto``: the model's standard weights if cached or downloadable, else
    random init after a loud warning (the identity then says random-init everywhere)."""
    from open_clip.pretrained import list_pretrained_tags_by_model

    tags = list_pretrained_tags_by_model(spec.model)
    # OpenAI's weights are "the" CLIP weights where a model has them; otherwise open_clip's order.
    ordered = sorted(tags, key=lambda tag: tag != "openai")
    first_failure = ""
    for tag in ordered:
        try:
            return _resolve_weights(replace(spec, pretrained=tag), model_cfg)
        except BackboneError as exc:
            first_failure = first_failure or str(exc).split(" How to supply")[0]
    tried = f"tried {', '.join(ordered)}; first failure: {first_failure}" if ordered else "no known tags"
    warning = (
        f"--pretrained auto found no usable weights for {spec.model} ({tried}). FALLING BACK TO RANDOM "
        "INIT: CLIP-based results are meaningless and are labelled random-init in every result and table. "
        + weights_help(spec.model, ordered[0] if ordered else None)
    )
    log.warning(warning)
    return _Weights(RANDOM_INIT, None, {}, warning=warning)


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------
class _DropRandomInitWarning(logging.Filter):
    """Hides open_clip's "initialized randomly" warning when random init was asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def load_backbone(spec: BackboneSpec) -> Backbone:
    """Build the frozen backbone described by ``spec`` (fails fast with a BackboneError)."""
    if spec.model.startswith(("hf-hub:", "local-dir:")):
        raise BackboneError(
            f"--backbone {spec.model!r}: give an open_clip architecture name (e.g. ViT-B-16) and pass the "
            f"repository as weights: --pretrained {spec.model}"
        )
    model_cfg = open_clip.get_model_config(spec.model)
    if model_cfg is None:
        close = difflib.get_close_matches(spec.model, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
        raise BackboneError(f"unknown open_clip model {spec.model!r}{hint}")
    if spec.input_size is not None and spec.input_size < 16:
        raise BackboneError(f"input_size {spec.input_size} is too small")
    if spec.batch_size < 1:
        raise BackboneError(f"batch_size must be >= 1, got {spec.batch_size}")
    device = resolve_device(spec.device)
    weights = _resolve_weights(spec, model_cfg)

    quiet = _DropRandomInitWarning() if weights.checkpoint is None else None
    root = logging.getLogger()
    if quiet is not None:
        root.addFilter(quiet)
    try:
        # Constructed on CPU under a fixed seed (and without disturbing the global RNG), so
        # random-init weights, and anything a checkpoint does not cover, are reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(
                spec.model,
                pretrained=weights.checkpoint,
                load_weights=weights.checkpoint is not None,
                precision="fp32",
                device="cpu",
                force_image_size=spec.input_size,
                force_preprocess_cfg=weights.preprocess or None,
                pretrained_image=False,
                pretrained_text=False,
            )
    except BackboneError:
        raise
    except Exception as exc:
        raise BackboneError(
            f"cannot build {spec.model} with weights {weights.identity} ({type(exc).__name__}: {exc}); "
            "a checkpoint must be an open_clip state dict for exactly this architecture"
        ) from exc
    finally:
        if quiet is not None:
            root.removeFilter(quiet)
    backbone = Backbone(spec, model, weights.identity, device)
    backbone.weights_warning = weights.warning
    return backbone


class Backbone:
    """A frozen open_clip ViT with a feature cache and prompt-learning access (see module doc)."""

    def __init__(
        self, spec: BackboneSpec, model: torch.nn.Module, weights: str, device: torch.device
    ) -> None:
        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise BackboneError(
                f"{spec.model}: only open_clip VisionTransformer image towers are supported "
                f"(got {type(visual).__name__}); use a ViT-* model"
            )
        if visual.attn_pool is not None or visual.pool_type != "tok" or visual.proj is None:
            raise BackboneError(
                f"{spec.model}: the image tower must pool the class token and project it "
                f"(attn_pool={visual.attn_pool is not None}, pool_type={visual.pool_type!r}); use a CLIP ViT"
            )
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.spec = spec
        self.weights_warning: str | None = None
        self.device = device
        self.model = model.to(device)
        self.visual: VisionTransformer = visual

        depth = len(visual.transformer.resblocks)
        if spec.layers is None:
            layers = default_layers(depth)
        else:
            layers = tuple(sorted(int(i) for i in spec.layers))
            if not layers or len(set(layers)) != len(layers) or layers[0] < 0 or layers[-1] >= depth:
                raise BackboneError(
                    f"layers {spec.layers} must be distinct 0-based block indices in [0, {depth - 1}] "
                    f"for {spec.model}"
                )
        self.layers: tuple[int, ...] = layers
        self.depth = depth
        self.input_size = int(visual.image_size[0])
        if visual.image_size[0] != visual.image_size[1]:
            raise BackboneError(f"{spec.model}: non-square input {visual.image_size} is not supported")
        self.grid: tuple[int, int] = (int(visual.grid_size[0]), int(visual.grid_size[1]))
        self.n_patches = self.grid[0] * self.grid[1]
        self.width = int(visual.conv1.out_channels)
        self.embed_dim = int(visual.output_dim)

        # text tower (CLIP keeps it on the model itself, CustomTextCLIP under .text)
        text = getattr(model, "text", None)
        self._text_owner = text if isinstance(text, TextTransformer) else model
        self._prompt_learning_ok = self._text_owner is model or (
            text.cls_emb is None and not text.use_pad_mask  # type: ignore[union-attr]
        )
        token_embedding = getattr(self._text_owner, "token_embedding", None)
        self.text_width = int(token_embedding.embedding_dim) if token_embedding is not None else 0
        self.context_length = int(getattr(model, "context_length", 0) or getattr(text, "context_length", 77))
        self._tokenizer = open_clip.get_tokenizer(spec.model)

        cfg = visual.preprocess_cfg
        self.mean = tuple(float(v) for v in cfg["mean"])
        self.std = tuple(float(v) for v in cfg["std"])
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        fmt = ",".join
        self.preprocessing_id = (
            f"whole-image-squash:pil-bicubic:{self.input_size}x{self.input_size}:rgb01:"
            f"mean={fmt(f'{v:.6g}' for v in self.mean)}:std={fmt(f'{v:.6g}' for v in self.std)}"
        )
        self.identity = BackboneIdentity(
            model=spec.model, weights=weights, input_size=self.input_size, layers=self.layers
        )

        n_layers = len(self.layers)
        self._sizes = (self.embed_dim, n_layers * self.width, n_layers * self.n_patches * self.width)
        cache_config: dict[str, Any] = {
            "model": spec.model,
            "weights": weights,
            "input_size": self.input_size,
            "preprocessing": self.preprocessing_id,
            "layers": list(self.layers),
            "embed_dim": self.embed_dim,
            "width": self.width,
            "grid": list(self.grid),
            "dtype": "float16",
            "layout": "flat: embeds (D) | cls_tokens (L, W) | patch_tokens (L, N, W)",
        }
        if weights == RANDOM_INIT:
            # random init depends on the seed and on torch's RNG implementation
            cache_config["init"] = f"seed={RANDOM_INIT_SEED},torch={torch.__version__.split('+')[0]}"
        self.cache = FeatureCache(spec.cache_dir, cache_config, sum(self._sizes))
        self.n_encoded = 0

    # -- bookkeeping --------------------------------------------------------------------
    @property
    def cache_hits(self) -> int:
        return self.cache.stats().hits

    @property
    def cache_misses(self) -> int:
        return self.cache.stats().misses

    def cache_stats(self) -> CacheStats:
        return self.cache.stats()

    def __repr__(self) -> str:
        return f"Backbone({self.identity.label}, layers={self.layers}, device={self.device})"

    # -- image side ---------------------------------------------------------------------
    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) image -> float32 (3, S, S): whole image squashed, bicubic, normalised."""
        array = np.asarray(rgb)
        if array.dtype != np.uint8:
            raise TypeError(f"preprocess expects a uint8 image, got {array.dtype}")
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ValueError(f"preprocess expects an (H, W, 3) image, got shape {array.shape}")
        if array.shape[2] == 1:
            array = np.repeat(array, 3, axis=2)
        elif array.shape[2] == 4:
            array = array[:, :, :3]
        size = self.input_size
        image = Image.fromarray(np.ascontiguousarray(array))
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return ((tensor - self._mean) / self._std).contiguous()

    def _encode(self, items: Sequence[ImageItem]) -> np.ndarray:
        """Push ``items`` through the vision tower: (b, flat) float32 numpy."""
        batch = torch.stack([self.preprocess(item.rgb()) for item in items]).to(self.device)
        with torch.inference_mode():
            out = self.visual.forward_intermediates(
                batch,
                indices=list(self.layers),
                output_fmt="NLC",
                output_extra_tokens=True,
            )
            patches = out["image_intermediates"]
            prefix = out["image_intermediates_prefix"]
            if len(patches) != len(self.layers) or len(prefix) != len(self.layers):
                raise BackboneError(
                    f"open_clip returned {len(patches)} intermediates for layers {self.layers}"
                )
            embeds = out["image_features"].float()
            cls_tokens = torch.stack([p[:, 0] for p in prefix], dim=1).float()
            patch_tokens = torch.stack(patches, dim=1).float()
            flat = torch.cat([embeds, cls_tokens.flatten(1), patch_tokens.flatten(1)], dim=1)
        self.n_encoded += len(items)
        return flat.cpu().numpy()

    def image_features(self, items: Sequence[ImageItem]) -> ImageFeatures:
        """Frozen features of ``items`` (cached on disk; only misses are encoded, in batches)."""
        items = list(items)
        rows = self.cache.rows(items, self._encode, self.spec.batch_size, "features")

        n, n_layers = len(items), len(self.layers)
        d, cls_size, _ = self._sizes
        embeds = np.empty((n, self.embed_dim), dtype=np.float32)
        cls_tokens = np.empty((n, n_layers, self.width), dtype=np.float32)
        patch_tokens = np.empty((n, n_layers, self.n_patches, self.width), dtype=np.float32)
        for i, item in enumerate(items):
            row = rows[item.key]
            embeds[i] = row[:d]
            cls_tokens[i] = row[d : d + cls_size].reshape(n_layers, self.width)
            patch_tokens[i] = row[d + cls_size :].reshape(n_layers, self.n_patches, self.width)
        return ImageFeatures(
            embeds=torch.from_numpy(embeds).to(self.device),
            cls_tokens=torch.from_numpy(cls_tokens).to(self.device),
            patch_tokens=torch.from_numpy(patch_tokens).to(self.device),
        )

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raw width-W tokens (any leading shape) -> joint space D: ``ln_post(tokens) @ proj``."""
        if tokens.shape[-1] != self.width:
            raise ValueError(f"project_tokens expects last dim {self.width}, got {tuple(tokens.shape)}")
        return self.visual.ln_post(tokens) @ self.visual.proj

    # -- text side ----------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids (n, context_length), long, on the backbone device."""
        if isinstance(texts, str):
            texts = [texts]
        return self._tokenizer(list(texts)).to(self.device, dtype=torch.long)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Frozen text embeddings (n, D), float32, not normalised (``model.encode_text``)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.embed_dim, device=self.device)
        outputs = []
        with torch.no_grad():  # not inference_mode: callers may use the result in autograd
            for start in range(0, len(texts), _TEXT_CHUNK):
                ids = self.tokenize(texts[start : start + _TEXT_CHUNK])
                outputs.append(self.model.encode_text(ids).float())
        return torch.cat(outputs)

    def token_embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The frozen token-embedding lookup: (n, ctx) ids -> (n, ctx, text_width)."""
        self._require_prompt_learning()
        with torch.no_grad():
            return self._text_owner.token_embedding(token_ids.to(self.device)).float()

    def encode_embeddings(self, embeddings: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Run the frozen text transformer on (possibly learnable) token embeddings.

        ``embeddings`` (n, ctx, text_width) replace the token lookup; ``token_ids`` (n, ctx)
        only locate the pooling (EOT) position as open_clip does. Returns (n, D), not
        normalised; gradients flow to ``embeddings`` and never into backbone parameters.
        """
        self._require_prompt_learning()
        owner = self._text_owner
        if embeddings.ndim != 3 or embeddings.shape[-1] != self.text_width:
            raise ValueError(f"embeddings must be (n, ctx, {self.text_width}), got {tuple(embeddings.shape)}")
        if token_ids.shape != embeddings.shape[:2]:
            raise ValueError(
                f"token_ids {tuple(token_ids.shape)} must match embeddings {tuple(embeddings.shape[:2])}"
            )
        ctx = embeddings.shape[1]
        transformer = owner.transformer
        cast_dtype = transformer.get_cast_dtype()
        x = embeddings.to(cast_dtype) + owner.positional_embedding[:ctx].to(cast_dtype)
        attn_mask = owner.attn_mask
        if attn_mask is not None:
            attn_mask = attn_mask[:ctx, :ctx]
        x = transformer(x, attn_mask=attn_mask)
        x = owner.ln_final(x)
        if owner is self.model:
            pool_type, eos_id = self.model.text_pool_type, getattr(self.model, "text_eos_id", None)
        else:
            pool_type, eos_id = owner.pool_type, getattr(owner, "eos_id", None)
        x = text_global_pool(x, token_ids.to(x.device), pool_type, eos_token_id=eos_id)
        projection = owner.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
        return x.float()

    def _require_prompt_learning(self) -> None:
        if not self._prompt_learning_ok or self.text_width == 0:
            raise BackboneError(
                f"{self.spec.model}: prompt learning needs a standard open_clip text transformer "
                "(no Hugging Face text tower, no appended class token)"
            )


def normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """L2-normalise along ``dim`` (a convenience for methods)."""
    return F.normalize(x, dim=dim)
