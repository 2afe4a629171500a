"""Facts shared by the processor, training, the CLI and the converter: one home for each."""

from __future__ import annotations

# The three segmentation tasks an EoMT checkpoint is trained for (and post-processed as).
TASKS = ("panoptic", "instance", "semantic")

# Label of pixels that no loss or metric counts (COCO/ADE20K void after reduction, Cityscapes' ignore id).
IGNORE_INDEX = 255

# ImageNet statistics every released checkpoint normalises its input with (in the original release, inside the model).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
