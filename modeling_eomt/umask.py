"""Saved files get the umask's permissions. safetensors (0.8) creates its files private (mode 0600, whatever the
umask), so a converted or trained model's weights were unreadable to the group and others beside readable files."""

from __future__ import annotations

import os
from pathlib import Path


def apply_umask(path: Path) -> None:
    """Give the file `path`, or every file under the folder `path`, the mode a plain `open()` would create it with:
    0666 minus the umask."""
    umask = os.umask(0)  # reading the umask means setting it; it is restored at once
    os.umask(umask)
    for file in [path] if path.is_file() else path.rglob("*"):
        if file.is_file() and not file.is_symlink():
            file.chmod(0o666 & ~umask)
