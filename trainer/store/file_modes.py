"""Who may read what a directory store creates: its owner, unless a team gave it a group.

    make_store_root(root)            # a new store folder: 0700 (an existing one is left as it is)
    make_subdir(root / "parts")      # a new subfolder: 0700, plus the group bits of its parent
    fd = create_file(path, flags)    # os.open(path, flags | O_CREAT, 0600 + the folder's group rw)

A store holds every prompt, answer, rationale and annotator name; on a shared machine
the umask's usual 0644 would let every local user read them. So what the store creates
is private by default: folders 0700, files 0600. A team that shares a store between
Unix accounts gives its folder to a group (`chgrp -R team store; chmod -R g+rwX store;
find store -type d -exec chmod g+s {} +`, and umask 007 for the processes): new folders
and files copy the group bits of the folder they are made in, so they stay shared.
Bits for others are never set. Existing files and folders are never chmod'ed: what an
admin set stays set.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def _group_bits(folder: Path) -> int:
    try:
        return os.stat(folder).st_mode & 0o070
    except FileNotFoundError:
        return 0


def make_store_root(root: Path) -> None:
    """Create the store's own folder 0700 where it is missing (its parents with the
    usual modes: they are the user's, not the store's)."""
    root = Path(root)
    if root.is_dir():
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    root.mkdir(mode=PRIVATE_DIR, exist_ok=True)


def make_subdir(path: Path) -> None:
    """Create a folder inside the store (parts/, tail/, quarantine/, ...) where it is
    missing: 0700 plus its parent's group bits."""
    path = Path(path)
    if path.is_dir():
        return
    path.mkdir(mode=PRIVATE_DIR | _group_bits(path.parent), exist_ok=True)


def file_mode(folder: Path) -> int:
    """The mode a new file in `folder` is created with: 0600 plus the folder's group
    read/write bits (never execute, never others)."""
    return PRIVATE_FILE | (_group_bits(Path(folder)) & 0o060)


def create_file(path: Path, flags: int) -> int:
    """os.open(path, flags | O_CREAT) with `file_mode` of its folder; an existing file
    keeps its mode."""
    path = Path(path)
    return os.open(path, flags | os.O_CREAT, file_mode(path.parent))
