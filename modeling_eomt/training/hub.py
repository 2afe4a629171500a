"""`datasets` tables (from the Hub or saved locally) as datasets; the schema is recognised from the columns."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..configuration import IGNORE_INDEX
from ..configuration.labels import id2label as benchmark_id2label
from ..configuration.labels import stuff_ids as benchmark_stuff_ids
from .annotations import (
    SemanticLabels,
    categories_of,
    instance_example,
    panoptic_example,
    read_json,
    scan_semantic_values,
    semantic_example,
)
from .dataset import Example, SegmentationDataset

logger = logging.get_logger(__name__)

# Columns tried, in order, when a `datasets` table does not say which column holds what.
_IMAGE_COLUMNS = ("image", "img", "pixel_values")
_SEMANTIC_COLUMNS = ("annotation", "semantic_segmentation", "segmentation", "label", "mask", "gtFine")
_PANOPTIC_COLUMNS = ("panoptic", "panoptic_image", "label", "annotation", "segmentation")


def _column(dataset, candidates: Sequence[str], what: str) -> str:
    for name in candidates:
        if name in dataset.column_names:
            return name
    raise ValueError(
        f"Cannot find the {what} column among {dataset.column_names}; expected one of {list(candidates)}."
    )


def hf_dataset(
    dataset,
    task: str,
    dataset_key: str | None = None,
    classes: Any = None,
    ignore_index: int | None = IGNORE_INDEX,
) -> SegmentationDataset:
    """
    Adapter for a `datasets.Dataset`. The schema is recognised from the columns: `image` plus `segments_info` and a
    panoptic PNG column (panoptic), `objects`/`annotations` with `segmentation` (instance), or an annotation image
    column (semantic). Classes come from `classes` (a COCO `categories` list or `{category_id: name}` for
    panoptic/instance, a value mapping for semantic), else from the table's `ClassLabel` feature, else from the
    benchmark `dataset_key` (a key of `configuration.labels`, e.g. `"ade20k_semantic"` or `"coco_panoptic"`).
    """
    image_column = _column(dataset, _IMAGE_COLUMNS, "image")
    columns = dataset.column_names
    if "segments_info" in columns:
        categories = _table_categories(dataset, classes, dataset_key, ("segments_info", "category_id"))
        category_to_label, id2label, stuff = categories_of(categories)
        decode = partial(
            _decode_panoptic_row,
            image_column=image_column,
            panoptic_column=_column(dataset, _PANOPTIC_COLUMNS, "panoptic PNG"),
            category_to_label=category_to_label,
        )
        return SegmentationDataset(
            dataset, decode, source_task="panoptic", task=task, id2label=id2label, stuff_ids=stuff
        )
    objects = next((c for c in ("objects", "annotations") if c in columns), None)
    if objects is not None:
        category_field = "category_id" if "category_id" in _field_names(dataset.features[objects]) else "category"
        categories = _table_categories(dataset, classes, dataset_key, (objects, category_field))
        category_to_label, id2label, _ = categories_of(categories)
        decode = partial(
            _decode_instance_row,
            image_column=image_column,
            objects_column=objects,
            category_field=category_field,
            category_to_label=category_to_label,
        )
        return SegmentationDataset(dataset, decode, source_task="instance", task=task, id2label=id2label)
    annotation_column = _column(dataset, _SEMANTIC_COLUMNS, "semantic annotation")
    if classes is not None:
        labels = SemanticLabels.from_classes(classes, ignore_index)
    elif dataset_key is not None:
        labels = _semantic_labels_for_key(dataset_key)
    else:
        labels = scan_semantic_values(
            (row[annotation_column] for row in dataset.select_columns(annotation_column)), ignore_index
        )
    decode = partial(
        _decode_semantic_row, image_column=image_column, annotation_column=annotation_column, labels=labels
    )
    return SegmentationDataset(dataset, decode, source_task="semantic", task=task, id2label=labels.id2label)


def _field_names(feature) -> list[str]:
    """Names of the fields of a struct feature, also when wrapped in a list/sequence."""
    inner = getattr(feature, "feature", feature)
    return list(inner) if isinstance(inner, Mapping) else []


def _table_categories(dataset, classes, dataset_key, path: tuple[str, str]) -> list[dict[str, Any]]:
    if classes is not None:
        if isinstance(classes, (str, os.PathLike)):
            classes = read_json(Path(classes))
        if isinstance(classes, Mapping):
            return [{"id": int(k), "name": v} for k, v in classes.items()]
        return list(classes)
    inner = getattr(dataset.features[path[0]], "feature", dataset.features[path[0]])
    feature = inner.get(path[1]) if isinstance(inner, Mapping) else None
    feature = getattr(feature, "feature", feature)  # dict-of-lists layout wraps the ClassLabel
    names = getattr(feature, "names", None)
    if names:
        categories = [{"id": k, "name": n} for k, n in enumerate(names)]
        stuff = (
            {benchmark_id2label(dataset_key)[k] for k in benchmark_stuff_ids(dataset_key)}
            if dataset_key is not None
            else set()
        )
        if stuff:  # a ClassLabel says nothing of things and stuff: the benchmark's stuff classes, by name
            if not stuff & set(names):
                logger.warning(f"No class of the table is a {dataset_key} stuff class by name; all are things.")
            for category in categories:
                category["isthing"] = category["name"] not in stuff
        return categories
    if dataset_key is not None:
        stuff = set(benchmark_stuff_ids(dataset_key))
        return [{"id": k, "name": n, "isthing": k not in stuff} for k, n in benchmark_id2label(dataset_key).items()]
    raise ValueError(
        "The table does not name its categories; pass `classes=` (a COCO `categories` list with `id`, `name` and, "
        "for panoptic, `isthing`, or a {category_id: name} mapping)."
    )


def _decode_panoptic_row(row, image_column, panoptic_column, category_to_label) -> Example:
    return panoptic_example(
        row[image_column],
        row[panoptic_column],
        row["segments_info"],
        category_to_label,
        name=_row_name(row, image_column),
    )


def _decode_instance_row(row, image_column, objects_column, category_field, category_to_label) -> Example:
    objects = row[objects_column]
    if isinstance(objects, Mapping):
        objects = [dict(zip(objects, values)) for values in zip(*objects.values())]
    annotations = [{**o, "category_id": o[category_field]} for o in objects]
    return instance_example(row[image_column], annotations, category_to_label, name=_row_name(row, image_column))


def _decode_semantic_row(row, image_column, annotation_column, labels) -> Example:
    return semantic_example(row[image_column], row[annotation_column], labels, name=_row_name(row, image_column))


def _row_name(row, image_column) -> str:
    image = row[image_column]
    path = getattr(image, "filename", None) or (image.get("path") if isinstance(image, Mapping) else None)
    return str(path) if path else "a dataset row"


def _semantic_labels_for_key(dataset_key: str) -> SemanticLabels:
    id2label = benchmark_id2label(dataset_key)
    return SemanticLabels.shifted(id2label) if dataset_key.startswith("ade20k") else SemanticLabels.identity(id2label)
