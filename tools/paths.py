"""Path checks shared by the kit's library code and its commands: an input that must exist as a file or folder, an
output location checked before the work that fills it. Each error names the path, what is there instead, and the fix."""
from __future__ import annotations

from pathlib import Path


def expect_path(path: str | Path, kind: str, what: str, fix: str) -> Path:
    """`path` as a Path when it is an existing `kind` ("file" or "folder"); else an OSError that says what is there
    instead (a folder where a file is expected, or the reverse, or nothing), then the fix in brackets."""
    path = Path(path)
    if path.is_dir() if kind == "folder" else path.is_file():
        return path
    name = f"{what} {path}" if what else str(path)
    if not path.exists():
        raise FileNotFoundError(f"{name} not found ({fix})")
    if path.is_dir():
        raise IsADirectoryError(f"{name} is a folder, expected a file ({fix})")
    if kind == "folder":
        raise NotADirectoryError(f"{name} is a file, expected a folder ({fix})")
    raise OSError(f"{name} is not a regular file ({fix})")


def expect_output(path: str | Path, kind: str, what: str) -> Path:
    """An output location, checked before the work that fills it: nothing of the other kind there, and a file's
    folder exists (a folder is created with its parents)."""
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    if kind == "file" and path.is_dir():
        raise IsADirectoryError(f"{name} is a folder, expected a file (name the file to write)")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{name} is a file, expected a folder (name a folder to write into)")
    if kind == "file" and not path.parent.is_dir():
        raise FileNotFoundError(f"{name}: its folder {path.parent} not found (create it, or name another)")
    return path
