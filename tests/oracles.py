"""Test-only oracles that cannot share the package's environment.

timm (the reference for backbone resampling) needs torchvision, whose wheels ask for a newer torch than the CPU build
the project installs (a multi-GB CUDA build). `make install` puts both, without dependencies, into `.venv/oracles`,
outside the environment's import path, so nothing but the tests that ask for them sees them (transformers would
otherwise find torchvision and use it). torchvision's compiled ops do not load beside this torch; timm needs none of
them, but torchvision's import registers fake kernels for two of them, so their schemas are declared first.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

ORACLES = Path(sys.prefix) / "oracles"
_LIBRARY = []  # keeps the declared schemas alive


def import_timm() -> ModuleType:
    if not (ORACLES / "timm").is_dir():
        raise RuntimeError(f"timm is not installed in {ORACLES}; run `make install` (see the Makefile).")
    if str(ORACLES) not in sys.path:
        sys.path.append(str(ORACLES))
    import torch

    if not _LIBRARY and not hasattr(torch.ops.torchvision, "nms"):
        library = torch.library.Library("torchvision", "DEF")
        for name in ("nms", "qnms"):
            library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARY.append(library)
    return importlib.import_module("timm")
