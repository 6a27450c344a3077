"""Networks of the study models: SmallCNN, ConvNeXt (+ attention) in 2D/3D."""

from __future__ import annotations

from monai_gamverify.networks.heads import find_classifier_head, init_from_checkpoint, widen_classifier
from monai_gamverify.networks.nets import (
    ChannelSpatialAttention,
    ConvNeXt,
    ConvNeXtAttention,
    ConvNeXtBlock,
    ConvNeXtStage,
    LayerNormChannelsFirst,
    SmallCNN,
    channel_norm,
    convnext_attn_nano,
    convnext_attn_pico,
    convnext_nano,
    convnext_pico,
    convnext_tiny,
)

__all__ = [
    "LayerNormChannelsFirst",
    "channel_norm",
    "ConvNeXtBlock",
    "ChannelSpatialAttention",
    "ConvNeXtStage",
    "ConvNeXt",
    "ConvNeXtAttention",
    "convnext_pico",
    "convnext_nano",
    "convnext_tiny",
    "convnext_attn_pico",
    "convnext_attn_nano",
    "SmallCNN",
    "find_classifier_head",
    "widen_classifier",
    "init_from_checkpoint",
]
