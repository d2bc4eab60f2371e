"""The method author's toolkit: everything a method uses, in one package, split by role.

A method imports from here (plus :mod:`bench.method` and :mod:`bench.types`) and nothing
else of the harness. Modules:

- :mod:`~bench.kit.clip`: the shared frozen CLIP (:class:`Backbone`, ``ctx.backbone``):
  preprocessing, cached feature requests, text side with deep prompts;
- :mod:`~bench.kit.requests`, :mod:`~bench.kit.variants`, :mod:`~bench.kit.tower`: declared
  feature requests, registered forward variants (``standard``, ``windows``, ``vv-attention``,
  ``stream``, plugins' own) and the read-only image tower they run on;
- :mod:`~bench.kit.trainable`: passes through the frozen tower under autograd (visual
  prompts, in-forward adapters) on a cached frozen prefix;
- :mod:`~bench.kit.prompts`, :mod:`~bench.kit.ensembles`: hand-written text classifiers, learnable
  prompt contexts, the published April-GAN / MVFA prompt ensemble;
- :mod:`~bench.kit.adapters`, :mod:`~bench.kit.maps`, :mod:`~bench.kit.losses`,
  :mod:`~bench.kit.memory`, :mod:`~bench.kit.views`: trainable blocks, anomaly maps,
  segmentation losses, memory/cache models, augmented views;
- :mod:`~bench.kit.training`: the one training loop and its seeded helpers;
- :mod:`~bench.kit.options`: the declarative option schema;
- :mod:`~bench.kit.classifier`: the few-shot classifier base.
"""

from bench.kit.adapters import LayerAdapters, MetaNet, PrototypeCrossAttention
from bench.kit.classifier import COOP_SCHEDULE, FewShotClassifier, common_options, prediction_from_logits
from bench.kit.clip import Backbone, default_layers
from bench.kit.ensembles import VAND_ABNORMAL_STATES, VAND_NORMAL_STATES, VAND_TEMPLATES, state_sentences
from bench.kit.losses import dice_loss, focal_loss
from bench.kit.maps import UPSAMPLE_ORDERS, gaussian_smooth, sigma_at, text_similarity_maps, upsample_grid
from bench.kit.memory import cache_logits, nearest_cosine_distance, nearest_distance, one_hot, support_labels
from bench.kit.options import Option, adam_options, feature_options, segmentation_loss_options
from bench.kit.prompts import (
    CLIP_TEMPLATE,
    DEFAULT_CLASS_NAMES,
    DEFAULT_TEMPLATES,
    POSITIONS,
    PromptLearner,
    class_names_option,
    class_prompts,
    names_in_class_order,
    templates_option,
    text_classifier,
    truncation_is_exact,
)
from bench.kit.requests import FeatureRequest, Features
from bench.kit.tower import AttentionWeights, BlockHook, VisionTower
from bench.kit.trainable import PassOutput, TrainablePass
from bench.kit.training import (
    Schedule,
    coop_epochs,
    cosine_per_step,
    epoch_batches,
    make_generator,
    seeded,
    train,
    warmup_cosine,
)
from bench.kit.variants import (
    ForwardVariant,
    get_variant,
    register_variant,
    variant_names,
    vv_attention,
    window_indices,
)
from bench.kit.views import Augmentation, augmented_embeds, view_stats

__all__ = [
    "CLIP_TEMPLATE",
    "COOP_SCHEDULE",
    "DEFAULT_CLASS_NAMES",
    "DEFAULT_TEMPLATES",
    "POSITIONS",
    "UPSAMPLE_ORDERS",
    "VAND_ABNORMAL_STATES",
    "VAND_NORMAL_STATES",
    "VAND_TEMPLATES",
    "AttentionWeights",
    "Augmentation",
    "Backbone",
    "BlockHook",
    "FeatureRequest",
    "Features",
    "FewShotClassifier",
    "ForwardVariant",
    "LayerAdapters",
    "MetaNet",
    "Option",
    "PassOutput",
    "PromptLearner",
    "PrototypeCrossAttention",
    "Schedule",
    "TrainablePass",
    "VisionTower",
    "adam_options",
    "augmented_embeds",
    "cache_logits",
    "class_names_option",
    "class_prompts",
    "common_options",
    "coop_epochs",
    "cosine_per_step",
    "default_layers",
    "dice_loss",
    "epoch_batches",
    "feature_options",
    "focal_loss",
    "gaussian_smooth",
    "get_variant",
    "make_generator",
    "names_in_class_order",
    "nearest_cosine_distance",
    "nearest_distance",
    "one_hot",
    "prediction_from_logits",
    "register_variant",
    "seeded",
    "segmentation_loss_options",
    "sigma_at",
    "state_sentences",
    "support_labels",
    "templates_option",
    "text_classifier",
    "text_similarity_maps",
    "train",
    "truncation_is_exact",
    "upsample_grid",
    "variant_names",
    "view_stats",
    "vv_attention",
    "warmup_cosine",
    "window_indices",
]
