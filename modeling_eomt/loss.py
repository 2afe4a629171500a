"""Mask2Former-style set loss used by EoMT: Hungarian matching, then class CE and point-sampled mask BCE + dice.

A prediction arrives factored: mask logits are the dot products of per-query mask embeddings with per-pixel
embeddings (`MaskPrediction.mask_logits`). The loss never forms the full `(B, Q, H, W)` logits: matching reads the
pixel embeddings at its sampled points, and only matched queries get full-resolution logits (with gradients) for the
mask terms. Target masks stay at input resolution and are only read at sampled points. They are cast to float at
most once per forward (shared by every block's prediction), never padded into a batch tensor nor copied per matched
query. The model scores each prediction as soon as it is made (`EomtLoss.forward`) and sums the terms.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from .configuration import EomtBaseConfig
from .head import MaskPrediction


class LossTargets(NamedTuple):
    """Per image, float target masks `(N, H, W)` and their class ids; target masks per process (see `num_masks`)."""

    masks: list[torch.Tensor]
    classes: list[torch.Tensor]
    num_masks: torch.Tensor


def _grid_sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample `maps` `(N, C, H, W)` at `points` `(N or 1, P, 2)`, given as (x, y) in [0, 1]; float32
    `(N, C, P)`. Sampled in the maps' own dtype, so half-precision maps are not copied whole to float32."""
    grid = points.mul(2).sub_(1).expand(maps.shape[0], -1, -1)[:, :, None].to(maps.dtype)  # one allocation
    return F.grid_sample(maps, grid, align_corners=False)[..., 0].float()


def point_sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Sample `maps` `(N, H, W)` at `points` `(N or 1, P, 2)`; float32 `(N, P)`."""
    return _grid_sample(maps[:, None], points)[:, 0]


def point_sample_logits(
    mask_embeddings: torch.Tensor, pixel_embeddings: torch.Tensor, points: torch.Tensor
) -> torch.Tensor:
    """Mask logits of queries `(Q, D)` at `points` `(1, P, 2)` of pixel embeddings `(H, W, D)`; `(Q, P)`, float32
    outside autocast (where `match` calls it).

    Bilinear sampling is linear, so sampling the pixel embeddings and then taking dot products equals sampling the
    logits, without the `(Q, H, W)` map.
    """
    return mask_embeddings.float() @ _grid_sample(pixel_embeddings.permute(2, 0, 1)[None], points)[0]


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, pairwise: bool = False) -> torch.Tensor:
    """Dice loss of mask logits `(Q, P)` against targets: each against its own row of `targets` `(Q, P)`,
    or `pairwise` against every row of `targets` `(T, P)`, giving `(Q, T)`."""
    probs = logits.sigmoid()
    if pairwise:
        overlap, total = probs @ targets.T, probs.sum(-1)[:, None] + targets.sum(-1)[None]
    else:
        overlap, total = (probs * targets).sum(-1), probs.sum(-1) + targets.sum(-1)
    return 1 - (2 * overlap + 1) / (total + 1)


def bce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise mean binary cross-entropy `(Q, T)` between logits `(Q, P)` and targets `(T, P)`."""
    # BCE(x, t) = softplus(-x)·t + softplus(x)·(1 − t) = softplus(-x) + x·(1 − t), as softplus(x) = softplus(-x) + x:
    # one softplus and one matmul for every pair.
    return (F.softplus(-logits).sum(-1, keepdim=True) + logits @ (1 - targets).T) / logits.shape[-1]


class EomtLoss(nn.Module):
    """Set loss of one prediction; the model sums it over its predictions (one per query block plus the final one).

    Returns the weighted terms `loss_cross_entropy`, `loss_mask` and `loss_dice`.
    """

    def __init__(self, config: EomtBaseConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.register_buffer("empty_weight", self.default_empty_weight())

    def default_empty_weight(self) -> torch.Tensor:
        weight = torch.ones(self.num_labels + 1)
        weight[-1] = self.config.no_object_weight
        return weight

    def targets(
        self, mask_labels: list[torch.Tensor], class_labels: list[torch.Tensor], device: torch.device
    ) -> LossTargets:
        """The targets of a batch, prepared once for all its predictions."""
        masks = [masks if masks.dtype == torch.float32 else masks.float() for masks in mask_labels]
        return LossTargets(masks, class_labels, self.num_masks(class_labels, device))

    def forward(self, prediction: MaskPrediction, targets: LossTargets) -> dict[str, torch.Tensor]:
        mask_embeddings, pixel_embeddings, class_logits = prediction[:3]
        indices = self.match(mask_embeddings, pixel_embeddings, class_logits, targets.masks, targets.classes)
        bce, dice = self.mask_losses(prediction, targets.masks, indices, targets.num_masks)
        return {
            "loss_cross_entropy": self.config.class_weight * self.class_loss(class_logits, targets.classes, indices),
            "loss_mask": self.config.mask_weight * bce,
            "loss_dice": self.config.dice_weight * dice,
        }

    @torch.no_grad()
    def match(
        self,
        mask_embeddings: torch.Tensor,
        pixel_embeddings: torch.Tensor,
        class_logits: torch.Tensor,
        mask_labels: list[torch.Tensor],
        class_labels: list[torch.Tensor],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Hungarian matching per image: (query indices, target indices), costs on shared random points."""
        indices = []
        for queries, pixels, logits, targets, classes in zip(
            mask_embeddings, pixel_embeddings, class_logits, mask_labels, class_labels
        ):
            if len(classes) == 0:
                empty = torch.empty(0, dtype=torch.long)
                indices.append((empty, empty))
                continue
            points = torch.rand(1, self.config.train_num_points, 2, device=pixels.device)
            # In float32 even under autocast: the costs sum thousands of terms of both signs (half precision
            # overflows or loses the differences that decide the matching).
            with torch.autocast(pixels.device.type, enabled=False):
                pred_points = point_sample_logits(queries, pixels, points)
                target_points = point_sample(targets, points)
                class_cost = -logits.float().softmax(-1)[:, classes]
                cost = (
                    self.config.mask_weight * bce_cost(pred_points, target_points)
                    + self.config.class_weight * class_cost
                    + self.config.dice_weight * dice_loss(pred_points, target_points, pairwise=True)
                )
            # Diverged logits give inf/nan costs, which the solver rejects; keep them finite instead.
            cost = torch.nan_to_num(cost, nan=1e10, posinf=1e10, neginf=-1e10).clamp(-1e10, 1e10)
            indices.append(_assign(cost))
        return indices

    def class_loss(
        self, class_logits: torch.Tensor, class_labels: list[torch.Tensor], indices: list[tuple[torch.Tensor, ...]]
    ) -> torch.Tensor:
        """Cross-entropy over all queries; unmatched queries are trained towards "no object"."""
        batch_size, num_queries = class_logits.shape[:2]
        target = torch.full((batch_size, num_queries), self.num_labels, dtype=torch.long, device=class_logits.device)
        for image, (rows, cols) in enumerate(indices):
            target[image, rows.to(target.device)] = class_labels[image][cols.to(class_labels[image].device)].to(
                target.device
            )
        return F.cross_entropy(class_logits.float().transpose(1, 2), target, weight=self.empty_weight.float())

    def mask_losses(
        self,
        prediction: MaskPrediction,
        mask_labels: list[torch.Tensor],
        indices: list[tuple[torch.Tensor, ...]],
        num_masks: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BCE and dice of matched masks on points chosen mostly where the prediction is uncertain."""
        mask_embeddings = prediction.mask_embeddings
        device = mask_embeddings.device
        counts = [len(rows) for rows, _ in indices]
        if sum(counts) == 0:
            # Zero, but through the mask logits, so that every parameter still gets a gradient (DDP needs one); only
            # batches without a single target pay for the upscale layer's backward here.
            zero = prediction.mask_logits(mask_embeddings[:, :1]).sum() * 0.0
            return zero, zero
        batch_index = torch.repeat_interleave(torch.arange(len(indices)), torch.tensor(counts)).to(device)
        # Full-resolution logits for matched queries only: a few dozen maps instead of B × Q. One batched product
        # over the matches padded per image (with query 0, dropped after), rather than a product per image, whose
        # backwards would each recompute the whole batch's upscale bands. The padding costs B × max(matches) maps
        # instead of their sum, small next to the upscaled maps when counts differ.
        matched = torch.zeros(len(indices), max(counts), dtype=torch.long)
        for image, (rows, _) in enumerate(indices):
            matched[image, : len(rows)] = rows
        is_match = (torch.arange(max(counts)) < torch.tensor(counts)[:, None]).to(device)
        matched = matched.to(device)
        queries = mask_embeddings.gather(1, matched[..., None].expand(-1, -1, mask_embeddings.shape[-1]))
        predicted = prediction.mask_logits(queries)[is_match]
        points = self.importance_points(predicted)
        target_points = torch.cat(
            [
                sample_rows(mask_labels[image], cols.to(mask_labels[image].device), points[batch_index == image])
                for image, (_, cols) in enumerate(indices)
            ]
        ).to(device)
        logits = point_sample(predicted, points)
        bce = F.binary_cross_entropy_with_logits(logits, target_points, reduction="none").mean(1).sum() / num_masks
        dice = dice_loss(logits, target_points).sum() / num_masks
        return bce, dice

    @torch.no_grad()
    def importance_points(self, logits: torch.Tensor) -> torch.Tensor:
        """Per mask, `train_num_points` points: the most uncertain of an oversampled random set, plus random ones."""
        num_masks = logits.shape[0]
        num_points = self.config.train_num_points
        candidates = torch.rand(num_masks, int(num_points * self.config.oversample_ratio), 2, device=logits.device)
        uncertainty = -point_sample(logits, candidates).abs()
        num_uncertain = int(self.config.importance_sample_ratio * num_points)
        chosen = uncertainty.topk(num_uncertain, dim=1, sorted=False).indices  # the losses ignore point order
        uncertain = candidates.gather(1, chosen[..., None].expand(-1, -1, 2))
        random = torch.rand(num_masks, num_points - num_uncertain, 2, device=logits.device)
        return torch.cat([uncertain, random], dim=1)

    def num_masks(self, class_labels: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Target masks per process, averaged over processes (at least 1), to normalise the mask terms."""
        total = torch.tensor(float(sum(len(classes) for classes in class_labels)), device=device)
        world_size = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
            world_size = torch.distributed.get_world_size()
        return (total / world_size).clamp(min=1)


@torch.compiler.disable  # a solver on NumPy arrays: a compiled graph has to end here, and dynamo warns if it traces in
def _assign(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost assignment of rows to columns of `cost` `(Q, T)`: (row indices, column indices)."""
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def sample_rows(maps: torch.Tensor, rows: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Sample map `rows[j]` of `maps` `(N, H, W)` at `points[j]` `(len(rows), P, 2)`, without copying the maps out.

    `rows` are distinct (a matching), so one grid per map, dummy points for the others, samples every map once.
    """
    if len(rows) == 0:
        return points.new_zeros(0, points.shape[1])
    grid = points.new_zeros(maps.shape[0], points.shape[1], 2)
    grid[rows] = points
    return point_sample(maps, grid)[rows]
