"""Saved files get the umask's permissions. safetensors (0.8) creates its files private (mode 0600, whatever the
umask), so a converted or trained model's weights were unreadable to the group and others beside readable files."""

from __future__ import annotations

import os
from pathlib import Path


def apply_umask(folder: Path) -> None:
    """Give every file under `folder` the mode a plain `open()` would create it with: 0666 minus the umask."""
    umask = os.umask(0)  # reading the umask means setting it; it is restored at once
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)
