"""Model card (`README.md`) of an EoMT checkpoint: Hub metadata, results, usage and citation."""

from __future__ import annotations

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .configuration import DINOV3_SIZES, SIZES, EomtBaseConfig
from .configuration.presets import DATASETS

# Dataset key of `DATASETS` → (display name, Hub dataset id).
DATASET_INFO = {
    "coco": ("COCO", "coco"),
    "ade20k": ("ADE20K", "zhoubolei/scene_parse_150"),
    "cityscapes": ("Cityscapes", "cityscapes"),
}
# Metric key → (model-index metric type, display name).
METRIC_INFO = {"pq": ("pq", "PQ"), "miou": ("mean_iou", "mIoU"), "map": ("map", "mask AP")}

CITATION = """@inproceedings{kerssies2025eomt,
  author    = {Kerssies, Tommie and Cavagnero, Niccol{\\`o} and Hermans, Alexander and Norouzi, Narges and
               Averta, Giuseppe and Leibe, Bastian and Dubbelman, Gijs and de Geus, Daan},
  title     = {Your {ViT} is Secretly an Image Segmentation Model},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2025},
}"""


def build_model_card(
    config: EomtBaseConfig,
    task: str,
    dataset: str | None = None,
    metrics: dict[str, float] | None = None,
    model_name: str = "eomt",
    repo_id: str | None = None,
    notes: str | None = None,
    base_backbone: str | None = None,
) -> str:
    """The text of a model card.

    Args:
        config: The model's config (architecture figures and label count).
        task: "panoptic", "instance" or "semantic" (decides the usage snippet).
        dataset: Key of `DATASETS` ("coco_panoptic", …) for a known benchmark, or any other dataset name or Hub id.
        metrics: Results in percent by metric key ("pq", "miou", "map"), reported as the Hub's model-index.
        model_name: Title of the card.
        repo_id: Hub repo the files go to (used in the snippet; defaults to `model_name`).
        notes: A paragraph on where the weights come from (conversion, fine-tuning), placed after the summary.
        base_backbone: The pretrained backbone training started from (a Hub id or path), named in the card.
    """
    family, sizes = ("DINOv3", DINOV3_SIZES) if config.uses_rope else ("DINOv2", SIZES)
    spec = DATASETS.get(dataset) if dataset else None
    dataset_name, dataset_id = DATASET_INFO[spec["dataset"]] if spec else (dataset, dataset)
    eval_results = None
    if metrics and dataset_id:
        eval_results = [
            EvalResult(
                task_type="image-segmentation",
                task_name=f"{task.capitalize()} Segmentation",
                dataset_type=dataset_id,
                dataset_name=dataset_name,
                dataset_split="validation",
                metric_type=METRIC_INFO[key][0],
                metric_name=METRIC_INFO[key][1],
                metric_value=value,
            )
            for key, value in metrics.items()
        ]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-segmentation",
        license="mit",
        tags=["eomt", family.lower(), "vision", "image-segmentation", f"{task}-segmentation"],
        base_model=base_backbone if base_backbone and "/" in base_backbone else None,
        datasets=[dataset_id] if dataset_id else None,
        model_name=model_name,
        eval_results=eval_results,
    )
    size = next(
        (
            name
            for name, s in sizes.items()
            if (s["hidden_size"], s["num_hidden_layers"]) == (config.hidden_size, config.num_hidden_layers)
        ),
        None,
    )
    backbone = f"{family} ViT-{size[0].upper()}" if size else f"{family}-style ViT"
    repo = repo_id or model_name
    lines = [
        f"# {model_name}",
        "",
        (
            f"EoMT (Encoder-only Mask Transformer) for **{task} segmentation**"
            + (f" on {dataset_name}" if dataset_name else "")
            + f": a {backbone} ({config.num_hidden_layers} blocks, width {config.hidden_size}) "
            f"whose last {config.num_blocks} blocks also process {config.num_queries} learned queries, at "
            f"{config.image_size}×{config.image_size} pixels, predicting {config.num_labels} classes."
        ),
        "",
        (
            "Paper: [Your ViT is Secretly an Image Segmentation Model](https://arxiv.org/abs/2503.19108) "
            "(CVPR 2025). Original code: [tue-mps/eomt](https://github.com/tue-mps/eomt)."
        ),
    ]
    if base_backbone:
        lines += ["", f"Trained from the pretrained backbone `{base_backbone}`."]
    if notes:
        lines += ["", notes]
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {METRIC_INFO[key][1]} | {value} |" for key, value in metrics.items()]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import modeling_eomt  # registers the EoMT classes with the Auto classes",
        "from transformers import pipeline",
        "",
        f'segmenter = pipeline("image-segmentation", model="{repo}")',
        f'segments = segmenter("image.jpg", subtask="{task}")',
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines)))
