"""AdaCLIP's learnable parts and its hybrid semantic fusion (``method/adaclip.py`` of caoyunkang/AdaCLIP).

:class:`HybridPrompts` holds everything AdaCLIP trains, and nothing of CLIP:

- static prompts (``PromptLayer``): per prompted block one (length, channel) tensor, N(0, 0.02²);
  visual ones for blocks ``0 .. depth-1`` (width W), text ones for blocks ``1 .. depth-1``
  (text width; the official text block 0 gets none, so its tensor is never used and is not
  created here);
- dynamic prompt generators (``ProjectLayer(num_replicas=length, stack=True)``): ``length``
  independent ``Linear(D -> channel)`` on the image's class feature, stacked to (B, length,
  channel); the same dynamic prompt is added to the static one of every prompted block;
- the per-layer patch projections ``Linear(W -> D)`` (``patch_token_layer``) and the class
  projection ``Linear(D -> D)`` (``cls_token_layer``).

:func:`hybrid_semantic_fusion` is the official (code's, not the paper's) HSF: k-means of the
most anomalous tokens, the mean of the cluster centres.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn


def _static(count: int, length: int, channel: int, init_std: float) -> nn.ParameterList:
    return nn.ParameterList(
        nn.Parameter(nn.init.normal_(torch.empty(length, channel), std=init_std)) for _ in range(count)
    )


def _generator(length: int, in_dim: int, out_dim: int) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(in_dim, out_dim) for _ in range(length))


class HybridPrompts(nn.Module):
    """Static + dynamic visual and text prompts, patch and class projections (module docstring).

    ``static`` / ``dynamic`` are the official ``prompting_type`` 'S' / 'D', ``visual`` / ``text``
    its ``prompting_branch`` 'V' / 'L'. Build it under :func:`bench.kit.seeded` for a seeded
    initialisation; parameters are created in the official order (text prompter, visual
    prompter, patch layers, class layer, visual generator, text generator).
    """

    def __init__(
        self,
        *,
        width: int,
        text_width: int,
        embed_dim: int,
        n_layers: int,
        length: int,
        depth: int,
        static: bool = True,
        dynamic: bool = True,
        visual: bool = True,
        text: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if not (static or dynamic):
            raise ValueError("HybridPrompts needs static or dynamic prompts (or both)")
        self.length, self.depth = int(length), int(depth)
        self.static, self.dynamic = bool(static), bool(dynamic)
        self.visual_branch, self.text_branch = bool(visual), bool(text)
        self.static_text = _static(depth - 1 if text and static else 0, length, text_width, init_std)
        self.static_visual = _static(depth if visual and static else 0, length, width, init_std)
        self.patch_proj = nn.ModuleList(nn.Linear(width, embed_dim) for _ in range(n_layers))
        self.cls_proj = nn.Linear(embed_dim, embed_dim)
        self.visual_generator = _generator(length if visual and dynamic else 0, embed_dim, width)
        self.text_generator = _generator(length if text and dynamic else 0, embed_dim, text_width)

    @staticmethod
    def _dynamic(generator: nn.ModuleList, image: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(image) for head in generator], dim=1)  # (B, length, channel)

    def _context(self, static: torch.Tensor | None, dynamic: torch.Tensor | None) -> torch.Tensor:
        if static is not None and dynamic is not None:
            return dynamic + static  # (B, P, C): the official dynamic + expanded static
        out = static if static is not None else dynamic
        assert out is not None
        return out

    def visual_prompts(self, image: torch.Tensor) -> dict[int, torch.Tensor] | None:
        """Tokens entering image blocks ``0 .. depth-1`` ((B, P, W) or (P, W)); None without visual prompts.

        ``image`` (B, D) is the frozen unprompted image embedding (``encode_image``, not normalised).
        """
        if not self.visual_branch or self.depth < 1:
            return None
        dynamic = self._dynamic(self.visual_generator, image) if self.dynamic else None
        return {
            block: self._context(self.static_visual[block] if self.static else None, dynamic)
            for block in range(self.depth)
        }

    def text_prompts(self, image: torch.Tensor) -> dict[int, torch.Tensor] | None:
        """Tokens replacing positions 1..P entering text blocks ``1 .. depth-1``; None when there are none."""
        if not self.text_branch or self.depth < 2:
            return None
        dynamic = self._dynamic(self.text_generator, image) if self.dynamic else None
        return {
            block: self._context(self.static_text[block - 1] if self.static else None, dynamic)
            for block in range(1, self.depth)
        }

    def project(self, patch_tokens: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw patch tokens (B, L, N, W) and the prompted pooled feature (B, D) -> normalised
        (class feature (B, D), patch features (B, L, N, D))."""
        patches = torch.stack([proj(patch_tokens[:, i]) for i, proj in enumerate(self.patch_proj)], dim=1)
        return F.normalize(self.cls_proj(image), dim=-1), F.normalize(patches, dim=-1)


def hybrid_semantic_fusion(
    patches: torch.Tensor,
    logits: torch.Tensor,
    k_clusters: int,
    tokens_per_cluster: int,
    seed: int,
) -> torch.Tensor:
    """The official HSF: (B, D) normalised, differentiable through the selected tokens.

    ``patches`` (B, L, N, D) normalised patch features, ``logits`` (B, L, N, 2) their scaled
    text logits. Per image: the anomaly probability ``softmax(mean over layers of the logits)[1]``;
    the ``k = min(N, tokens_per_cluster * k_clusters)`` most anomalous tokens (the same indices
    at every layer); k-means (``sklearn.cluster.KMeans(k_clusters, n_init="auto")``, k-means++,
    ``random_state=seed``) on their layer features concatenated along channels (k, L * D);
    each cluster's centre = mean of its members' tokens of ALL layers; the result = the
    normalised (unweighted) mean of the centres. Clusters left empty (fewer distinct tokens than
    clusters) are skipped, where the official code would average a NaN.
    """
    batch, n_layers, n_tokens, dim = patches.shape
    probability = torch.softmax(logits.mean(dim=1), dim=-1)[..., 1]  # (B, N)
    k = min(n_tokens, tokens_per_cluster * k_clusters)
    top = torch.topk(probability, k=k, dim=1).indices  # (B, k)
    index = top[:, None, :, None].expand(-1, n_layers, -1, dim)
    selected = patches.gather(2, index)  # (B, L, k, D)
    fused = []
    for b in range(batch):
        data = selected[b].permute(1, 0, 2).reshape(k, n_layers * dim)  # layers side by side
        labels = KMeans(n_clusters=k_clusters, n_init="auto", random_state=seed).fit_predict(
            data.detach().cpu().numpy().astype(np.float32)
        )
        members = F.one_hot(torch.as_tensor(labels, device=patches.device).long(), k_clusters)
        members = members.to(patches.dtype)  # (k, K)
        counts = members.sum(dim=0)
        per_token = selected[b].mean(dim=0)  # (k, D): mean over the layers of each selected token
        centres = (members.T @ per_token) / counts.clamp(min=1.0)[:, None]  # (K, D)
        fused.append(centres[counts > 0].mean(dim=0))
    return F.normalize(torch.stack(fused), dim=-1)
