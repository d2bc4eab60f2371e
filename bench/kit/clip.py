"""The frozen CLIP every method shares (``ctx.backbone``): preprocessing, cached features, text side.

:class:`Backbone` wraps an open_clip model in eval mode with every parameter frozen. It is
never mutated: forward variants run on read-only :class:`~bench.kit.tower.VisionTower`
views of the image tower (one per input size), and prompt learning goes through
:meth:`Backbone.encode_embeddings`, which takes the learnable parts as arguments.

Preprocessing (explicit, identical for every method — a known source of silent
discrepancies between papers): the WHOLE image is resized to a square ``S x S`` with PIL
bicubic resampling (antialiased when shrinking), aspect ratio NOT kept and nothing cropped
(open_clip's eval transform centre-crops, which would cut off image borders that anomaly
maps must cover); grey/RGBA inputs become RGB; values are scaled to [0, 1] and normalised
with the model's mean/std. :meth:`Backbone.preprocessing_id` spells this out and is part
of every cache key.

Image features come from declared requests (:class:`~bench.kit.requests.FeatureRequest`):
:meth:`Backbone.features` computes each (image, request) once, stores it as fp16 in a
:class:`~bench.feature_cache.FeatureCache` folder keyed by the backbone's identity and the
request, and returns float32 tensors on the device; a freshly computed batch is rounded
through fp16 the same way, so cache hits and misses are bit-identical.
:meth:`Backbone.image_features` is the ``standard`` request at the run's ``--layers`` and
``--input-size``: ``embeds`` (B, D; ``encode_image``, not normalised), ``cls_tokens``
(B, L, W) and ``patch_tokens`` (B, L, N, W), raw residual stream after each block (no
``ln_post``, no ``proj``). :meth:`Backbone.project_tokens` maps raw tokens into the joint
space (``ln_post`` then ``@ proj``).

Every cache this backbone opens (feature requests, augmented views) is counted in
:meth:`Backbone.cache_stats`, which the run summary reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from PIL import Image

from bench.errors import BackboneError
from bench.feature_cache import CacheStats, FeatureCache, default_cache_dir
from bench.kit.requests import FeatureRequest, Features
from bench.kit.tower import VisionTower
from bench.kit.variants import get_variant
from bench.results import BackboneIdentity
from bench.types import ImageItem

#: Prompts per text-encoder call (bounds memory).
_TEXT_CHUNK = 256


def default_layers(depth: int) -> tuple[int, ...]:
    """Evenly spaced quarters of ``depth`` blocks: 24 -> (5, 11, 17, 23), 12 -> (2, 5, 8, 11)."""
    if depth < 4:
        return tuple(range(depth))
    return tuple(sorted({depth * k // 4 - 1 for k in range(1, 5)}))


class Backbone:
    """A frozen open_clip ViT with cached feature requests and prompt-learning access."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        model_name: str,
        weights: str,
        device: torch.device,
        layers: Sequence[int] | None = None,
        cache_dir: Path | None = None,
        batch_size: int = 32,
        init: str | None = None,
    ) -> None:
        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise BackboneError(
                f"{model_name}: only open_clip VisionTransformer image towers are supported "
                f"(got {type(visual).__name__}); use a ViT-* model"
            )
        if visual.attn_pool is not None or visual.pool_type != "tok" or visual.proj is None:
            raise BackboneError(
                f"{model_name}: the image tower must pool the class token and project it "
                f"(attn_pool={visual.attn_pool is not None}, pool_type={visual.pool_type!r}); use a CLIP ViT"
            )
        if visual.image_size[0] != visual.image_size[1]:
            raise BackboneError(f"{model_name}: non-square input {visual.image_size} is not supported")
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.model_name = model_name
        self.weights_warning: str | None = None
        self.device = device
        self.model = model.to(device)
        self.batch_size = int(batch_size)
        self._visual: VisionTransformer = visual
        self.depth = len(visual.transformer.resblocks)
        self.layers: tuple[int, ...] = (
            self._check_layers(layers) if layers is not None else default_layers(self.depth)
        )
        self.input_size = int(visual.image_size[0])
        self._towers: dict[tuple[int, str], VisionTower] = {}
        tower = self.tower()
        self.grid, self.n_patches = tower.grid, tower.n_patches
        self.width, self.embed_dim = tower.width, tower.embed_dim

        # text tower (CLIP keeps it on the model itself, CustomTextCLIP under .text)
        text = getattr(model, "text", None)
        self._text_owner = text if isinstance(text, TextTransformer) else model
        self._prompt_learning_ok = self._text_owner is model or (
            text.cls_emb is None and not text.use_pad_mask  # type: ignore[union-attr]
        )
        token_embedding = getattr(self._text_owner, "token_embedding", None)
        self.text_width = int(token_embedding.embedding_dim) if token_embedding is not None else 0
        self.text_depth = len(self._text_owner.transformer.resblocks) if self.text_width else 0
        self.context_length = int(getattr(model, "context_length", 0) or getattr(text, "context_length", 77))
        self._tokenizer = open_clip.get_tokenizer(model_name)
        self.logit_scale = (
            float(model.logit_scale.detach().exp().item()) if hasattr(model, "logit_scale") else 100.0
        )

        cfg = visual.preprocess_cfg
        self.mean = tuple(float(v) for v in cfg["mean"])
        self.std = tuple(float(v) for v in cfg["std"])
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        self.preprocessing_id = self.preprocessing_for(self.input_size)
        self.identity = BackboneIdentity(
            model=model_name, weights=weights, input_size=self.input_size, layers=self.layers
        )
        self._weights = weights
        self._init = init
        self.cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self._caches: dict[Any, FeatureCache] = {}
        self._extra_caches: list[FeatureCache] = []
        #: Images pushed through the frozen tower for the run's standard request.
        self.n_encoded = 0
        #: Images pushed through the frozen tower per request (cache misses).
        self.encoded_by_request: dict[FeatureRequest, int] = {}
        self.cache = self._cache_for(self.resolve(FeatureRequest()))

    def _check_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        result = tuple(sorted(int(i) for i in layers))
        if not result or len(set(result)) != len(result) or result[0] < 0 or result[-1] >= self.depth:
            raise BackboneError(
                f"layers {list(layers)} must be distinct 0-based block indices in [0, {self.depth - 1}] "
                f"for {self.model_name}"
            )
        return result

    # -- bookkeeping --------------------------------------------------------------------
    def cache_stats(self) -> CacheStats:
        """Hits, misses, corrupt entries and writes summed over EVERY cache this backbone opened."""
        total = CacheStats()
        for cache in [*self._caches.values(), *self._extra_caches]:
            s = cache.stats()
            total.hits += s.hits
            total.misses += s.misses
            total.corrupt += s.corrupt
            total.writes += s.writes
            total.corrupt_keys.extend(s.corrupt_keys)
        return total

    @property
    def cache_hits(self) -> int:
        return self.cache_stats().hits

    @property
    def cache_misses(self) -> int:
        return self.cache_stats().misses

    def register_cache(self, config: Mapping[str, Any], length: int, subdir: str = "") -> FeatureCache:
        """A cache for other frozen outputs of this backbone (e.g. augmented views), counted in
        :meth:`cache_stats`; ``config`` is added to the backbone's own description."""
        key = ("extra", subdir, repr(sorted(config.items())), int(length))
        if key not in self._caches:
            folder = self.cache_root / subdir if subdir else self.cache_root
            cache = FeatureCache(folder, {**self.describe(), **config}, length)
            self._caches[key] = cache
        return self._caches[key]

    def describe(self, input_size: int | None = None, resize: str = "bicubic") -> dict[str, Any]:
        """The backbone's identity as a cache configuration (model, weights, preprocessing, sizes)."""
        tower = self.tower(input_size, resize)
        config: dict[str, Any] = {
            "model": self.model_name,
            "weights": self._weights,
            "input_size": tower.input_size,
            "preprocessing": self.preprocessing_for(tower.input_size),
            "embed_dim": tower.embed_dim,
            "width": tower.width,
            "grid": list(tower.grid),
            "dtype": "float16",
        }
        if self._init is not None:
            config["init"] = self._init
        if not tower.native:
            # a resized embedding differs from one the model was built with at that size
            native = "x".join(str(int(v)) for v in self._visual.grid_size)
            how = "bicubic, antialiased" if tower.resize == "bicubic" else tower.resize
            config["positional_embedding"] = f"resized from {native} ({how})"
        return config

    def __repr__(self) -> str:
        return f"Backbone({self.identity.label}, layers={self.layers}, device={self.device})"

    # -- image side ---------------------------------------------------------------------
    def tower(self, input_size: int | None = None, resize: str = "bicubic") -> VisionTower:
        """The frozen image tower at ``input_size`` (default: the run's); read-only. ``resize``:
        how the positional embedding is resized when the size is not the model's own."""
        size = self.input_size if input_size is None else int(input_size)
        if size == self.input_size:
            resize = "bicubic"  # the model's own embedding: nothing is resized
        if (size, resize) not in self._towers:
            try:
                self._towers[(size, resize)] = VisionTower(self._visual, size, resize)
            except ValueError as exc:
                raise BackboneError(f"{self.model_name}: {exc}") from exc
        return self._towers[(size, resize)]

    def preprocessing_for(self, size: int) -> str:
        fmt = ",".join
        return (
            f"whole-image-squash:pil-bicubic:{size}x{size}:rgb01:"
            f"mean={fmt(f'{v:.6g}' for v in self.mean)}:std={fmt(f'{v:.6g}' for v in self.std)}"
        )

    def preprocess(self, rgb: np.ndarray, size: int | None = None) -> torch.Tensor:
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
        size = self.input_size if size is None else int(size)
        image = Image.fromarray(np.ascontiguousarray(array))
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return ((tensor - self._mean) / self._std).contiguous()

    def resolve(self, request: FeatureRequest) -> FeatureRequest:
        """``request`` with the run's layers and input size filled in, checked against the model."""
        layers = self.layers if request.layers is None else self._check_layers(request.layers)
        size = self.input_size if request.input_size is None else int(request.input_size)
        resize = "bicubic" if size == self.input_size else request.resize
        resolved = FeatureRequest(request.variant, layers, size, request.options, resize)
        try:
            get_variant(request.variant).check(self.tower(size, resize), layers, resolved)
        except ValueError as exc:
            raise BackboneError(f"feature request {request}: {exc} ({self.model_name})") from exc
        return resolved

    def tower_for(self, request: FeatureRequest) -> VisionTower:
        """The tower a request runs on (its grid, width, ...), without computing anything."""
        resolved = self.resolve(request)
        return self.tower(resolved.input_size, resolved.resize)

    def _cache_for(self, request: FeatureRequest) -> FeatureCache:
        if request not in self._caches:
            variant = get_variant(request.variant)
            tower = self.tower(request.input_size, request.resize)
            assert request.layers is not None
            shapes = variant.fields(tower, request.layers, request)
            length = sum(math.prod(shape) for shape in shapes.values())
            base = self.describe(request.input_size, request.resize)
            config = variant.cache_config(base, tower, request.layers, request)
            folder = self.cache_root / variant.cache_subdir if variant.cache_subdir else self.cache_root
            self._caches[request] = FeatureCache(folder, config, length)
        return self._caches[request]

    def features(self, items: Sequence[ImageItem], request: FeatureRequest | None = None) -> Features:
        """Frozen features of ``items`` for ``request`` (cached on disk; only misses are computed)."""
        request = self.resolve(request or FeatureRequest())
        assert request.layers is not None and request.input_size is not None
        variant = get_variant(request.variant)
        tower = self.tower(request.input_size, request.resize)
        shapes = variant.fields(tower, request.layers, request)
        cache = self._cache_for(request)
        items = list(items)

        def compute(chunk: list[ImageItem]) -> np.ndarray:
            batch = torch.stack([self.preprocess(item.rgb(), request.input_size) for item in chunk])
            with torch.inference_mode():
                out = variant.compute(tower, batch.to(self.device), request.layers, request)
                flat = torch.cat([out[name].float().reshape(len(chunk), -1) for name in shapes], dim=1)
            self.encoded_by_request[request] = self.encoded_by_request.get(request, 0) + len(chunk)
            if request == self._standard:
                self.n_encoded += len(chunk)
            return flat.cpu().numpy()

        rows = cache.rows(items, compute, self.batch_size, f"{request.variant} features")
        fields: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape in shapes.items():
            size = math.prod(shape)
            values = np.empty((len(items), *shape), dtype=np.float32)
            for i, item in enumerate(items):
                values[i] = rows[item.key][offset : offset + size].reshape(shape)
            fields[name] = torch.from_numpy(values).to(self.device)
            offset += size
        return Features(fields=fields, grid=tower.grid, layers=request.layers)

    @property
    def _standard(self) -> FeatureRequest:
        return FeatureRequest("standard", self.layers, self.input_size)

    def image_features(self, items: Sequence[ImageItem]) -> Features:
        """The ``standard`` request at the run's layers and input size (``embeds``, ``cls_tokens``,
        ``patch_tokens``)."""
        return self.features(items)

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raw width-W tokens (any leading shape) -> joint space D: ``ln_post(tokens) @ proj``."""
        if tokens.shape[-1] != self.width:
            raise ValueError(f"project_tokens expects last dim {self.width}, got {tuple(tokens.shape)}")
        return self.tower().project(tokens)

    def proj(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens @ proj`` WITHOUT ``ln_post`` (AnomalyCLIP's official global image feature)."""
        return self.tower().proj(tokens)

    def ln_post(self, tokens: torch.Tensor) -> torch.Tensor:
        """The image tower's final layer norm (no projection), on tokens of any leading shape."""
        return self.tower().ln_post(tokens)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``encode_image`` of preprocessed images (B, 3, S, S) -> (B, D), no gradient, not cached
        (augmented views that are cached by their caller)."""
        with torch.no_grad():
            return self.model.encode_image(images.to(self.device)).float()

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

    def encode_embeddings(
        self,
        embeddings: torch.Tensor,
        token_ids: torch.Tensor,
        *,
        deep_prompts: Mapping[int, torch.Tensor] | None = None,
        deep_start: int = 1,
        shallow_prompts: torch.Tensor | None = None,
        final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the frozen text transformer on (possibly learnable) token embeddings.

        ``embeddings`` (n, ctx, text_width) replace the token lookup; ``token_ids`` (n, ctx)
        only locate the pooling (EOT) position as open_clip does. ``deep_prompts[l]`` (P, W) or
        (n, P, W): learnable tokens that REPLACE positions ``deep_start .. deep_start + P - 1`` of
        the stream entering text block ``l`` (l >= 1; AnomalyCLIP's / VCP-CLIP's deep text
        prompts). ``shallow_prompts`` (P, W) or (n, P, W): tokens INSERTED at those positions of
        the stream entering block 0, AFTER the positional embedding is added (they carry none;
        the tokens from ``deep_start`` on move P places right and keep their own positional
        embeddings); the stream is then cut to the context length (its last tokens dropped) and
        the pooled EOT position moves with its token (VCP-CLIP's VPT-style text prompts).
        ``final_norm``: applied to the stream after the last block, before ``ln_final``
        (VCP-CLIP's trainable ``prompt_norm``). Returns (n, D), not normalised; gradients flow
        to ``embeddings``, the prompts and ``final_norm``, never into backbone parameters.
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
        token_ids = token_ids.to(x.device)
        if shallow_prompts is not None:
            x, token_ids = self._insert_shallow_prompts(x, token_ids, shallow_prompts, deep_start)
            ctx = x.shape[1]
        attn_mask = owner.attn_mask
        if attn_mask is not None:
            attn_mask = attn_mask[:ctx, :ctx]
        if not deep_prompts:
            x = transformer(x, attn_mask=attn_mask)
        else:
            x = self._deep_text_forward(x, attn_mask, deep_prompts, deep_start)
        if final_norm is not None:
            x = final_norm(x)
        x = owner.ln_final(x)
        if owner is self.model:
            pool_type, eos_id = self.model.text_pool_type, getattr(self.model, "text_eos_id", None)
        else:
            pool_type, eos_id = owner.pool_type, getattr(owner, "eos_id", None)
        x = text_global_pool(x, token_ids, pool_type, eos_token_id=eos_id)
        projection = owner.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
        return x.float()

    def _insert_shallow_prompts(
        self, x: torch.Tensor, token_ids: torch.Tensor, prompts: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompts`` put into the positioned stream ``x`` at ``start`` (see :meth:`encode_embeddings`)."""
        if prompts.dim() == 2:
            prompts = prompts.unsqueeze(0).expand(x.shape[0], -1, -1)
        if prompts.dim() != 3 or prompts.shape[0] != x.shape[0] or prompts.shape[2] != x.shape[2]:
            raise ValueError(
                f"shallow prompts must be (P, {x.shape[2]}) or ({x.shape[0]}, P, {x.shape[2]}), "
                f"got {tuple(prompts.shape)}"
            )
        n_prompts = int(prompts.shape[1])
        length = min(x.shape[1] + n_prompts, self.context_length)
        if not 1 <= start < x.shape[1]:
            raise ValueError(f"shallow prompts cannot go at position {start} of a {x.shape[1]}-token text")
        x = torch.cat([x[:, :start], prompts.to(x.dtype), x[:, start:]], dim=1)[:, :length]
        pad = token_ids.new_zeros(token_ids.shape[0], n_prompts)
        moved = torch.cat([token_ids[:, :start], pad, token_ids[:, start:]], dim=1)
        if bool((moved.argmax(dim=-1) >= length).any()):
            raise ValueError(
                f"{n_prompts} shallow prompt token(s) push the end-of-text token past the context "
                f"length {length}"
            )
        return x, moved[:, :length]

    def _deep_text_forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        deep_prompts: Mapping[int, torch.Tensor],
        deep_start: int,
    ) -> torch.Tensor:
        transformer = self._text_owner.transformer
        if not transformer.batch_first:
            raise BackboneError(f"{self.model_name}: deep text prompts need a batch-first text transformer")
        blocks = transformer.resblocks
        bad = sorted(layer for layer in deep_prompts if not 1 <= int(layer) < len(blocks))
        if bad:
            raise ValueError(f"deep prompt layers {bad} are outside 1..{len(blocks) - 1}")
        for index, block in enumerate(blocks):
            prompt = deep_prompts.get(index)
            if prompt is not None:
                if prompt.dim() == 2:
                    prompt = prompt.unsqueeze(0).expand(x.shape[0], -1, -1)
                end = deep_start + int(prompt.shape[1])
                if deep_start < 1 or end > x.shape[1]:
                    raise ValueError(
                        f"deep prompt of {prompt.shape[1]} tokens does not fit a {x.shape[1]}-token text"
                    )
                x = torch.cat([x[:, :deep_start], prompt.to(x.dtype), x[:, end:]], dim=1)
            x = block(x, attn_mask=attn_mask)
        return x

    def _require_prompt_learning(self) -> None:
        if not self._prompt_learning_ok or self.text_width == 0:
            raise BackboneError(
                f"{self.model_name}: prompt learning needs a standard open_clip text transformer "
                "(no Hugging Face text tower, no appended class token)"
            )
