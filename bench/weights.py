"""Weights resolution and backbone loading (harness side).

:func:`load_backbone` builds the frozen CLIP described by a :class:`BackboneSpec` and hands
it to the method toolkit's adapter (:class:`bench.kit.clip.Backbone`), which owns
preprocessing, cached features and the text side.

Weights (``BackboneSpec.pretrained``): an open_clip tag (``openai``,
``laion2b_s34b_b79k``, ...), a local checkpoint path, ``hf-hub:org/repo`` (weights of that
repo for the named architecture), ``auto`` (the model's standard weights when cached or
downloadable, else random init after a loud warning) or ``none`` (deterministic random
init: pipeline smoke tests only, numbers are meaningless). Weights are looked up in the
local open_clip / Hugging Face caches first; without network (or with
``HF_HUB_OFFLINE=1``) a missing file fails within seconds with a
:class:`~bench.errors.BackboneError` that says how to supply it. A tag trained with
QuickGELU on an architecture name that builds GELU (e.g. ``openai`` on ``ViT-L-14-336``) is
refused with the ``-quickgelu`` name to use instead.

Checkpoints are read as open_clip reads them (``torch.load(weights_only=True)``, or
safetensors). A file that is corrupt, truncated, not a checkpoint at all, or that holds
pickled Python objects besides tensors (refused: unpickling them can run arbitrary code)
fails with a :class:`~bench.errors.BackboneError` naming the file and the fix (re-download
it, or check the path). Loading is never retried with ``weights_only=False``, and torch's
advice to do so is never passed on.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import json
import logging
import os
import pickle
import re
import ssl
import traceback
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
import torch

from bench.errors import BackboneError
from bench.kit.clip import Backbone

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
        try:
            digest = _sha256_prefix(path)
        except OSError as exc:
            raise BackboneError(
                f"checkpoint file {path} cannot be read ({exc.strerror or exc}); check its permissions, "
                "or that --pretrained points to the right file"
            ) from exc
        return _Weights(f"file:{path.name}:{digest}", str(path), {})
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


def _raised_reading_checkpoint(exc: BaseException) -> bool:
    """Whether ``exc`` came from reading the checkpoint file (open_clip's ``load_state_dict``:
    ``torch.load`` or safetensors) rather than from fitting its tensors to the architecture."""
    reader = open_clip.factory.load_state_dict.__code__
    return any(frame.f_code is reader for frame, _ in traceback.walk_tb(exc.__traceback__))


def _raised_in_reader_itself(exc: BaseException) -> bool:
    """The innermost frame is open_clip's ``load_state_dict``: the file was read, but its
    content is not a mapping of names to tensors (e.g. a pickled tensor or an empty dict)."""
    frames = list(traceback.walk_tb(exc.__traceback__))
    return bool(frames) and frames[-1][0].f_code is open_clip.factory.load_state_dict.__code__


def _suggests_unsafe_loading(exc: BaseException) -> bool:
    return "weights_only" in str(exc)


#: torch's name for a global that ``weights_only`` unpickling refuses.
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
#: The part of torch's ``weights_only`` message that says what is wrong with the file.
_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+)")


def _describe(exc: BaseException) -> str:
    """``Type: first sentence of the message``, shortened, never with torch's unsafe-loading advice."""
    if _suggests_unsafe_loading(exc):
        detail = _UNPICKLER_DETAIL.search(str(exc))
        text = detail.group(1).strip() if detail else ""
    else:
        text = str(exc).strip()
    first_sentence = text.splitlines()[0].split(". ")[0].rstrip(".") if text else ""
    if not first_sentence and isinstance(exc, EOFError):
        first_sentence = "the file ends early"
    if len(first_sentence) > 200:
        first_sentence = first_sentence[:197] + "..."
    return f"{type(exc).__name__}: {first_sentence}" if first_sentence else type(exc).__name__


def _unreadable_checkpoint(weights: _Weights, exc: BaseException) -> BackboneError:
    """The error for a checkpoint file that torch / safetensors cannot read."""
    path = weights.checkpoint
    if weights.identity.startswith("file:"):
        fix = (
            "re-download it, or check that --pretrained points to the right file (an open_clip state "
            "dict: .bin/.pt/.pth/.safetensors)"
        )
    else:
        fix = (
            f"it is the downloaded copy of the {weights.identity} weights: delete it and run again to "
            "re-download it"
        )
    refused = _REFUSED_GLOBAL.search(str(exc))
    if isinstance(exc, pickle.UnpicklingError) and refused:
        why = (
            f"it holds pickled Python objects besides tensors ({refused.group(1)}), which are refused "
            "because unpickling them can run arbitrary code; it is probably a training checkpoint or a "
            "pickled model rather than a state dict"
        )
        fix = (
            "export only the weights (a state dict of tensors, or .safetensors) where the checkpoint was "
            f"made; otherwise {fix}"
        )
    elif isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM):
        why = f"it cannot be opened ({exc.strerror})"
        fix = f"check its permissions; otherwise {fix}"
    elif isinstance(exc, (AttributeError, StopIteration, TypeError)) and _raised_in_reader_itself(exc):
        why = "it does not hold a state dict (a mapping of parameter names to tensors)"
    else:
        why = f"it is corrupt, truncated or not a PyTorch/safetensors checkpoint ({_describe(exc)})"
    return BackboneError(f"checkpoint file {path} cannot be read: {why}. Fix: {fix}.")


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
        # torch's messages advise weights_only=False (unsafe); such a message is never chained
        cause = None if _suggests_unsafe_loading(exc) else exc
        if weights.checkpoint is not None and _raised_reading_checkpoint(exc):
            raise _unreadable_checkpoint(weights, exc) from cause
        detail = _describe(exc) if cause is None else f"{type(exc).__name__}: {exc}"
        raise BackboneError(
            f"cannot build {spec.model} with weights {weights.identity} ({detail}); "
            "a checkpoint must be an open_clip state dict for exactly this architecture"
        ) from cause
    finally:
        if quiet is not None:
            root.removeFilter(quiet)
    init = None
    if weights.identity == RANDOM_INIT:
        # random init depends on the seed and on torch's RNG implementation
        init = f"seed={RANDOM_INIT_SEED},torch={torch.__version__.split('+')[0]}"
    backbone = Backbone(
        model,
        model_name=spec.model,
        weights=weights.identity,
        device=device,
        layers=spec.layers,
        cache_dir=spec.cache_dir,
        batch_size=spec.batch_size,
        init=init,
    )
    backbone.weights_warning = weights.warning
    return backbone
