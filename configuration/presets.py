"""Architectures and metadata of the released EoMT checkpoints (DINOv2 and DINOv3 backbones, Hub org `tue-mps`)."""

from __future__ import annotations

from dataclasses import dataclass

# Backbone sizes: width, depth, heads, and how many final blocks see the queries.
SIZES: dict[str, dict] = {
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "num_blocks": 3},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_blocks": 3},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "num_blocks": 4},
    "giant": {
        "hidden_size": 1536,
        "num_hidden_layers": 40,
        "num_attention_heads": 24,
        "num_blocks": 5,
        "use_swiglu_ffn": True,
    },
}

# DINOv3 backbones (plain GELU MLP, no key bias; the release's LayerNorm eps comes from the DINOv3 config).
DINOV3_SIZES: dict[str, dict] = {
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "num_blocks": 3,
              "intermediate_size": 1536, "layer_norm_eps": 1e-5},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_blocks": 3,
             "intermediate_size": 3072, "layer_norm_eps": 1e-5},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "num_blocks": 4,
              "intermediate_size": 4096, "layer_norm_eps": 1e-5},
}  # fmt: skip

# Backbone names of the original release (timm), by size.
TIMM_BACKBONES: dict[str, str] = {size: f"vit_{size}_patch14_reg4_dinov2" for size in SIZES}

# The pretrained backbones a training run starts from, in transformers' format, by family and size.
BASE_BACKBONES: dict[str, dict[str, str]] = {
    "dinov2": {size: f"facebook/dinov2-with-registers-{size}" for size in SIZES},
    "dinov3": {
        size: f"facebook/dinov3-vit{letter}16-pretrain-lvd1689m"
        for size, letter in (("small", "s"), ("base", "b"), ("large", "l"))
    },
}

DATASETS: dict[str, dict] = {
    "coco_panoptic": {"num_labels": 133, "task": "panoptic", "dataset": "coco", "metric": "pq"},
    "coco_instance": {"num_labels": 80, "task": "instance", "dataset": "coco", "metric": "map"},
    "ade20k_panoptic": {"num_labels": 150, "task": "panoptic", "dataset": "ade20k", "metric": "pq"},
    "ade20k_semantic": {"num_labels": 150, "task": "semantic", "dataset": "ade20k", "metric": "miou"},
    "cityscapes_semantic": {"num_labels": 19, "task": "semantic", "dataset": "cityscapes", "metric": "miou"},
}


@dataclass(frozen=True)
class Preset:
    """A released checkpoint: its architecture and the result the paper reports for it."""

    name: str
    size: str
    image_size: int
    num_queries: int
    labels: str  # key of DATASETS
    result: float  # PQ, mIoU or mask AP in percent
    backbone: str = "dinov2"  # family: "dinov2" or "dinov3"

    @property
    def task(self) -> str:
        return DATASETS[self.labels]["task"]

    @property
    def metric(self) -> str:
        return DATASETS[self.labels]["metric"]

    @property
    def hub_id(self) -> str:
        return f"tue-mps/{self.name}"

    @property
    def base_backbone(self) -> str:
        """Hub id of the pretrained backbone the checkpoint was trained from (DINOv3 deltas are stored against it)."""
        return BASE_BACKBONES[self.backbone][self.size]

    @property
    def sliding_windows(self) -> bool:
        """Whether the processor cuts semantic inputs into windows (else it pads to a square, as panoptic does).
        The DINOv3 ADE20K release pads."""
        return self.task == "semantic" and self.backbone == "dinov2"

    def describe(self) -> dict:
        return {
            "name": self.name, "hub_id": self.hub_id, "task": self.task, "labels": self.labels,
            "num_labels": DATASETS[self.labels]["num_labels"], "num_queries": self.num_queries,
            "num_blocks": (DINOV3_SIZES if self.backbone == "dinov3" else SIZES)[self.size]["num_blocks"],
            "image_size": self.image_size, "sliding_windows": self.sliding_windows, "backbone": self.backbone,
            "base_backbone": self.base_backbone, "metric": self.metric, "result": self.result,
        }  # fmt: skip

    def config_kwargs(self) -> dict:
        return dict(
            **(DINOV3_SIZES if self.backbone == "dinov3" else SIZES)[self.size],
            image_size=self.image_size,
            num_queries=self.num_queries,
            num_labels=DATASETS[self.labels]["num_labels"],
        )


def _preset(labels: str, size: str, image_size: int, result: float, suffix: str = "") -> Preset:
    name = f"{labels}_eomt_{size}_{image_size}{suffix}"
    num_queries = 100 if labels.endswith("semantic") else 200
    return Preset(name, size, image_size, num_queries, labels, result, "dinov3" if suffix == "_dinov3" else "dinov2")


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _preset("coco_panoptic", "small", 640, 46.7, "_2x"),
        _preset("coco_panoptic", "base", 640, 51.6, "_2x"),
        _preset("coco_panoptic", "large", 640, 56.0),
        _preset("coco_panoptic", "large", 1280, 58.3),
        _preset("coco_panoptic", "giant", 640, 57.0),
        _preset("coco_panoptic", "giant", 1280, 59.2),
        _preset("ade20k_panoptic", "large", 640, 50.6),
        _preset("ade20k_panoptic", "giant", 640, 51.3),
        _preset("ade20k_semantic", "large", 512, 58.4),
        _preset("cityscapes_semantic", "large", 1024, 84.2),
        _preset("coco_instance", "large", 640, 45.2),
        _preset("coco_instance", "large", 1280, 48.8),
        _preset("coco_panoptic", "small", 640, 47.2, "_dinov3"),
        _preset("coco_panoptic", "base", 640, 53.1, "_dinov3"),
        _preset("coco_panoptic", "large", 640, 56.8, "_dinov3"),
        _preset("coco_panoptic", "large", 1280, 58.9, "_dinov3"),
        _preset("ade20k_semantic", "large", 512, 59.5, "_dinov3"),
        _preset("coco_instance", "large", 640, 45.9, "_dinov3"),
        _preset("coco_instance", "large", 1280, 49.9, "_dinov3"),
    )
}
