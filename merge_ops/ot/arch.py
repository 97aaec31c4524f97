"""Small non-HF models that OT fusion understands, described by a config.json, and module builders.

MLP config (tensor names `layers.{i}.weight/.bias`, ReLU between layers, the last layer is the
classifier):
    {"alloy_arch": "mlp", "input_dim": 784, "hidden": [400, 200, 100], "num_classes": 10}
CNN config (per conv: `convs.{i}` 3×3 same-padding → `bns.{i}` BatchNorm (if batch_norm) → ReLU →
2×2 max-pool; then flatten (channel-major) → `fcs.{j}` with ReLU between, the last is the classifier):
    {"alloy_arch": "cnn", "in_channels": 1, "image_size": 28, "channels": [16, 32],
     "kernel_size": 3, "batch_norm": true, "hidden": [64], "num_classes": 10}
Widths (`hidden`, `channels`) may differ between the models being fused; the fused model takes the
anchor's config.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden: list[int], num_classes: int, bias: bool = True):
        super().__init__()
        dims = [input_dim, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class CNN(nn.Module):
    def __init__(self, in_channels: int, image_size: int, channels: list[int], num_classes: int,
                 hidden: list[int] | None = None, kernel_size: int = 3, batch_norm: bool = True):
        super().__init__()
        chans = [in_channels, *channels]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, kernel_size, padding=kernel_size // 2)
                                   for a, b in zip(chans[:-1], chans[1:], strict=True))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in channels) if batch_norm else None
        side = image_size // 2 ** len(channels)
        dims = [channels[-1] * side * side, *(hidden or []), num_classes]
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.bns is not None:
                x = self.bns[i](x)
            x = nn.functional.max_pool2d(torch.relu(x), 2)
        x = x.flatten(1)
        for j, fc in enumerate(self.fcs):
            x = fc(x)
            if j < len(self.fcs) - 1:
                x = torch.relu(x)
        return x


def build_module(config: Mapping, state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """An eval-mode module for `config` (alloy_arch or an HF config dict), loaded with `state_dict`."""
    arch = config.get("alloy_arch")
    if arch == "mlp":
        m: nn.Module = MLP(config["input_dim"], list(config["hidden"]), config["num_classes"],
                           config.get("bias", True))
    elif arch == "cnn":
        m = CNN(config["in_channels"], config["image_size"], list(config["channels"]), config["num_classes"],
                list(config.get("hidden", [])), config.get("kernel_size", 3), config.get("batch_norm", True))
    else:
        import transformers

        cfg = transformers.AutoConfig.for_model(**dict(config))
        archs = config.get("architectures") or ["AutoModel"]
        cls = getattr(transformers, archs[0], None)
        if cls is None:
            raise ValueError(f"transformers has no class {archs[0]!r} (config.architectures)")
        m = cls.from_config(cfg) if cls.__name__.startswith("Auto") else cls(cfg)
    if state_dict is not None:
        missing, unexpected = m.load_state_dict(dict(state_dict), strict=False)
        tied = set(getattr(m, "_tied_weights_keys", None) or [])
        if unexpected or [k for k in missing if k not in tied and not k.endswith("position_ids")]:
            raise ValueError(f"state dict does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return m.eval()
