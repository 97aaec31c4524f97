"""Sequence packing: several short rows of a calibration batch run as one row, so padding costs nothing.

Calibration batches mix lengths (the benchmark's: 64% real tokens, 36% padding), and every padded
position costs the same matmuls as a real one, forward and backward. `pack` places the rows of a
right-padded batch into as few rows of the same width as first-fit-decreasing finds; each packed row
gets position ids that restart at every sequence and a block-diagonal attention mask (lower-triangular
inside each block for causal models), so every token sees exactly what it saw in its own padded row:
the same function, in fewer rows. Padding positions attend only to themselves (a fully masked row
would put NaN into the backward pass). `Packing.tokens` gives an output's real tokens in batch order,
which is all a loss reads. Whether a model honours position ids and a 4-D mask is checked once per adapter on a
probe batch (adapters.py); a model that does not runs padded batches as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packing:
    input_ids: torch.Tensor  # [P, W]
    position_ids: torch.Tensor  # [P, W], restarting at 0 for each packed sequence
    segments: torch.Tensor  # [P, W]: original row index; -1 - column on padding
    src: torch.Tensor  # [n_real] flat packed position of each real token, row-major in batch order

    def attention_mask(self, dtype: torch.dtype, causal: bool) -> torch.Tensor:
        """Additive [P, 1, W, W] mask: 0 where a query may attend a key, dtype's minimum elsewhere."""
        seg = self.segments
        allowed = seg[:, :, None] == seg[:, None, :]
        if causal:
            w = seg.shape[1]
            allowed &= torch.ones(w, w, dtype=torch.bool, device=seg.device).tril()
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[P, W, ...] → [n_real, ...]: real tokens in batch order (= padded[attention_mask])."""
        return x.flatten(0, 1)[self.src]


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int = 0) -> Packing | None:
    """Pack a right-padded batch, or None where that saves no row (or the mask is not right-padded)."""
    b, t = attention_mask.shape
    lengths = attention_mask.sum(1)
    if b < 2 or int(lengths.min()) == 0:
        return None
    if not bool((attention_mask.bool() == (torch.arange(t, device=attention_mask.device) < lengths[:, None])).all()):
        return None
    ls = lengths.tolist()
    bins: list[list[int]] = []  # rows per packed row
    room: list[int] = []
    for r in sorted(range(b), key=lambda i: -ls[i]):  # first-fit decreasing; stable on ties
        for j, free in enumerate(room):
            if ls[r] <= free:
                bins[j].append(r)
                room[j] -= ls[r]
                break
        else:
            bins.append([r])
            room.append(t - ls[r])
    if len(bins) == b:
        return None
    dev = input_ids.device
    ids = torch.full((len(bins), t), pad_id, dtype=input_ids.dtype, device=dev)
    pos = torch.zeros((len(bins), t), dtype=torch.long, device=dev)
    seg = -1 - torch.arange(t, device=dev).repeat(len(bins), 1)
    start = [0] * b
    for j, rows in enumerate(bins):
        at = 0
        for r in rows:
            n = ls[r]
            ids[j, at: at + n] = input_ids[r, :n]
            pos[j, at: at + n] = torch.arange(n, device=dev)
            seg[j, at: at + n] = r
            start[r] = j * t + at
            at += n
    src = torch.cat([torch.arange(start[r], start[r] + ls[r]) for r in range(b)]).to(dev)
    return Packing(ids, pos, seg, src)
