"""Open a source as its users download it: an extracted folder or the original .zip."""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath


class SourceError(ValueError):
    """A source path that is missing, unsafe or not laid out as the dataset is distributed."""


def listing(path: Path, limit: int = 12) -> str:
    """A short description of what is in a folder, for error messages."""
    if not path.is_dir():
        return "(not a folder)"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return "(empty folder)"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def safe_members(archive: zipfile.ZipFile, zip_path: Path) -> list[zipfile.ZipInfo]:
    """All members of ``archive``; refuses absolute paths and ``..`` (zip-slip)."""
    members = archive.infolist()
    for info in members:
        name = info.filename.replace("\\", "/")
        pure = PurePosixPath(name)
        if name.startswith("/") or pure.is_absolute() or ".." in pure.parts or ":" in pure.parts[0]:
            raise SourceError(
                f"refusing {str(zip_path)!r}: entry {info.filename!r} has an absolute path or '..' "
                "and would be written outside the extraction folder. Extract the archive yourself, "
                "check its contents, and pass the folder instead."
            )
    return members


def open_source(source: str | Path, scratch: Path) -> Path:
    """Return a folder with the source's files: ``source`` itself, or the .zip extracted into
    ``scratch`` (which the caller deletes afterwards)."""
    source = Path(source).expanduser()
    if not source.exists():
        raise SourceError(
            f"source {str(source)!r} does not exist. Pass the dataset's extracted folder or its "
            "original .zip with --source."
        )
    if source.is_dir():
        return source
    if not zipfile.is_zipfile(source):
        raise SourceError(
            f"source {str(source)!r} is a file but not a .zip archive. Pass the extracted folder "
            "or the original .zip."
        )
    with zipfile.ZipFile(source) as archive:
        members = safe_members(archive, source)
        scratch.mkdir(parents=True, exist_ok=True)
        archive.extractall(scratch, members=members)
    return scratch
