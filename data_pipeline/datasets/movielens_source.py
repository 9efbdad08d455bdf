"""Find a MovieLens copy and read its raw files, checksummed.

Resolution order (:func:`resolve_source`):

1. ``source`` given: a GroupLens zip or an unpacked folder, in the ml-100k layout (``u.data``,
   ``u.user``, ``u.item``), the ml-1m/10m layout (``ratings.dat``, ``users.dat``,
   ``movies.dat``), the ml-20m/25m/32m layout (``ratings.csv``, ``movies.csv``), or RecBole's
   atomic files (``ml-100k.inter``, ``.user``, ``.item``).
2. A GroupLens zip already downloaded into the cache directory.
3. The GroupLens download URL (short timeout; the zip is kept in the cache directory).
4. ml-100k only, offline: the copy RecBole 1.2.1 ships in its wheel. The wheel is fetched with
   ``pip download`` (never installed) and the three files are read out of it with ``zipfile``
   and checked against hard-coded sha256 digests.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

Layout = Literal["ml-100k", "dat", "csv", "recbole"]
SourceKind = Literal["path", "cache", "url", "recbole"]

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-{variant}.zip"
DOWNLOAD_TIMEOUT_S = 5.0
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_PREFIX = "recbole/dataset_example/ml-100k/"
# sha256 of the files read out of the recbole 1.2.1 wheel (computed once, verified on every read).
RECBOLE_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}

# Layout -> (ratings, users, items) file names; users/items may be absent in some releases.
LAYOUT_FILES: dict[Layout, tuple[str, str, str]] = {
    "ml-100k": ("u.data", "u.user", "u.item"),
    "dat": ("ratings.dat", "users.dat", "movies.dat"),
    "csv": ("ratings.csv", "users.csv", "movies.csv"),
    "recbole": ("ml-100k.inter", "ml-100k.user", "ml-100k.item"),
}
VARIANT_LAYOUTS: dict[str, tuple[Layout, ...]] = {
    "100k": ("ml-100k", "recbole"),
    "1m": ("dat",),
    "10m": ("dat",),
    "20m": ("csv",),
    "25m": ("csv",),
    "32m": ("csv",),
}


class SourceError(RuntimeError):
    """No usable MovieLens copy, or a copy whose contents do not match what was expected."""


@dataclass(frozen=True)
class RawFiles:
    """The raw bytes of one MovieLens copy.

    Args:
        layout: which file layout the bytes follow.
        ratings: the ratings file.
        users: the user file, None where the release has none (ml-10m, ml-20m+).
        items: the movie file, None if missing.
        sha256: file name -> sha256 of the bytes read.
    """

    layout: Layout
    ratings: bytes
    users: bytes | None
    items: bytes | None
    sha256: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedSource:
    """Where the data came from, for logs and ``manifest.source``.

    Args:
        kind: ``path`` (given), ``cache`` (earlier download), ``url`` or ``recbole``.
        location: the file or folder read (``wheel!member-prefix`` for recbole).
        files: the bytes read.
        url: the download URL, for ``url`` sources.
    """

    kind: SourceKind
    location: str
    files: RawFiles
    url: str | None = None

    def to_json(self) -> dict[str, object]:
        where = {"path": self.location} | ({"url": self.url} if self.url else {})
        return {
            "kind": self.kind,
            **where,
            "layout": self.files.layout,
            "sha256": combined_sha256(self.files.sha256),
            "files": dict(sorted(self.files.sha256.items())),
        }


def combined_sha256(file_digests: dict[str, str]) -> str:
    """One digest over ``name:sha256`` lines, sorted by name."""
    lines = "".join(f"{name}:{digest}\n" for name, digest in sorted(file_digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("TWOTOWER_CACHE", Path.home() / ".cache" / "twotower"))


def resolve_source(
    variant: str,
    source: Path | None = None,
    cache_dir: Path | None = None,
    allow_download: bool = True,
) -> ResolvedSource:
    """Find and read a MovieLens copy (see the module docstring for the order)."""
    if variant not in VARIANT_LAYOUTS:
        raise SourceError(f"unknown MovieLens variant '{variant}'; have {sorted(VARIANT_LAYOUTS)}")
    if source is not None:
        files = read_path(Path(source))
        _check_layout(variant, files.layout, str(source))
        return ResolvedSource("path", str(source), files)
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    cached_zip = cache / f"ml-{variant}.zip"
    if cached_zip.exists():
        files = read_path(cached_zip)
        _check_layout(variant, files.layout, str(cached_zip))
        return ResolvedSource("cache", str(cached_zip), files)
    url = GROUPLENS_URL.format(variant=variant)
    if allow_download:
        try:
            _download(url, cached_zip)
            return ResolvedSource("url", str(cached_zip), read_path(cached_zip), url=url)
        except (OSError, zipfile.BadZipFile, SourceError) as error:
            logger.warning("could not download %s (%s); trying offline copies", url, error)
    if variant != "100k":
        raise SourceError(
            f"MovieLens {variant}: no source given, no cached {cached_zip}, and {url} is "
            "unreachable; download it elsewhere and pass its zip or folder as source"
        )
    wheel = recbole_wheel(cache)
    return ResolvedSource("recbole", f"{wheel}!{RECBOLE_PREFIX}", read_recbole(wheel))


def _check_layout(variant: str, layout: Layout, where: str) -> None:
    if layout not in VARIANT_LAYOUTS[variant]:
        raise SourceError(
            f"{where}: holds the '{layout}' file layout, which is not MovieLens {variant} "
            f"(expected one of {VARIANT_LAYOUTS[variant]})"
        )


def _download(url: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".zip.tmp")
    logger.info("downloading %s", url)
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        tmp.write_bytes(response.read())
    zipfile.ZipFile(tmp).testzip()
    os.replace(tmp, target)


def read_path(path: Path) -> RawFiles:
    """Read a GroupLens zip or an unpacked folder (the files may sit one folder down)."""
    if not path.exists():
        raise SourceError(f"{path}: MovieLens source does not exist")
    if path.is_dir():
        found = {p.name: p for p in sorted(path.rglob("*")) if p.is_file() and _depth(p, path) <= 2}
        return _read_layout(str(path), found, lambda p: p.read_bytes())
    with zipfile.ZipFile(path) as archive:
        members = {
            Path(name).name: name for name in sorted(archive.namelist()) if not name.endswith("/")
        }
        return _read_layout(str(path), members, archive.read)


def _depth(path: Path, root: Path) -> int:
    return len(path.relative_to(root).parts)


def _read_layout(where: str, found: Mapping[str, T], read: Callable[[T], bytes]) -> RawFiles:
    for layout, (ratings_name, users_name, items_name) in LAYOUT_FILES.items():
        if ratings_name not in found:
            continue
        names = [n for n in (ratings_name, users_name, items_name) if n in found]
        blobs = {name: read(found[name]) for name in names}
        return RawFiles(
            layout=layout,
            ratings=blobs[ratings_name],
            users=blobs.get(users_name),
            items=blobs.get(items_name),
            sha256={name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()},
        )
    expected = sorted(names[0] for names in LAYOUT_FILES.values())
    raise SourceError(f"{where}: no MovieLens ratings file found (looked for {expected})")


def recbole_wheel(cache_dir: Path) -> Path:
    """The recbole wheel in ``cache_dir``, fetched with ``pip download --no-deps`` if missing."""
    wheel = cache_dir / RECBOLE_WHEEL
    if wheel.exists():
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.info(
        "fetching %s into %s (download only, not installed)", RECBOLE_REQUIREMENT, cache_dir
    )
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += [RECBOLE_REQUIREMENT, "-d", str(cache_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0 or not wheel.exists():
        raise SourceError(
            f"MovieLens 100k: no source, no internet, and `{' '.join(command)}` failed: "
            f"{result.stderr.strip()[-500:]}"
        )
    return wheel


def read_recbole(wheel: Path) -> RawFiles:
    """Read RecBole's ml-100k atomic files out of its wheel and verify their sha256."""
    blobs: dict[str, bytes] = {}
    with zipfile.ZipFile(wheel) as archive:
        for name, expected in RECBOLE_SHA256.items():
            data = archive.read(RECBOLE_PREFIX + name)
            found = hashlib.sha256(data).hexdigest()
            if found != expected:
                raise SourceError(
                    f"{wheel}!{RECBOLE_PREFIX}{name}: sha256 {found} does not match the expected "
                    f"{expected}; delete the wheel to fetch it again"
                )
            blobs[name] = data
    return RawFiles(
        layout="recbole",
        ratings=blobs["ml-100k.inter"],
        users=blobs["ml-100k.user"],
        items=blobs["ml-100k.item"],
        sha256=dict(RECBOLE_SHA256),
    )
