"""EoMT image processor: images → `pixel_values` (padded squares or sliding windows), segmentation maps → training
targets, and the three post-processings. Pure torch; reads the Hub's `preprocessor_config.json` files unchanged."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

from ..configuration import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, TASKS
from . import geometry, semantic_fast
from .checks import checked_arguments, has_windows
from .geometry import Layout, Placement
from .inputs import binary_masks, channel_statistic, image_list, map_list, size_dict, to_chw, to_label_map
from .segments_fast import instance_segmentation, panoptic_segmentation

logger = logging.get_logger(__name__)

# The one place that picks the implementations: `semantic_fast` gives the labels of the plain
# `post_processing.semantic_*` (its reference, same signatures) in bounded memory, and `segments_fast` (imported
# above) the panoptic and instance results of `post_processing` while holding only the result at the target size.
SEMANTIC = semantic_fast
# Constructor options, which `preprocess` also takes for one call.
OPTIONS = (
    "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
    "do_split_image", "do_pad", "ignore_index", "do_reduce_labels",
)  # fmt: skip
# PIL resampling codes (the `resample` field of the Hub configs) → torch interpolation modes.
RESAMPLE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


class EomtImageProcessorKwargs(ImagesKwargs, total=False):
    """Options beyond the standard image kwargs (used by `from_pretrained(..., **overrides)`)."""

    do_split_image: bool
    ignore_index: int | None
    do_reduce_labels: bool | None


class EomtImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for [`EomtForUniversalSegmentation`] and turns its outputs into segmentations.

    Panoptic and instance checkpoints scale the long side to `size["longest_edge"]` and zero-pad bottom/right to a
    square; semantic checkpoints (`do_split_image=True`) scale the short side to `size["shortest_edge"]` and cut the
    image into evenly overlapping square windows, returned as `patch_offsets` (`[image_index, start, end]` along the
    long side) for [`post_process_semantic_segmentation`] to stitch.

    Args:
        do_resize (`bool`, defaults to `True`):
            Resize images (see `size`).
        size (`dict[str, int]`, defaults to `{"shortest_edge": 640, "longest_edge": 640}`):
            Target of the short side, capped so the long side stays within `longest_edge` (`None`: no cap). With
            `do_split_image` the windows are `shortest_edge` squares; with `do_pad` the canvas is
            `shortest_edge × (longest_edge or shortest_edge)`.
        resample (`int`, defaults to 2 (bilinear)):
            PIL resampling code: 0 nearest, 2 bilinear or 3 bicubic (antialiased when downscaling, like PIL).
        do_rescale (`bool`, defaults to `True`):
            Multiply 8-bit images by `rescale_factor` and others by the factor of the same scale: 16-bit images by
            `rescale_factor · 255 / 65535`. Floating-point images with values in [0, 1] are taken as already
            rescaled; other floating-point images as 0-255 levels, with a warning saying so.
        rescale_factor (`float`, defaults to 1/255):
            Factor of `do_rescale`.
        do_normalize (`bool`, defaults to `True`):
            Subtract `image_mean` and divide by `image_std` per channel.
        image_mean, image_std (`list[float]`, default to the ImageNet statistics):
            Normalisation statistics.
        do_split_image (`bool`, defaults to `False`):
            Sliding windows for semantic segmentation instead of one padded canvas per image.
        do_pad (`bool`, defaults to `True`):
            Zero-pad bottom/right (in pixel space, before normalisation) to the canvas so any image fits the model.
        ignore_index (`int`, *optional*):
            Label of segmentation-map pixels that belong to no target mask (also fills the padding of targets).
        do_reduce_labels (`bool`, *optional*):
            Segmentation-map label 0 means "ignore" and the other labels shift down by one (ADE20K files). Needs
            `ignore_index`. Unset, it follows the Hub's configs and transformers' processor: on when `ignore_index`
            is set. Set it to `False` for label files whose 0 is a class (Cityscapes train ids).
    """

    valid_kwargs = EomtImageProcessorKwargs
    model_input_names = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: dict[str, int | None] | int | None = None,
        resample: int = 2,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        do_split_image: bool = False,
        do_pad: bool = True,
        ignore_index: int | None = None,
        do_reduce_labels: bool | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.do_resize = do_resize
        self.size = size_dict(size)
        _resample_mode(resample)  # validate early
        self.resample = int(resample)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = channel_statistic("image_mean", image_mean)
        self.image_std = channel_statistic("image_std", image_std)
        self.do_split_image = do_split_image
        self.do_pad = do_pad
        self.ignore_index = ignore_index
        self.do_reduce_labels = do_reduce_labels
        if do_reduce_labels and ignore_index is None:
            raise ValueError("`do_reduce_labels=True` maps label 0 to `ignore_index`; set `ignore_index` (e.g. 255).")

    # ------------------------------------------------------------------ geometry (shared with post-processing)

    @classmethod
    def for_task(
        cls,
        task: str,
        image_size: int,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        do_reduce_labels: bool = False,
    ) -> EomtImageProcessor:
        """The settings EoMT uses for a task: panoptic/instance scale the long side to `image_size` and pad to a
        square; semantic scales the short side to `image_size` and slides square windows (ignore index 255;
        `do_reduce_labels` for label files where 0 means "other", like ADE20K's)."""
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
        semantic = task == "semantic"
        return cls(
            size={"shortest_edge": image_size, "longest_edge": None if semantic else image_size},
            do_split_image=semantic,
            do_pad=not semantic,
            image_mean=image_mean,
            image_std=image_std,
            ignore_index=IGNORE_INDEX if semantic else None,
            do_reduce_labels=do_reduce_labels and semantic,
        )

    def resized_size(self, height: int, width: int, size: dict | None = None) -> tuple[int, int]:
        """Size of an image of `height × width` after resizing (unchanged when `do_resize` is off)."""
        if not self.do_resize:
            return height, width
        size = self.size if size is None else size_dict(size)
        return _scaled_size(height, width, size["shortest_edge"], size.get("longest_edge"))

    def pad_size(self, size: dict | None = None) -> tuple[int, int]:
        """Canvas (height, width) that padding fills up to."""
        size = self.size if size is None else size_dict(size)
        return size["shortest_edge"], size.get("longest_edge") or size["shortest_edge"]

    def layout(
        self,
        target_sizes: Sequence[tuple[int, int]],
        patch_offsets: Sequence | None = None,
        size: dict | None = None,
        do_pad: bool | None = None,
    ) -> Layout:
        """Where each model input (canvas or window, `patch_offsets` if given) lies in its image of `target_sizes`
        (the original sizes), for post-processing."""
        do_pad = self.do_pad if do_pad is None else do_pad
        resized = [self.resized_size(int(h), int(w), size) for h, w in target_sizes]
        if patch_offsets is None or len(patch_offsets) == 0:
            offsets = geometry.window_offsets(resized, None)
        else:
            offsets = [tuple(int(v) for v in offset) for offset in patch_offsets]
        return geometry.layout(target_sizes, resized, offsets, self.pad_size(size) if do_pad else None)

    # ------------------------------------------------------------------ preprocessing

    def preprocess(
        self,
        images,
        segmentation_maps=None,
        instance_id_to_semantic_id: dict[int, int] | list[dict[int, int]] | None = None,
        return_tensors: str | None = "pt",
        input_data_format: str | None = None,
        device: str | torch.device | None = None,
        **overrides: Any,
    ) -> BatchFeature:
        r"""
        Turn images (and optionally their segmentation maps) into model inputs.

        Args:
            images: One image or a list of images: PIL images, numpy arrays or torch tensors, HWC or CHW, 8-bit,
                16-bit (`uint16`, PNG mode "I;16") or float (see `do_rescale`), grayscale, RGB or RGBA. A 4-d array or
                tensor is a batch. NaN or infinite pixels are an error naming the image.
            segmentation_maps: One 2-d label map per image (integer class ids, or instance ids with
                `instance_id_to_semantic_id`), at the image's size; -1 (and `ignore_index`) marks ignored pixels.
            instance_id_to_semantic_id: Class id of each instance id, for all images or one dict per image.
            return_tensors (`str`, defaults to `"pt"`): `"pt"`, `"np"` (everything as numpy arrays) or `None` (as
                transformers' processor: `pixel_values` a list of float32 arrays, the rest tensors).
            input_data_format (`str`, *optional*): `"channels_first"` or `"channels_last"` when the layout of an
                array is ambiguous.
            device: Where to run the resizing (e.g. `"cuda"`).
            overrides: Any constructor option (`do_pad`, `size`, `do_split_image`, ...) for this call only.

        Returns:
            [`BatchFeature`] with `pixel_values` `(num_inputs, 3, height, width)`; `patch_offsets` (one `[image_index,
            start, end]` entry per window) exactly when images are split into windows (`do_split_image`), whatever
            `return_tensors`: the model hands them to its output unchanged, where post-processing reads them; and per
            input `mask_labels` `(num_masks, height, width)` and `class_labels` `(num_masks,)` when segmentation maps
            are given.
        """
        opts = self._options(overrides)
        images = image_list(images)
        inputs = [to_chw(image, index, input_data_format, opts["do_rescale"]) for index, image in enumerate(images)]
        pixels, whites = [pixels for pixels, _ in inputs], [white for _, white in inputs]
        if device is not None:
            pixels = [p.to(device) for p in pixels]
        original_sizes = [tuple(p.shape[-2:]) for p in pixels]
        resized = [self.resized_size(h, w, opts["size"]) if opts["do_resize"] else (h, w) for h, w in original_sizes]
        mode = _resample_mode(opts["resample"])
        pixels = [_resize(p, hw, mode) for p, hw in zip(pixels, resized)]
        pixels = [self._normalize(p, opts, white) for p, white in zip(pixels, whites)]
        fill = self._normalize(torch.zeros(3, 1, 1, dtype=torch.uint8, device=pixels[0].device), opts, 255.0)

        offsets = geometry.window_offsets(resized, opts["size"]["shortest_edge"] if opts["do_split_image"] else None)
        pad_to = self.pad_size(opts["size"]) if opts["do_pad"] else None
        placements = geometry.layout(original_sizes, resized, offsets, pad_to).placements
        data: dict[str, Any] = {"pixel_values": _assemble(pixels, placements, fill, opts["do_pad"])}
        if opts["do_split_image"]:
            data["patch_offsets"] = [torch.tensor(offset) for offset in offsets]

        if segmentation_maps is not None:
            maps = [to_label_map(m, i) for i, m in enumerate(map_list(segmentation_maps, len(pixels)))]
            for index, (label_map, hw) in enumerate(zip(maps, original_sizes)):
                if tuple(label_map.shape) != hw:
                    raise ValueError(
                        f"Segmentation map {index} has size {tuple(label_map.shape)} but its image is {hw}; "
                        "pass maps at the size of their images."
                    )
            ignore = opts["ignore_index"]
            if opts["do_reduce_labels"]:
                maps = [torch.where(m == 0, ignore, m - 1) for m in maps]
            maps = [_resize(m[None].to(pixels[0].device), hw, "nearest-exact")[0] for m, hw in zip(maps, resized)]
            void = torch.full((1, 1, 1), -1 if ignore is None else ignore)
            canvases = _assemble([m[None] for m in maps], placements, void, opts["do_pad"])
            mask_labels, class_labels = [], []
            for canvas, placement in zip(canvases, placements):
                mapping = instance_id_to_semantic_id
                if isinstance(mapping, (list, tuple)):
                    mapping = mapping[placement.image_index]
                masks, classes = binary_masks(canvas[0], mapping, ignore, opts["do_reduce_labels"])
                mask_labels.append(masks)
                class_labels.append(classes)
            data["mask_labels"], data["class_labels"] = mask_labels, class_labels

        if return_tensors in ("np", "numpy"):
            data = {
                k: v.cpu().numpy() if torch.is_tensor(v) else [t.cpu().numpy() for t in v] for k, v in data.items()
            }
        elif return_tensors is None:  # as transformers' processors: a list of arrays per image, targets as tensors
            data["pixel_values"] = [t.cpu().numpy() for t in data["pixel_values"]]
        elif return_tensors != "pt":
            raise ValueError(f"`return_tensors` must be 'pt', 'np' or None, got {return_tensors!r}.")
        return BatchFeature(data=data)

    def _options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = set(overrides) - set(OPTIONS)
        if unknown:
            raise ValueError(f"Unknown option(s) {sorted(unknown)}; valid options: {', '.join(OPTIONS)}.")
        opts = {name: overrides[name] if overrides.get(name) is not None else getattr(self, name) for name in OPTIONS}
        opts["size"] = size_dict(opts["size"])
        for name in ("image_mean", "image_std"):
            opts[name] = channel_statistic(name, opts[name])
        if opts["do_reduce_labels"] is None:  # the Hub configs' meaning of `ignore_index`
            opts["do_reduce_labels"] = opts["ignore_index"] is not None
        if opts["do_reduce_labels"] and opts["ignore_index"] is None:
            raise ValueError("`do_reduce_labels=True` needs an `ignore_index` (e.g. 255).")
        return opts

    def _normalize(self, image: torch.Tensor, opts: dict[str, Any], white: float | None) -> torch.Tensor:
        """Rescale and normalise in one multiply-add per pixel, on a float32 copy. `white` is the value of full
        intensity (255 for 8-bit levels, 65535 for 16-bit) or `None` for floats already in [0, 1]: `rescale_factor`
        is the factor of 8-bit levels, other ranges are scaled to match, as `do_rescale` does for 8-bit ones."""
        factor = opts["rescale_factor"] * 255 / white if opts["do_rescale"] and white else 1.0
        scale = torch.full((3,), factor, dtype=torch.float64)
        shift = torch.zeros(3, dtype=torch.float64)
        if opts["do_normalize"]:
            mean = torch.tensor(opts["image_mean"], dtype=torch.float64)
            std = torch.tensor(opts["image_std"], dtype=torch.float64)
            scale, shift = scale / std, -mean / std
        scale, shift = (t.to(image.device, torch.float32).view(-1, 1, 1) for t in (scale, shift))
        return image.to(torch.float32, copy=True).mul_(scale).add_(shift)

    # ------------------------------------------------------------------ post-processing

    def post_process(
        self,
        outputs,
        task: str,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor,
        as_segments: bool = False,
        **options,
    ) -> list:
        """
        The post-processing of `task` (one of `TASKS`): "panoptic" → [`post_process_panoptic_segmentation`],
        "instance" → [`post_process_instance_segmentation`], "semantic" → [`post_process_semantic_segmentation`] (class
        maps) or, with `as_segments`, [`post_process_semantic_segments`] (one segment per class, in the format of the
        other two). `options` (`size`, `threshold`, ...) go to that method, which ignores the other tasks' options.
        """
        if task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
        method = {
            "panoptic": self.post_process_panoptic_segmentation,
            "instance": self.post_process_instance_segmentation,
            "semantic": self.post_process_semantic_segments
            if as_segments
            else self.post_process_semantic_segmentation,
        }[task]
        return method(outputs, target_sizes, **options)

    def post_process_semantic_segmentation(
        self,
        outputs,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor,
        size: dict[str, int] | None = None,
        return_segmentation_scores: bool = False,
        **kwargs,
    ):
        """
        Per-pixel classes: per model input `einsum(sigmoid(masks), softmax(classes)[..., :-1])`, windows averaged
        where they overlap, padding cropped, resized to `target_sizes` (the original `(height, width)` of each image),
        argmax. `outputs` is the model's output or a mapping with its `class_queries_logits` and `masks_queries_logits`
        (and `patch_offsets` for windows) as tensors or numpy arrays, e.g. onnxruntime's outputs by name. The panoptic
        and instance options (`threshold`, ...) are accepted and unused; unknown options are an error.

        Returns:
            `list[torch.LongTensor]` of `(height, width)` class maps, or with `return_segmentation_scores` a list of
            `SemanticSegmentationPostProcessorOutput` (`segmentation`, `segmentation_scores` `(num_labels, h, w)`).
        """
        return self._apply(
            SEMANTIC.semantic_segmentation,
            outputs,
            target_sizes,
            size,
            kwargs,
            return_segmentation_scores=return_segmentation_scores,
        )

    def post_process_panoptic_segmentation(
        self,
        outputs,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor,
        threshold: float = 0.8,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        stuff_classes: Iterable[int] | None = None,
        size: dict[str, int] | None = None,
        **kwargs,
    ) -> list[dict[str, Any]]:
        """
        Non-overlapping segments: queries whose best class is an object with probability > `threshold` compete
        per pixel (class probability × mask probability); a query keeps the pixels it wins where its mask
        probability ≥ `mask_threshold`, if they are more than `overlap_mask_area_threshold` of its own mask.
        Segments of a class in `stuff_classes` are fused into one. `outputs` as in
        [`post_process_semantic_segmentation`].

        Returns:
            One dict per image: `segmentation` `(height, width)` of segment ids (-1 where no segment) and
            `segments_info`, a list of `{"id", "label_id", "score"}`. Sliding-window (semantic) outputs give one
            segment per class of the semantic map.
        """
        options = {
            "threshold": threshold,
            "mask_threshold": mask_threshold,
            "overlap_mask_area_threshold": overlap_mask_area_threshold,
            "stuff_classes": stuff_classes,
        }
        if has_windows(outputs):
            return self.post_process_semantic_segments(outputs, target_sizes, size, **options, **kwargs)
        return self._apply(panoptic_segmentation, outputs, target_sizes, size, kwargs, **options)

    def post_process_instance_segmentation(
        self,
        outputs,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor,
        threshold: float = 0.8,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        size: dict[str, int] | None = None,
        top_k: int | None = None,
        return_binary_maps: bool = False,
        **kwargs,
    ) -> list[dict[str, Any]]:
        """
        Possibly overlapping instances: each query's best class (or with `top_k`, the `top_k` best
        (query, class) pairs of the image, the original release's evaluation rule); mask = logit > 0 (sigmoid >
        `mask_threshold`); score = class probability × mean mask probability inside the mask; kept when
        non-empty and score ≥ `threshold`. `overlap_mask_area_threshold` is accepted (the pipeline passes it) and
        unused. For `threshold` ≥ 0.5 both rules select the same instances. `outputs` as in
        [`post_process_semantic_segmentation`].

        Returns:
            One dict per image: `segmentation` `(height, width)` of instance ids (later instances drawn over earlier
            ones; -1 where none), or `(num_instances, height, width)` booleans with `return_binary_maps`, and
            `segments_info`, a list of `{"id", "label_id", "score"}`.
        """
        options = {"threshold": threshold, "mask_threshold": mask_threshold, "top_k": top_k}
        unused = {**kwargs, "overlap_mask_area_threshold": overlap_mask_area_threshold}
        if has_windows(outputs):
            return self.post_process_semantic_segments(
                outputs, target_sizes, size, return_binary_maps, **options, **unused
            )
        return self._apply(
            instance_segmentation,
            outputs,
            target_sizes,
            size,
            unused,
            return_binary_maps=return_binary_maps,
            **options,
        )

    def post_process_semantic_segments(
        self,
        outputs,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor,
        size: dict[str, int] | None = None,
        return_binary_maps: bool = False,
        **kwargs,
    ) -> list[dict[str, Any]]:
        """
        The semantic segmentation as segments, one per class present, in the panoptic format. A segment's score is
        the mean over its pixels of its class's share of the pixel's class scores. Panoptic and instance
        post-processing return these for sliding-window (semantic) outputs, whose queries are unrelated across
        windows. The scores of all classes never exist at the target size at once. The other post-processings'
        options are accepted and unused.

        Returns:
            One dict per image: `segmentation` `(height, width)` of segment ids, or `(num_segments, height, width)`
            booleans with `return_binary_maps`, and `segments_info`, a list of `{"id", "label_id", "score"}`.
        """
        return self._apply(
            SEMANTIC.semantic_segments, outputs, target_sizes, size, kwargs, return_binary_maps=return_binary_maps
        )

    def _apply(self, function, outputs, target_sizes, size: dict | None, unused: dict[str, Any], **options) -> list:
        """`function(class logits, mask logits, layout, **options)` on `outputs`, after checking, in this one place,
        the outputs, the target sizes against them, and the options (`unused`: accepted, checked, not passed on)."""
        class_logits, mask_logits, patch_offsets, sizes = checked_arguments(outputs, target_sizes, unused, options)
        return function(class_logits, mask_logits, self.layout(sizes, patch_offsets, size), **options)

    def to_dict(self) -> dict[str, Any]:
        """Every option, `None` included (transformers drops `None` values, and `do_reduce_labels=None` differs from
        `False`), under the class name transformers saves for every backend of its EoMT processor."""
        return {
            **super().to_dict(),
            **{name: getattr(self, name) for name in OPTIONS},
            "image_processor_type": "EomtImageProcessor",
        }


class EomtImageProcessorPil(EomtImageProcessor):
    """`EomtImageProcessor` under the name transformers gives its PIL-backend EoMT processor, so that
    `preprocessor_config.json` files naming that class load ours too (`AutoImageProcessor` resolves names first). It
    saves as "EomtImageProcessor", as transformers' does."""


# ---------------------------------------------------------------------- helpers


def _scaled_size(height: int, width: int, shortest: int, longest: int | None) -> tuple[int, int]:
    """Short side to `shortest`, unless that takes the long side beyond `longest` (then the long side is `longest`).
    The rounding follows the Hub processors so that sizes agree to the pixel."""
    short, long = float(min(height, width)), float(max(height, width))
    exact = None
    if longest is not None and long / short * shortest > longest:
        exact = longest * short / long
        shortest = round(exact)
    if min(height, width) == shortest:
        return height, width
    scale = exact if exact is not None else shortest
    shortest = max(1, shortest)  # over 2 × longest : 1 (1280:1 by default), the short side would round to 0
    if width < height:
        return int(scale * height / width), shortest
    return shortest, int(scale * width / height)


def _resample_mode(resample: int) -> str:
    try:
        return RESAMPLE_MODES[int(resample)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"`resample` must be 0 (nearest), 2 (bilinear) or 3 (bicubic), got {resample!r}.") from None


def _resize(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if mode == "nearest-exact":
        dtype = image.dtype
        work = image.double() if not image.is_floating_point() else image
        return F.interpolate(work[None], size=size, mode=mode)[0].to(dtype)
    uint8 = image.dtype == torch.uint8
    work = image if uint8 or image.is_floating_point() else image.float()
    if uint8 and mode == "bicubic":  # no uint8 bicubic kernel
        out = F.interpolate(work[None].float(), size=size, mode=mode, antialias=True, align_corners=False)
        return out[0].round().clamp(0, 255).to(torch.uint8)
    # Antialiased bilinear on uint8 is the fast path and matches PIL to ±1 grey level.
    return F.interpolate(work[None], size=size, mode=mode, antialias=True, align_corners=False)[0]


def _assemble(
    images: list[torch.Tensor], placements: Sequence[Placement], fill: torch.Tensor, do_pad: bool
) -> torch.Tensor:
    """Cut each model input out of its resized image and paste it on its canvas filled with `fill`."""
    crops = [
        images[p.image_index][:, p.top : p.top + p.height, p.left : p.left + p.width] for p in placements
    ]  # fmt: skip
    if not do_pad:
        if len({tuple(c.shape) for c in crops}) > 1:
            raise ValueError(
                "Images of different sizes cannot be batched without padding; pass `do_pad=True` or one image at a time."
            )
        return torch.stack(crops)
    height, width = (max(p.canvas[axis] for p in placements) for axis in (0, 1))
    batch = fill.to(crops[0].dtype).expand(len(crops), crops[0].shape[0], height, width).clone()
    for out, crop in zip(batch, crops):
        out[:, : crop.shape[1], : crop.shape[2]] = crop
    return batch
