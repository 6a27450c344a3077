"""ConvNeXt classifiers for 2D and 3D images, with an optional CBAM-style attention after each stage.

MONAI ships no classification ConvNeXt; the verification study's reference model is "ConvNeXt+Attn". Both
networks here are TorchScript-compatible (bundles export them with ``ckpt_export``) and use stable module names:

- ``stem``: patchify convolution + norm (``stem="patch"``, the paper), or overlapping strided convolution + norm +
  GELU (``stem="conv"``, the default of the pico/nano factories).
- ``stages.{i}``: stage ``i`` = ``downsample`` (identity for stage 0) -> ``blocks`` -> ``attn`` (identity without
  attention). The output of ``stages.{n-1}`` (``n = len(depths)``) is the Grad-CAM target (:attr:`cam_target_layer`);
  ``stages.0`` and ``stages.1`` are the early "layer 1 / layer 2" maps for feature-map verification
  (:attr:`feature_layers`).
- ``norm``: LayerNorm of the globally pooled features (the penultimate features), ``head_drop`` then ``head``: the
  only ``nn.Linear`` of the network and the last module, so K+1 widening finds it.

Training from scratch on small cohorts (why the pico/nano factories differ from the paper): BatchNorm instead of
LayerNorm, He init instead of trunc-normal(0.02), and an overlapping conv stem instead of the patchify stem.

- He init: with trunc-normal(0.02) and 16-64 channels the pre-BatchNorm activations have variance ~1e-4 while
  BatchNorm's ``running_var`` starts at 1 and forgets it with momentum 0.1 (0.9^k), so for the first ~10 epochs of a
  150-sample cohort (19 steps each) the eval-mode network divides by a variance orders of magnitude too large: training
  loss falls while eval accuracy stays at chance (toy problem of ``tests/test_networks.py``: training loss 0.005, eval
  accuracy on the same samples 0.50; with He init 0.96). The same init keeps GELU out of its linear regime, so
  the blocks are not near-linear at init.
- conv stem: the 2x2 non-overlapping patchify aliases the thin SOS cartilage plate (~2 voxels at 32^3) onto a
  subject-dependent patch grid; an overlapping stride-2 3x3 conv (as in :class:`SmallCNN`) generalises better.

Measured on SOS 32^3 (150 training subjects of ``generate("sos", 200, size=32, seed=0)``, 30 per stage; test
``generate("sos", 100, size=32, seed=1000)``), ``kernel_size=3``, AdamW lr 2e-3 wd 0.05, cosine over 20 epochs,
batch 8, random left-right flips, one seed, 1 CPU thread (a one-off script, not shipped); train/test = eval-mode
accuracy at epoch 12 / 20, chance 0.20:

=====================================================  ===========  ===========  =======
variant (``convnext_attn_pico`` unless said)            train        test         s (20 ep)
=====================================================  ===========  ===========  =======
LayerNorm, patchify, trunc-normal, ls 1e-6 (k=7)       0.20 (ep10)  0.20 (ep10)  190
BatchNorm, patchify, trunc-normal, ls 1e-6 (old)       0.38 / 0.84  0.30 / 0.45  114
  + layer_scale_init 1.0                               0.43 / 0.80  0.33 / 0.44  137
  + layer_scale_init 1.0 + He init                     0.60 / 0.84  0.30 / 0.30  104
BatchNorm, patchify, He init                           0.59 / 0.88  0.21 / 0.30  104
  same, ``convnext_pico``                               0.74 / 0.95  0.23 / 0.25   78
  same, no LayerNorm on the pooled features            0.63 / 0.76  0.29 / 0.31   97
BatchNorm, conv stem, He init (patched in)            0.67 / 0.83  0.46 / 0.53  107
  same, the new factory default (other init draw)      0.37 / 0.81  0.29 / 0.51  105
  + overlapping 3x3 stride-2 downsampling              0.71 / 0.88  0.57 / 0.57  165
:class:`SmallCNN` (54 k parameters)                     0.47 / 1.00  0.46 / 0.91   23
=====================================================  ===========  ===========  =======

The ConvNeXts now learn (no longer at chance) but overfit: they reach 0.5-0.6 test accuracy, not SmallCNN's 0.9.

Example:
    >>> net = convnext_attn_pico(spatial_dims=3, in_channels=1, out_channels=5)
    >>> net(torch.zeros(2, 1, 32, 32, 32)).shape
    torch.Size([2, 5])
    >>> net.cam_target_layer, net.feature_layers
    ('stages.2', ('stages.0', 'stages.1'))
"""

# long module: SmallCNN and the ConvNeXt family (blocks, stages, attention, factories) build on each other
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from monai.networks.layers import DropPath
from monai.networks.layers.factories import Conv
from torch import nn

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
]


def _check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return int(spatial_dims)


class LayerNormChannelsFirst(nn.Module):
    """LayerNorm over the channel axis of a (B, C, *spatial) tensor (the ConvNeXt "channels_first" norm).

    Args:
        spatial_dims: 2 or 3.
        channels: number of channels C.
        eps: added to the variance.

    Example:
        >>> LayerNormChannelsFirst(3, 8)(torch.randn(2, 8, 4, 4, 4)).shape
        torch.Size([2, 8, 4, 4, 4])
    """

    def __init__(self, spatial_dims: int, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        shape = (channels,) + (1,) * _check_spatial_dims(spatial_dims)
        # parameters already shaped for broadcasting: no reshape in forward, TorchScript-friendly
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def channel_norm(spatial_dims: int, channels: int, norm: str = "layer") -> nn.Module:
    """The per-position normalisation of ConvNeXt: ``"layer"`` (channels-first LayerNorm, as in the paper) or
    ``"batch"`` (BatchNorm, which the paper's ablation found within 0.1 % on ImageNet).

    The small factories use ``"batch"`` with He init (:class:`ConvNeXt` switches the init with the norm): BatchNorm
    with the paper's trunc-normal(0.02) init is at chance in eval mode for the first epochs (module docstring).

    Args:
        spatial_dims: 2 or 3.
        channels: number of channels.
        norm: ``"layer"`` or ``"batch"``.

    Example:
        >>> type(channel_norm(3, 8, "batch")).__name__
        'BatchNorm3d'
    """
    dims = _check_spatial_dims(spatial_dims)
    if norm == "layer":
        return LayerNormChannelsFirst(dims, channels)
    if norm == "batch":
        return (nn.BatchNorm2d, nn.BatchNorm3d)[dims - 2](channels)
    raise ValueError(f"norm must be 'layer' or 'batch', got {norm!r}")


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: depthwise conv -> LayerNorm -> 1x1 conv (4x) -> GELU -> 1x1 conv -> layer scale -> drop path.

    Pointwise layers are 1x1 convolutions (not ``nn.Linear``) so that the classifier head stays the only linear layer.

    Args:
        spatial_dims: 2 or 3.
        channels: input and output channels.
        kernel_size: depthwise kernel size (7 in ConvNeXt).
        mlp_ratio: expansion of the pointwise MLP.
        drop_path: stochastic-depth probability of the residual branch.
        layer_scale_init: initial value of the per-channel layer scale; ``0`` or ``None`` disables it.
        norm: ``"layer"`` or ``"batch"`` (:func:`channel_norm`).
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = 1e-6,
        norm: str = "layer",
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        hidden = max(int(round(channels * mlp_ratio)), 1)
        self.dwconv = conv(channels, channels, kernel_size=kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = channel_norm(spatial_dims, channels, norm)
        self.pwconv1 = conv(channels, hidden, kernel_size=1)
        self.act = nn.GELU()
        self.pwconv2 = conv(hidden, channels, kernel_size=1)
        self.use_scale = bool(layer_scale_init)
        shape = (channels,) + (1,) * spatial_dims
        self.gamma = nn.Parameter(torch.full(shape, float(layer_scale_init or 1.0)), requires_grad=self.use_scale)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))
        if self.use_scale:
            y = y * self.gamma
        return x + self.drop_path(y)


class ChannelSpatialAttention(nn.Module):
    """CBAM-style attention: channel gate from avg+max pooled features, then a spatial gate from channel avg+max.

    Args:
        spatial_dims: 2 or 3.
        channels: number of channels.
        reduction: channel reduction of the gate MLP.
        kernel_size: kernel of the spatial-gate convolution.

    Example:
        >>> ChannelSpatialAttention(2, 16)(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 16, 8, 8])
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 4, kernel_size: int = 7) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, _check_spatial_dims(spatial_dims)]
        hidden = max(channels // max(int(reduction), 1), 1)
        self.dims = list(range(2, 2 + spatial_dims))
        self.channel_mlp = nn.Sequential(
            conv(channels, hidden, kernel_size=1), nn.ReLU(), conv(hidden, channels, kernel_size=1)
        )
        self.spatial_conv = conv(2, 1, kernel_size=kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = x.mean(dim=self.dims, keepdim=True)
        mx = torch.amax(x, dim=self.dims, keepdim=True)
        x = x * torch.sigmoid(self.channel_mlp(avg) + self.channel_mlp(mx))
        pooled = torch.cat([x.mean(dim=1, keepdim=True), torch.amax(x, dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial_conv(pooled))


class ConvNeXtStage(nn.Module):
    """One stage: optional downsampling (LayerNorm + stride-2 conv), ConvNeXt blocks, optional attention."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: int,
        depth: int,
        downsample: bool,
        drop_paths: Sequence[float],
        layer_scale_init: float | None,
        kernel_size: int = 7,
        attention: bool = False,
        attention_reduction: int = 4,
        norm: str = "layer",
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        if downsample:
            self.downsample: nn.Module = nn.Sequential(
                channel_norm(spatial_dims, in_channels, norm), conv(in_channels, channels, kernel_size=2, stride=2)
            )
        elif in_channels != channels:
            raise ValueError(
                f"a stage without downsampling needs in_channels == channels, got {in_channels}/{channels}"
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *[
                ConvNeXtBlock(
                    spatial_dims,
                    channels,
                    kernel_size,
                    drop_path=drop_paths[j],
                    layer_scale_init=layer_scale_init,
                    norm=norm,
                )
                for j in range(depth)
            ]
        )
        self.attn: nn.Module = (
            ChannelSpatialAttention(spatial_dims, channels, reduction=attention_reduction)
            if attention
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.blocks(self.downsample(x)))


class ConvNeXt(nn.Module):
    """ConvNeXt classifier for 2D or 3D images (Liu et al., "A ConvNet for the 2020s", 2022), small by default.

    The defaults (3 stages of widths 16/32/64, stem stride 2) suit 32^3-64^3 volumes on a CPU and keep the last
    stage at 1/8 of the input size, so Grad-CAM maps still have structure. Use :func:`convnext_tiny` for the
    original ConvNeXt-T layout.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: number of classes (or regression outputs).
        depths: number of blocks per stage.
        widths: channels per stage (same length as ``depths``).
        stem_kernel: kernel size and stride of the patchify stem.
        kernel_size: depthwise kernel size of the blocks.
        drop_path_rate: stochastic depth, increased linearly over blocks from 0 to this value.
        layer_scale_init: initial layer-scale value (``0``/``None``: no layer scale).
        dropout_prob: dropout before the head.
        head_init_scale: multiplies the initial head weights.
        attention_reduction: channel reduction of the attention gates (:class:`ConvNeXtAttention`).
        norm: ``"layer"`` (the paper) or ``"batch"`` (:func:`channel_norm`; the small factories default to it).
            With ``"batch"`` the convolutions get He (kaiming-normal, fan-in) init instead of trunc-normal(0.02).
        stem: ``"patch"`` (the paper: ``stem_kernel``-sized non-overlapping patchify conv + norm) or ``"conv"``
            (overlapping ``2*(stem_kernel//2)+1`` conv with stride ``stem_kernel`` + norm + GELU; the small factories
            default to it, see the module docstring).

    Example:
        >>> net = ConvNeXt(spatial_dims=2, in_channels=1, out_channels=3)
        >>> net(torch.zeros(4, 1, 64, 64)).shape
        torch.Size([4, 3])
    """

    use_attention: bool = False
    # class-level helpers (Python only) are not compiled by TorchScript
    __jit_unused_properties__ = ["cam_target_layer", "feature_layers"]

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        depths: Sequence[int] = (1, 1, 2),
        widths: Sequence[int] = (16, 32, 64),
        stem_kernel: int = 2,
        kernel_size: int = 7,
        drop_path_rate: float = 0.0,
        layer_scale_init: float | None = 1e-6,
        dropout_prob: float = 0.0,
        head_init_scale: float = 1.0,
        attention_reduction: int = 4,
        norm: str = "layer",
        stem: str = "patch",
    ) -> None:
        super().__init__()
        _check_spatial_dims(spatial_dims)
        if stem not in ("patch", "conv"):
            raise ValueError(f"stem must be 'patch' or 'conv', got {stem!r}")
        depths, widths = [int(d) for d in depths], [int(w) for w in widths]
        if not depths or len(depths) != len(widths):
            raise ValueError(f"depths and widths must be non-empty and of equal length, got {depths} and {widths}")
        if min(depths) < 1 or min(widths) < 1:
            raise ValueError(f"depths and widths must be positive, got {depths} and {widths}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("stem_kernel", stem_kernel)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
        if not 0.0 <= drop_path_rate < 1.0 or not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"drop_path_rate and dropout_prob must be in [0, 1), got {drop_path_rate}, {dropout_prob}")
        self.spatial_dims = spatial_dims
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.num_stages = len(depths)
        self.norm_type = norm

        conv = Conv[Conv.CONV, spatial_dims]
        if stem == "patch":  # the paper: non-overlapping patchify convolution + norm
            self.stem = nn.Sequential(
                conv(in_channels, widths[0], kernel_size=stem_kernel, stride=stem_kernel),
                channel_norm(spatial_dims, widths[0], norm),
            )
        else:  # overlapping strided convolution + norm + GELU (kernel = smallest odd size >= stride)
            k = 2 * (int(stem_kernel) // 2) + 1
            self.stem = nn.Sequential(
                conv(in_channels, widths[0], kernel_size=k, stride=stem_kernel, padding=k // 2),
                channel_norm(spatial_dims, widths[0], norm),
                nn.GELU(),
            )
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, start = [], 0
        for i, (depth, width) in enumerate(zip(depths, widths)):
            stages.append(
                ConvNeXtStage(
                    spatial_dims,
                    widths[max(i - 1, 0)],
                    width,
                    depth,
                    downsample=i > 0,
                    drop_paths=rates[start : start + depth],
                    layer_scale_init=layer_scale_init,
                    kernel_size=kernel_size,
                    attention=self.use_attention,
                    attention_reduction=attention_reduction,
                    norm=norm,
                )
            )
            start += depth
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(widths[-1], eps=1e-6)
        self.head_drop = nn.Dropout(dropout_prob)
        self.head = nn.Linear(widths[-1], out_channels)  # registered last: the last nn.Linear in module order
        self.dims = list(range(2, 2 + spatial_dims))
        self._init_weights(head_init_scale)

    def _init_weights(self, head_init_scale: float) -> None:
        # BatchNorm starts with running_var = 1: the convolutions must then keep activations at unit scale (He init),
        # or the eval-mode network divides by a stale variance ~1e4 too large (see the module docstring)
        he = self.norm_type == "batch"
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                if he and not isinstance(m, nn.Linear):
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                else:
                    nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)

    @property
    def cam_target_layer(self) -> str:
        """Name of the last stage's output: the Grad-CAM target layer."""
        return f"stages.{self.num_stages - 1}"

    @property
    def feature_layers(self) -> tuple[str, ...]:
        """Names of the early "layer 1 / layer 2" outputs used for feature-map verification."""
        return tuple(f"stages.{i}" for i in range(min(2, self.num_stages)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (B, widths[-1], *spatial / (stem_kernel * 2**(n-1)))."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x).mean(dim=self.dims)  # global average pooling
        return self.head(self.head_drop(self.norm(x)))


class ConvNeXtAttention(ConvNeXt):
    """ConvNeXt with a CBAM-style channel + spatial attention at the end of every stage ("ConvNeXt+Attn").

    Same arguments and module names as :class:`ConvNeXt`; the attention of stage ``i`` is ``stages.{i}.attn``, so the
    Grad-CAM target ``stages.{n-1}`` sees the attended features.

    Example:
        >>> net = ConvNeXtAttention(spatial_dims=3, in_channels=1, out_channels=5)
        >>> net(torch.zeros(1, 1, 32, 32, 32)).shape
        torch.Size([1, 5])
    """

    use_attention: bool = True


# small layouts for small cohorts: BatchNorm + He init + conv stem (module docstring); convnext_tiny is the paper's
_PICO = {"depths": (1, 1, 2), "widths": (16, 32, 64), "stem_kernel": 2, "norm": "batch", "stem": "conv"}
_NANO = {"depths": (2, 2, 4, 2), "widths": (16, 32, 64, 128), "stem_kernel": 2, "norm": "batch", "stem": "conv"}
_TINY = {"depths": (3, 3, 9, 3), "widths": (96, 192, 384, 768), "stem_kernel": 4}


def convnext_pico(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, **kwargs) -> ConvNeXt:
    """~0.1 M parameters in 3D; 3 stages, last stage at 1/8 of the input (32^3 -> 4^3)."""
    return ConvNeXt(spatial_dims, in_channels, out_channels, **{**_PICO, **kwargs})


def convnext_nano(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, **kwargs) -> ConvNeXt:
    """4 stages of widths 16-128; last stage at 1/16 of the input (64^3 -> 4^3)."""
    return ConvNeXt(spatial_dims, in_channels, out_channels, **{**_NANO, **kwargs})


def convnext_tiny(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, **kwargs) -> ConvNeXt:
    """The original ConvNeXt-T layout (depths 3-3-9-3, widths 96-768, stem stride 4); heavy on a CPU in 3D."""
    return ConvNeXt(spatial_dims, in_channels, out_channels, **{**_TINY, **kwargs})


def convnext_attn_pico(
    spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, **kwargs
) -> ConvNeXtAttention:
    """:func:`convnext_pico` with attention after each stage."""
    return ConvNeXtAttention(spatial_dims, in_channels, out_channels, **{**_PICO, **kwargs})


def convnext_attn_nano(
    spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, **kwargs
) -> ConvNeXtAttention:
    """:func:`convnext_nano` with attention after each stage."""
    return ConvNeXtAttention(spatial_dims, in_channels, out_channels, **{**_NANO, **kwargs})


class SmallCNN(nn.Sequential):
    """A small BatchNorm CNN baseline (2D/3D) that learns the synthetic cohorts in CPU minutes.

    Stride-2 stem, then one conv block at each of 1/2, 1/4 and 1/8 resolution (max-pool between), global average
    pooling and a linear ``head`` (~54 k parameters at ``width=8`` in 3D). Named stages ``stem``, ``res2``,
    ``down4``, ``res4``, ``down8``, ``res8``: ``res4`` (1/4 resolution) is the Grad-CAM target whose peak falls on
    the synchondrosis most often (``scripts/learnability_sos.py``); ``stem`` and ``res2`` are the early feature layers.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: classes (or regression outputs).
        width: channels of the first stage (doubled at 1/4 and at 1/8).

    Example:
        >>> SmallCNN(3, 1, 5)(torch.zeros(2, 1, 32, 32, 32)).shape
        torch.Size([2, 5])
    """

    cam_target_layer = "res4"
    feature_layers = ("stem", "res2")

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, width: int = 8) -> None:
        dims = _check_spatial_dims(spatial_dims)
        if width < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError("width, in_channels and out_channels must be >= 1")
        conv, norm = Conv[Conv.CONV, dims], (nn.BatchNorm2d, nn.BatchNorm3d)[dims - 2]
        pool = (nn.MaxPool2d, nn.MaxPool3d)[dims - 2]
        gap = (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[dims - 2]

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(conv(cin, cout, 3, stride=stride, padding=1, bias=False), norm(cout), nn.ReLU())

        w = int(width)
        super().__init__(
            OrderedDict(
                stem=block(in_channels, w, stride=2),
                res2=block(w, w),
                down4=nn.Sequential(pool(2), block(w, 2 * w)),
                res4=block(2 * w, 2 * w),
                down8=nn.Sequential(pool(2), block(2 * w, 4 * w)),
                res8=block(4 * w, 4 * w),
                pool=gap(1),
                flat=nn.Flatten(),
                head=nn.Linear(4 * w, out_channels),
            )
        )
