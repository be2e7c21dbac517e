"""A mistyped local path is not a hub id: tell the two apart, and say at once that the path does not exist, with
the nearest name that does (instead of retrying the hub, or a "Repo id must be in the form ..." error)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from .errors import DpoLeanError

_EXTENSION = re.compile(r"\.[A-Za-z]{1,8}$")  # .json, .jsn, .parquet; not the .5B of Qwen/Qwen2.5-0.5B


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


def looks_like_path(value: str) -> bool:
    """Is ``value`` meant as a local path rather than a hub id ``org/name``? Yes if it starts with / . or ~, has more
    than one /, has a file extension after a /, or names a folder that exists before its last /."""
    if value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value:
        return True
    if "/" not in value:
        return False
    return bool(_EXTENSION.search(value)) or _exists(Path(value).parent)


def nearest(path: Path) -> Path | None:
    """The entry of ``path``'s folder whose name is closest to ``path``'s, if one is close."""
    try:
        names = [p.name for p in path.parent.iterdir()]
    except (OSError, ValueError):
        return None
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return path.parent / close[0] if close else None


def did_you_mean(*paths: Path) -> str:
    """'; did you mean 'x'?' for the first of ``paths`` with a near name in its folder, else ''."""
    for path in paths:
        near = nearest(path)
        if near is not None:
            return f"; did you mean '{near}'?"
    return ""


def check_local(value: str | None, key: str, what: str) -> None:
    """A one-line error if config key ``key``'s ``value`` looks like a local path (:func:`looks_like_path`) and
    nothing is there; ``what`` names what should be there ("model folder")."""
    if not value or not looks_like_path(value) or _exists(Path(value)):
        return
    folder = Path(value).parent
    where = "" if _exists(folder) else f" (nor is there a folder {folder})"
    raise DpoLeanError(f"config key '{key}': {value!r} is a path, and no {what} is there{where}"
                       f"{did_you_mean(Path(value)) or '; fix the path'} (a hub id has the form org/name)")
