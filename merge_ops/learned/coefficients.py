"""The learned coefficient table (groups × experts) as an artifact: JSON and a heatmap PNG."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge_ops.errors import InputError


@dataclass
class Coefficients:
    groups: list[str]
    experts: list[str]
    values: torch.Tensor  # [len(groups), len(experts)], effective (after clamp/sigmoid)
    meta: dict[str, Any] = field(default_factory=dict)  # grouping, parameterisation, ...

    def __post_init__(self) -> None:
        if tuple(self.values.shape) != (len(self.groups), len(self.experts)):
            raise ValueError(f"values shape {tuple(self.values.shape)} != groups × experts "
                             f"({len(self.groups)}, {len(self.experts)})")

    def to_dict(self) -> dict[str, Any]:
        return {"experts": self.experts, "groups": self.groups,
                "values": self.values.detach().double().tolist(), **self.meta}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Coefficients:
        try:
            doc = json.loads(Path(path).read_text())
            meta = {k: v for k, v in doc.items() if k not in ("experts", "groups", "values")}
            return cls(list(doc["groups"]), list(doc["experts"]),
                       torch.tensor(doc["values"], dtype=torch.float64).reshape(
                           len(doc["groups"]), len(doc["experts"])), meta)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}: not a coefficients table: {e}", param=str(path)) from None

    def heatmap(self, path: str | Path, title: str | None = None) -> None:
        """Groups (layers) down, experts across. Agg backend: no display needed in workers."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        g, k = self.values.shape
        fig_h = min(2.0 + 0.12 * g, 40.0)
        fig, ax = plt.subplots(figsize=(2.5 + 1.1 * k, fig_h))
        im = ax.imshow(self.values.detach().float().numpy(), aspect="auto", cmap="viridis",
                       interpolation="nearest")
        ax.set_xticks(range(k), self.experts, rotation=45, ha="right")
        if g <= 120:  # beyond that the labels overlap into noise
            ax.set_yticks(range(g), self.groups, fontsize=max(3, min(8, 600 // max(g, 1))))
        else:
            ax.set_ylabel(f"{g} groups")
        fig.colorbar(im, ax=ax, fraction=0.05)
        ax.set_title(title or "learned merge coefficients")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
