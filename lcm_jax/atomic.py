"""Stage outputs that appear whole or not at all: written under ``PATH.partial`` and renamed onto
PATH only when complete, so an interrupted stage is redone by the rerun, never trusted.

    with atomic.folder(out) as tmp:   # tmp = out + ".partial"
        pipe.save_pretrained(tmp)      # out appears when the block exits cleanly

The partial name is fixed, so a rerun finds what a crash left and removes it (logged: it is
incomplete by construction). On an exception the partial is kept for inspection and the
exception propagates. One writer per PATH: in a multi-process run, call these on process 0.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from typing import Iterator

SUFFIX = ".partial"


def partial_path(path: str) -> str:
    """Where ``path`` is written before it is complete."""
    return os.path.normpath(path) + SUFFIX


def clear_stale(partial: str) -> None:
    """Remove ``partial`` (a file or folder) left by an interrupted write, saying so."""
    if not os.path.lexists(partial):
        return
    logging.warning("removing %s: left incomplete by an interrupted run, written again now", partial)
    _remove(partial)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _is_empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def publish(partial: str, path: str, overwrite: bool = False) -> None:
    """Rename the complete folder ``partial`` onto ``path``. An empty folder at ``path`` is
    replaced; another existing one raises FileExistsError (keeping ``partial``), unless
    ``overwrite``: then it is replaced once the new one is in place (renamed to PATH.old first)."""
    if os.path.lexists(path) and not _is_empty_dir(path):
        if not overwrite:
            raise FileExistsError(f"{path!r} appeared while it was being written (expected it absent): "
                                  f"the new output is kept at {partial!r}; remove one of them and rerun")
        old = os.path.normpath(path) + ".old"
        clear_stale(old)
        os.replace(path, old)
        os.replace(partial, path)
        _remove(old)
        return
    os.replace(partial, path)  # atomic; onto an empty folder too (POSIX)


def check_absent(path: str) -> None:
    """FileExistsError unless ``path`` is absent or an empty folder: a stage that writes ``path``
    when its output is missing calls it before its work, so it never overwrites what it did not make."""
    if os.path.lexists(path) and not _is_empty_dir(path):
        raise FileExistsError(f"{path!r} exists but is not this stage's complete output (expected it absent): "
                              "remove it to write it again")


@contextlib.contextmanager
def folder(path: str, overwrite: bool = False) -> Iterator[str]:
    """Write a folder into the yielded ``path + ".partial"``; renamed onto ``path`` on a clean exit.

    ``path`` must be absent or an empty folder (FileExistsError before anything is written),
    unless ``overwrite``, when an existing one is replaced only once the new one is complete.
    """
    path = os.path.normpath(path)
    if not overwrite:
        check_absent(path)
    tmp = partial_path(path)
    clear_stale(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        logging.warning("%s: interrupted; the incomplete output is left at %s (a rerun removes it)", path, tmp)
        raise
    publish(tmp, path, overwrite)


@contextlib.contextmanager
def file(path: str) -> Iterator[str]:
    """Write one file at the yielded ``path + ".partial"``; it replaces ``path`` (os.replace,
    after an fsync) on a clean exit, so a reader sees the old file or the new one, never half."""
    path = os.path.normpath(path)
    tmp = partial_path(path)
    clear_stale(tmp)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        yield tmp
    except BaseException:
        logging.warning("%s: interrupted; the incomplete file is left at %s (a rerun removes it)", path, tmp)
        raise
    if not os.path.isfile(tmp):
        raise FileNotFoundError(f"nothing was written to {tmp!r}, so {path!r} is not replaced")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
