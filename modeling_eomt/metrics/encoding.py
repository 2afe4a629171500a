"""Compact storage of label maps and mask stacks for the `evaluate` modules, and the input forms they accept.

`evaluate` keeps every added example in an Arrow table until `compute()`. A 640×640 map stored as nested lists costs
~1.6 MB and a slow Python round trip; run-length encoded (row-major runs of equal values) it shrinks to the number
of boundaries. The metrics encode in `add`/`add_batch` and decode one example at a time in `_compute`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import datasets
import evaluate
import numpy as np

# Arrow schema of one run-length encoded array.
RUNS_FEATURE = {
    "shape": datasets.List(datasets.Value("int64")),
    "values": datasets.List(datasets.Value("int64")),
    "lengths": datasets.List(datasets.Value("int64")),
}


# Optional per-mask arrays of the masks form, and the segment-info key each one fills.
_PER_MASK_FIELDS = {"scores": "score", "iscrowd": "iscrowd", "is_crowd": "iscrowd", "areas": "area"}


def to_numpy(array: Any) -> np.ndarray:
    """A numpy view of a torch tensor (any device), PIL image, numpy array or nested list."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def encode_runs(array: np.ndarray) -> dict[str, list[int]]:
    """Row-major run-length encoding of an integer or boolean array of any shape."""
    flat = array.reshape(-1)
    if flat.size == 0:
        return {"shape": list(array.shape), "values": [], "lengths": []}
    starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]]))
    lengths = np.diff(np.append(starts, flat.size))
    return {"shape": list(array.shape), "values": flat[starts].tolist(), "lengths": lengths.tolist()}


def decode_runs(runs: Mapping[str, Sequence[int]], dtype: np.dtype = np.int64) -> np.ndarray:
    """Inverse of [`encode_runs`]."""
    values = np.asarray(runs["values"], dtype=dtype)
    return np.repeat(values, np.asarray(runs["lengths"], dtype=np.int64)).reshape(runs["shape"])


def integer_map(array: Any, what: str) -> np.ndarray:
    """A 2-D integer map, or a clear error."""
    array = to_numpy(array)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (height, width) map, got shape {array.shape}.")
    if array.dtype.kind == "f":
        if not np.all(array == np.round(array)):
            raise ValueError(f"{what} must hold integer ids, got non-integer floats.")
        array = array.astype(np.int64)
    elif array.dtype.kind not in "iub":
        raise ValueError(f"{what} must hold integer ids, got dtype {array.dtype}.")
    return array.astype(np.int64, copy=False)


def binary_masks(array: Any, what: str) -> np.ndarray:
    """A (num_masks, height, width) boolean stack, or a clear error."""
    array = to_numpy(array)
    if array.ndim != 3:
        raise ValueError(f"{what} must have shape (num_masks, height, width), got {array.shape}.")
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{what} must be binary (bool or 0/1); threshold probabilities or logits first.")
        array = array.astype(bool)
    return array


def segments_from_example(example: Mapping[str, Any], what: str) -> tuple[np.ndarray, list[dict]]:
    """
    Boolean masks and per-segment info (`label_id`, `score`, `iscrowd`, `area`) of one example, given in one of
    the forms post-processing returns or in the plain masks form:

    - `{"segmentation": (H, W) id map, "segments_info": [{"id", "label_id", ...}]}`: pixels whose id is not listed
      (e.g. -1) belong to no segment;
    - `{"segmentation": (N, H, W) binary maps, "segments_info": [...]}` (`return_binary_maps=True`): map `i` is
      segment `i`;
    - `{"masks": (N, H, W) binary, "labels": (N,), "scores"?, "iscrowd"?, "areas"?}`.

    Segment dicts may hold `score`, `iscrowd` and `area`; `is_crowd` is accepted as a spelling of `iscrowd`.
    """
    if not isinstance(example, Mapping):
        raise TypeError(f"Each of {what} must be a dict, got {type(example).__name__}.")
    if "segmentation" in example and "segments_info" in example:
        infos = [_segment_info(info, what) for info in example["segments_info"]]
        segmentation = to_numpy(example["segmentation"])
        if segmentation.ndim == 3:
            masks = binary_masks(segmentation, f"{what}['segmentation']")
            if len(masks) != len(infos):
                raise ValueError(f"{what} has {len(masks)} binary maps but {len(infos)} segments_info entries.")
            return masks, infos
        segmentation = integer_map(segmentation, f"{what}['segmentation']")
        ids = _segment_ids(example, what)
        masks = segmentation[None] == ids.reshape(-1, 1, 1)
        return masks.reshape(len(ids), *segmentation.shape), infos
    if "masks" in example and "labels" in example:
        masks = binary_masks(example["masks"], f"{what}['masks']")
        labels = to_numpy(example["labels"]).reshape(-1)
        if len(labels) != len(masks):
            raise ValueError(f"{what} has {len(masks)} masks but {len(labels)} labels.")
        extras = {key: to_numpy(example[key]).reshape(-1) for key in _PER_MASK_FIELDS if key in example}
        for key, values in extras.items():
            if len(values) != len(masks):
                raise ValueError(f"{what} has {len(masks)} masks but {len(values)} {key}.")
        infos = [
            _segment_info({"label_id": labels[i], **{_PER_MASK_FIELDS[k]: v[i] for k, v in extras.items()}}, what)
            for i in range(len(masks))
        ]
        return masks, infos
    raise ValueError(
        f"{what} must be dicts with either 'segmentation' + 'segments_info' (the post-processing output) or "
        f"'masks' + 'labels'; got keys {sorted(example)}."
    )


def segment_index_map(example: Mapping[str, Any], what: str) -> tuple[np.ndarray, list[dict]]:
    """
    An (H, W) map of segment indices into the returned segment infos (-1 where no segment), from any form that
    [`segments_from_example`] reads; where masks overlap the later one wins.
    """
    segmentation = example.get("segmentation") if isinstance(example, Mapping) else None
    if segmentation is not None and "segments_info" in example and to_numpy(segmentation).ndim == 2:
        # Fast path for id maps: no per-segment masks.
        segmentation = integer_map(segmentation, f"{what}['segmentation']")
        infos = [_segment_info(info, what) for info in example["segments_info"]]
        ids = _segment_ids(example, what)
        index_map = np.full(segmentation.shape, -1, dtype=np.int64)
        if len(ids):
            order = np.argsort(ids)
            candidate = order[np.clip(np.searchsorted(ids[order], segmentation), 0, len(ids) - 1)]
            index_map = np.where(ids[candidate] == segmentation, candidate, -1)
        return index_map, infos
    masks, infos = segments_from_example(example, what)
    index_map = np.full(masks.shape[1:], -1, dtype=np.int64)
    for index, mask in enumerate(masks):
        index_map[mask] = index
    return index_map, infos


def check_labels(examples: Iterable[Mapping[str, Any]], num_labels: int | None) -> None:
    """Raise if a stored example's `labels` fall outside `0..num_labels - 1` (no check when `num_labels` is None)."""
    if num_labels is None:
        return
    for example in examples:
        unknown = sorted({label for label in example["labels"] if label >= num_labels})
        if unknown:
            raise ValueError(
                f"Found label ids {unknown} but num_labels={num_labels}; pass the number of classes of the dataset."
            )


def _segment_ids(example: Mapping[str, Any], what: str) -> np.ndarray:
    ids = np.asarray([int(info["id"]) for info in example["segments_info"]], dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{what}['segments_info'] lists a segment id twice: {ids.tolist()}.")
    return ids


def _segment_info(info: Mapping[str, Any], what: str) -> dict:
    label = info.get("label_id", info.get("category_id"))
    if label is None:
        raise ValueError(f"Every segment of {what} needs a 'label_id', got {dict(info)}.")
    if int(label) < 0:
        raise ValueError(f"{what} has a negative label_id {int(label)}; mark void pixels by leaving them unlisted.")
    return {
        "label_id": int(label),
        "score": float(info.get("score", 1.0)),
        "iscrowd": int(bool(info.get("iscrowd", info.get("is_crowd", 0)))),
        "area": float(info["area"]) if info.get("area") is not None else -1.0,
    }


class EncodedInputsMixin:
    """
    Mixin for an `evaluate.Metric` (listed before it) that encodes every prediction and reference with
    `encode_example(example, what)` before `evaluate` stores it, so that `_compute` receives encoded examples.
    """

    @staticmethod
    def encode_example(example: Any, what: str) -> Any:
        raise NotImplementedError

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of predictions and references (encoded compactly before storage)."""
        if predictions is not None:
            predictions = [self.encode_example(p, "predictions") for p in predictions]
        if references is not None:
            references = [self.encode_example(r, "references") for r in references]
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def add_encoded_batch(self, *, predictions: list, references: list) -> None:
        """Add examples already encoded with `encode_example` (e.g. encoded where they were predicted, then gathered
        across processes)."""
        super().add_batch(predictions=predictions, references=references)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one prediction and reference (encoded compactly before storage)."""
        if prediction is not None:
            prediction = self.encode_example(prediction, "predictions")
        if reference is not None:
            reference = self.encode_example(reference, "references")
        super().add(prediction=prediction, reference=reference, **kwargs)


def metric_info(
    description: str, citation: str, inputs_description: str, stored: Any, reference_urls: Sequence[str] = ()
) -> evaluate.MetricInfo:
    """The `MetricInfo` of a metric whose predictions and references are stored in their encoded form `stored`."""
    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs_description,
        features=datasets.Features({"predictions": stored, "references": stored}),
        reference_urls=list(reference_urls),
    )
