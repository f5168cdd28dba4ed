"""Whole files: atomic JSON writes, a truncation check for safetensors files, folders built in a temporary
place and renamed into position (so that a killed build never leaves half a folder where it is expected)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_json(path: Path, data) -> None:
    """Write JSON atomically: a temporary file renamed into place."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def usual_mode(path: str | os.PathLike) -> None:
    """Give a file or folder the permissions a plain open or mkdir gives under the umask: `mkdtemp` makes folders
    owner-only and safetensors writes files owner-only, which others sharing a cache or an index cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def safetensors_problem(file: Path) -> str | None:
    """None if a safetensors file holds every byte its header promises, else what is wrong with it."""
    if not file.exists():
        return "is missing"
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "is empty or cut off"
        header_len = int.from_bytes(head, "little")
        if header_len > size:
            return "has a header longer than the file"
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "has an unreadable header"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        return f"is cut off ({size:,} of {8 + header_len + end:,} bytes)"
    return None


def build_folder(path: Path, write: Callable[[Path], None]) -> Path:
    """Build a folder with `write(tmp)` in a temporary sibling, then rename it to `path` (replacing it).

    Temporary siblings left by an earlier, killed build are removed first: call this under a lock when
    several processes may build the same folder. The folder and everything in it get the usual permissions
    (not `mkdtemp`'s owner-only 0700, nor the 0600 some writers give files), so that others sharing the cache
    can read it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write(tmp)
        usual_mode(tmp)
        for root, folders, files in os.walk(tmp):  # some writers (safetensors) leave files owner-only
            for name in folders + files:
                usual_mode(os.path.join(root, name))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
