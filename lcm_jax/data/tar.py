"""WebDataset-style tar shards as a random-access source: read in place, never extracted.

A shard holds samples as members ``{key}.{jpg|jpeg|png|webp|bmp}`` beside ``{key}.txt`` or
``{key}.json`` (the LAION / img2dataset layout). Opening the source scans every shard's
headers once (tarfile seeks over the data, so this reads ~512 bytes a member) into an index
of (shard, offset, size); a sample is then one seek + read per member, from any thread or
worker process.
"""
from __future__ import annotations

import array
import concurrent.futures
import glob
import logging
import os
import re
import tarfile
from typing import Optional, Sequence

import numpy as np

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_EXTS = ("txt", "json")  # .txt preferred
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``data-{000..009}.tar`` -> 10 names (zero padding kept); ``{a,b}`` -> alternatives."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if r:
        lo, hi = r.group(1), r.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        raise ValueError(f"tar shard pattern {pattern!r}: cannot expand {{{body}}}; expected "
                         "{{000..009}} or {{a,b}}")
    return [out for item in items for out in expand_braces(head + item + tail)]


def expand_shards(spec: str) -> list[str]:
    """Shard paths from a spec: brace patterns, globs, a folder (its *.tar) or a file; several
    specs joined by ``::`` (as WebDataset). Every part must match something."""
    if not spec:
        raise ValueError("data.path is empty: for data.source='tar' give the shards, e.g. "
                         "/data/laion-{00000..00099}.tar, /data/shards/*.tar or a folder of .tar files")
    shards: list[str] = []
    for part in spec.split("::"):
        for name in expand_braces(part):
            if any(c in name for c in "*?["):
                found = sorted(glob.glob(name, recursive=True))
                if not found:
                    raise ValueError(f"tar shard glob {name!r} (from data.path {spec!r}) matches no file")
                shards += found
            elif os.path.isdir(name):
                found = sorted(glob.glob(os.path.join(name, "**", "*.tar"), recursive=True))
                if not found:
                    raise ValueError(f"folder {name!r} (data.path {spec!r}) holds no .tar shards")
                shards += found
            elif os.path.isfile(name):
                shards.append(name)
            else:
                raise ValueError(f"tar shard {name!r} (from data.path {spec!r}) does not exist")
    return list(dict.fromkeys(shards))


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(d, stem) if d else stem, ext.lower() if dot else ""


def scan_shard(path: str) -> list[tuple[str, str, int, int]]:
    """(key, ext, data offset, size) of the regular members of one uncompressed tar file.

    A truncated shard keeps the members that lie wholly inside the file (with a warning).
    """
    with open(path, "rb") as f:
        magic = f.read(6)
    for sig, kind in _COMPRESSED.items():
        if magic.startswith(sig):
            raise ValueError(f"tar shard {path!r} is {kind}-compressed: reading samples in place "
                             "needs uncompressed .tar shards (WebDataset's default)")
    size = os.path.getsize(path)
    out = []
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if m.isfile() and m.offset_data + m.size <= size:
                    out.append((*_split_key(m.name), m.offset_data, m.size))
    except (tarfile.TarError, EOFError, OSError) as e:
        if not out:
            raise ValueError(f"tar shard {path!r} is not a readable tar file: {e}") from e
        logging.warning("tar shard %s is damaged after %d members (%s); using those", path, len(out), e)
    return out


class TarSource:
    """Samples of some tar shards, indexed by (shard, offset): grain's RandomAccessDataSource.

    ``caption_key``: the field of ``{key}.json`` holding the caption when there is no .txt.
    A shard that is not a tar file is skipped with a warning (listed in ``bad_shards``).
    """

    def __init__(self, shards: Sequence[str], caption_key: str = "caption", num_threads: int = 16):
        self.shards = list(shards)
        self.caption_key = caption_key
        self.bad_shards: list[str] = []
        cols = {k: array.array("q") for k in ("shard", "img_off", "img_size", "cap_off", "cap_size", "cap_json")}
        keys: list[bytes] = []
        with concurrent.futures.ThreadPoolExecutor(max(1, min(num_threads, len(self.shards)))) as pool:
            scans = list(pool.map(self._scan_or_none, self.shards))
        for s, members in enumerate(scans):
            if members is None:
                continue
            samples: dict[str, dict[str, tuple[int, int]]] = {}
            for key, ext, off, size in members:
                samples.setdefault(key, {}).setdefault(ext, (off, size))
            for key, parts in samples.items():
                img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                if img is None:
                    continue
                cap_ext = next((e for e in CAPTION_EXTS if e in parts), None)
                cap = parts[cap_ext] if cap_ext else (-1, -1)
                for col, v in zip(cols, (s, img[0], img[1], cap[0], cap[1], cap_ext == "json")):
                    cols[col].append(v)
                keys.append(key.encode())
        # compact columns (LAION-size indexes): [N] shard, [N, 2] (offset, size) of image / caption
        self.keys = np.asarray(keys, dtype=bytes) if keys else np.zeros((0,), "S1")
        self._shard = np.frombuffer(cols["shard"], np.int64).astype(np.int32)
        self._img = np.stack([np.frombuffer(cols["img_off"], np.int64), np.frombuffer(cols["img_size"], np.int64)], 1)
        self._cap = np.stack([np.frombuffer(cols["cap_off"], np.int64), np.frombuffer(cols["cap_size"], np.int64)], 1)
        self._cap_json = np.frombuffer(cols["cap_json"], np.int64).astype(bool)

    def _scan_or_none(self, path: str) -> Optional[list]:
        try:
            return scan_shard(path)
        except ValueError as e:
            if "compressed" in str(e):
                raise
            logging.warning("skipping %s", e)
            self.bad_shards.append(path)
            return None

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def _read(path: str, off: int, size: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(off)
            return f.read(size)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        path = self.shards[self._shard[i]]
        key = f"{os.path.basename(path)}:{self.keys[i].decode()}"
        try:
            image = self._read(path, *self._img[i])
        except OSError as e:
            logging.warning("data: cannot read %s (%s)", key, e)
            image = None
        off, size = self._cap[i]
        caption = None
        if off >= 0:
            try:
                caption = self._read(path, off, size)
            except OSError:
                caption = None
        return {"image": image, "caption": caption, "key": key,
                "caption_json_key": self.caption_key if self._cap_json[i] else None}

    def __repr__(self) -> str:
        return f"TarSource({len(self.shards)} shards, {len(self)} samples)"
