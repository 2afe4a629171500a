"""Class names of the datasets EoMT was released on, in the order of the models' class ids.

Keys are those of `DATASETS` in `presets.py`. COCO panoptic lists the 80 thing classes first, then the 53 stuff
classes (the order of the COCO panoptic API's category list); COCO instance uses the 80 thing classes; ADE20K uses
the SceneParse150 order (file ids 1–150 shifted to 0–149); Cityscapes uses the 19 train ids.
"""

from __future__ import annotations

from .presets import DATASETS

COCO_THINGS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip

COCO_STUFF = (
    "banner", "blanket", "bridge", "cardboard", "counter", "curtain", "door-stuff", "floor-wood", "flower", "fruit",
    "gravel", "house", "light", "mirror-stuff", "net", "pillow", "platform", "playingfield", "railroad", "river",
    "road", "roof", "sand", "sea", "shelf", "snow", "stairs", "tent", "towel", "wall-brick", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "window-blind", "window-other", "tree-merged", "fence-merged",
    "ceiling-merged", "sky-other-merged", "cabinet-merged", "table-merged", "floor-other-merged", "pavement-merged",
    "mountain-merged", "grass-merged", "dirt-merged", "paper-merged", "food-other-merged", "building-other-merged",
    "rock-merged", "wall-other-merged", "rug-merged",
)  # fmt: skip

ADE20K = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

# ADE20K panoptic: the 50 classes annotated as stuff (the rest are things), as in the panoptic ADE20K release.
ADE20K_PANOPTIC_STUFF = (
    0, 1, 2, 3, 4, 5, 6, 9, 11, 13, 16, 17, 21, 25, 26, 28, 29, 34, 40, 46, 48, 51, 52, 54, 59, 60, 61, 63, 68, 77,
    79, 84, 91, 94, 96, 99, 100, 101, 105, 106, 109, 113, 114, 117, 122, 128, 131, 140, 141, 145,
)  # fmt: skip

CITYSCAPES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "coco_panoptic": COCO_THINGS + COCO_STUFF,
    "coco_instance": COCO_THINGS,
    "ade20k_panoptic": ADE20K,
    "ade20k_semantic": ADE20K,
    "cityscapes_semantic": CITYSCAPES,
}

STUFF_IDS: dict[str, tuple[int, ...]] = {
    "coco_panoptic": tuple(range(len(COCO_THINGS), len(COCO_THINGS) + len(COCO_STUFF))),
    "ade20k_panoptic": ADE20K_PANOPTIC_STUFF,
}


def _check_key(dataset_key: str) -> None:
    if dataset_key not in LABEL_NAMES:
        raise ValueError(f"Unknown dataset {dataset_key!r}; choose one of {', '.join(LABEL_NAMES)}.")


def id2label(dataset_key: str) -> dict[int, str]:
    """Class id → name for a dataset key of `DATASETS` (e.g. "coco_panoptic")."""
    _check_key(dataset_key)
    return dict(enumerate(LABEL_NAMES[dataset_key]))


def stuff_ids(dataset_key: str) -> tuple[int, ...]:
    """Ids of the stuff classes of a panoptic dataset (empty for instance and semantic datasets)."""
    _check_key(dataset_key)
    return STUFF_IDS.get(dataset_key, ())


def dataset_for(task: str, num_labels: int) -> str | None:
    """The dataset key with this task and class count, if exactly one matches (e.g. panoptic + 133 → COCO)."""
    matches = [key for key, spec in DATASETS.items() if spec["task"] == task and spec["num_labels"] == num_labels]
    return matches[0] if len(matches) == 1 else None
