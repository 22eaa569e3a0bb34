"""Open a source as its users download it: an extracted folder or the original .zip."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path, PurePosixPath


class SourceError(ValueError):
    """A source path that is missing, unsafe or not laid out as the dataset is distributed."""


def find_root(top: Path, is_root, source: str, layout: str) -> Path:
    """The first folder ``is_root`` accepts: ``top`` itself, a folder inside it, or one
    inside those (a download unpacks into one or two extra folders). Else a SourceError
    saying the ``source`` dataset expects ``layout`` and what ``top`` holds."""
    levels = [[top], sorted(p for p in top.iterdir() if p.is_dir())]
    levels.append(sorted(q for p in levels[1] for q in p.iterdir() if q.is_dir()))
    for level in levels:
        for folder in level:
            if is_root(folder):
                return folder
    raise SourceError(
        f"{str(top)!r} is not a {source} source: expected {layout} (at the top or inside one "
        f"folder), but found: {listing(top)}."
    )


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


#: Limits on a .zip source, checked on its directory before anything is extracted. JPEG and
#: PNG X-rays hardly compress (FracAtlas' zip: about 1.0x), so an entry that expands more
#: than MAX_RATIO times (above RATIO_FLOOR bytes) is a zip bomb, not an image dataset.
MAX_RATIO = 100
RATIO_FLOOR = 1 << 20
MAX_TOTAL_BYTES = 64 << 30
MAX_MEMBERS = 1_000_000


def check_sizes(members: list[zipfile.ZipInfo], zip_path: Path, free_bytes: int) -> int:
    """Refuse, by the sizes the archive declares, what would be too big to extract; returns
    the total. (zipfile stops every entry at its declared size and checks its CRC, so a
    header that understates a size fails instead of filling the disk.)"""
    advice = "If you trust the archive, extract it yourself and pass the folder with --source."
    if len(members) > MAX_MEMBERS:
        raise SourceError(
            f"refusing {str(zip_path)!r}: {len(members):,} entries, more than {MAX_MEMBERS:,}. "
            + advice
        )
    total = 0
    for info in members:
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_FLOOR and ratio > MAX_RATIO:
            raise SourceError(
                f"refusing {str(zip_path)!r}: entry {info.filename!r} expands from "
                f"{info.compress_size:,} to {info.file_size:,} bytes ({ratio:,.0f}x, the limit "
                f"is {MAX_RATIO}x for X-ray images): a zip bomb or not an image dataset. " + advice
            )
        total += info.file_size
    limit = min(MAX_TOTAL_BYTES, free_bytes)
    if total > limit:
        why = "free on the disk" if free_bytes < MAX_TOTAL_BYTES else "the limit"
        raise SourceError(
            f"refusing {str(zip_path)!r}: its entries hold {total:,} bytes uncompressed, more "
            f"than the {limit:,} bytes {why} for extracting it. " + advice
        )
    return total


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
        check_sizes(members, source, shutil.disk_usage(scratch).free)
        for info in members:
            try:
                archive.extract(info, scratch)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError) as err:
                raise SourceError(
                    f"cannot extract entry {info.filename!r} of {str(source)!r}: {err}. "
                    "Extract the archive yourself, check it, and pass the folder."
                ) from err
    return scratch
