"""The avatar store: prepared avatars as memory-mapped Arrow IPC files, loaded without re-running
face detection.

Layout under `root`:
  <name>/avatar.arrow    one row per source frame: frame, crop_box, crop, mask, landmarks,
                         detected, then one column "extras.<key>" per backend extra
  <name>/manifest.json   {format_version, name, width, height, frames, fps, crop_size, source,
                         created, extras: {key: {shape, dtype}}, clips: {name: [start, stop]},
                         report}
`frames` counts every source frame: the main video's, then each clip's ([start, stop) rows,
in order; a manifest without `clips` has none).
Array columns are fixed-size binary (one row = the frame's raw bytes, C order); their dtype and
per-row shape are in the field metadata, so loading is a zero-copy numpy view of the mapped
file. Writes go to a temporary directory that is renamed into place.

A store may have a shared location (`shared`: a pyarrow filesystem URI or path such as
s3://bucket/avatars or /mnt/avatars, settings.avatar_uri) with the same layout: an avatar
missing locally is fetched from it into `root` (pyarrow.fs.copy_files, then renamed into
place), and `upload` copies a local avatar there (manifest last, so a reader that finds the
manifest finds the whole avatar). Loading always reads the local copy (memory-mapped).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from ray_lipsync.avatar.model import Avatar
from ray_lipsync.errors import AvatarError, AvatarNotFound

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: MuseTalk v1.5 crop box (iBUG 29 half-face point) and jaw-mode mask
ARROW_FILE = "avatar.arrow"
MANIFEST_FILE = "manifest.json"
EXTRA_PREFIX = "extras."
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_EXTRA_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{0,63}$")
# Avatar attribute -> Arrow column, for the per-frame arrays every avatar has.
_CORE = {
    "frames": "frame",
    "crop_boxes": "crop_box",
    "crops": "crop",
    "masks": "mask",
    "landmarks": "landmarks",
}


def validate_name(name: object) -> str:
    """Return `name` if it is a valid avatar name, else raise AvatarError (names come from HTTP)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise AvatarError(
            f"invalid avatar name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a "
            "letter or digit"
        )
    return name


def clip_ranges(manifest: Mapping[str, Any]) -> dict[str, range]:
    """The clips a manifest lists, name -> range of source frames (in manifest order)."""
    return {str(clip): range(int(start), int(stop)) for clip, (start, stop) in manifest.get("clips", {}).items()}


def _encode(array: np.ndarray) -> tuple[pa.Array, dict[bytes, bytes]]:
    """(N, ...) array -> fixed-size binary column (zero-copy) and its dtype/shape metadata."""
    array = np.ascontiguousarray(array)
    row = array.shape[1:]
    nbytes = int(np.prod(row, dtype=np.int64)) * array.dtype.itemsize
    if nbytes == 0:
        raise AvatarError(f"cannot store arrays with empty rows (shape {array.shape})")
    column = pa.Array.from_buffers(pa.binary(nbytes), len(array), [None, pa.py_buffer(array)])
    meta = {b"dtype": array.dtype.str.encode(), b"shape": json.dumps(list(row)).encode()}
    return column, meta


def _decode(column: pa.Array | pa.ChunkedArray, field: pa.Field, copy: bool) -> np.ndarray:
    """Fixed-size binary column -> (N, ...) numpy array (a view of the Arrow buffer unless copy)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    meta = field.metadata or {}
    if b"dtype" not in meta or b"shape" not in meta or not pa.types.is_fixed_size_binary(field.type):
        raise AvatarError(f"column {field.name!r} is not an array column; re-prepare the avatar")
    dtype = np.dtype(meta[b"dtype"].decode())
    row = tuple(json.loads(meta[b"shape"]))
    width = field.type.byte_width
    data = np.frombuffer(column.buffers()[1], dtype=np.uint8, count=len(column) * width,
                         offset=column.offset * width)  # fmt: skip
    array = data.view(dtype).reshape((len(column), *row))
    return array.copy() if copy else array


class AvatarStore:
    """Prepared avatars under `root`, one directory per avatar, optionally backed by a
    `shared` location that every node reads (see module doc)."""

    def __init__(self, root: str | Path, shared: str | None = None) -> None:
        self.root = Path(root)
        self.shared = shared
        self._shared_fs: tuple[pafs.FileSystem, str] | None = None

    def path(self, name: str) -> Path:
        """Directory of avatar `name` (validated; it need not exist)."""
        return self.root / validate_name(name)

    def exists(self, name: str) -> bool:
        return (self.path(name) / MANIFEST_FILE).is_file()

    def names(self, include_shared: bool = False) -> list[str]:
        """Names of the stored avatars, sorted (with those only in the shared location if asked)."""
        names = set()
        if self.root.is_dir():
            names.update(
                p.name for p in self.root.iterdir()
                if _NAME.match(p.name) and (p / MANIFEST_FILE).is_file()
            )  # fmt: skip
        if include_shared and self.shared is not None:
            filesystem, base = self._shared_location()
            try:
                entries = filesystem.get_file_info(pafs.FileSelector(base, allow_not_found=True))
            except OSError as exc:
                raise AvatarError(f"cannot list the shared avatars at {self.shared}: {exc}") from exc
            names.update(e.base_name for e in entries
                         if e.type == pafs.FileType.Directory and _NAME.match(e.base_name))
        return sorted(names)

    def fetch(self, name: str) -> bool:
        """Copy avatar `name` from the shared location into the local store (replacing a local
        copy); False when there is no shared location or the avatar is not there."""
        validate_name(name)
        if self.shared is None:
            return False
        filesystem, base = self._shared_location()
        source = f"{base}/{name}"
        try:
            if filesystem.get_file_info(f"{source}/{MANIFEST_FILE}").type != pafs.FileType.File:
                return False
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".fetch-{name}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                pafs.copy_files(source, str(tmp), source_filesystem=filesystem,
                                destination_filesystem=pafs.LocalFileSystem())
                try:
                    self._swap_in(tmp, name)
                except OSError:
                    if not self.exists(name):  # else another process fetched it first: fine
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:  # the location goes to the log, not into the (client-facing) error
            log.error("could not fetch avatar %r from %s: %s", name, self.shared, exc)
            raise AvatarError(f"could not fetch avatar {name!r} from the shared avatar location "
                              "(details in the server log)") from exc
        log.info("fetched avatar %r from %s", name, self.shared)
        return True

    def upload(self, name: str) -> str:
        """Copy local avatar `name` to the shared location; returns where it went."""
        self.manifest(name)  # it must exist and be readable here first
        if self.shared is None:
            raise AvatarError("no shared avatar location configured (settings.avatar_uri)")
        filesystem, base = self._shared_location()
        target = f"{base}/{name}"
        local = pafs.LocalFileSystem()
        try:
            filesystem.create_dir(target, recursive=True)
            for file in (ARROW_FILE, MANIFEST_FILE):  # manifest last: it marks a complete avatar
                pafs.copy_files(str(self.path(name) / file), f"{target}/{file}",
                                source_filesystem=local, destination_filesystem=filesystem)
        except OSError as exc:
            raise AvatarError(f"could not upload avatar {name!r} to {self.shared}: {exc}") from exc
        log.info("uploaded avatar %r to %s", name, self.shared)
        return f"{self.shared.rstrip('/')}/{name}"

    def manifest(self, name: str) -> dict[str, Any]:
        """The manifest of avatar `name` (fetched from the shared location if it is only
        there); AvatarNotFound / AvatarError when missing or unusable."""
        if not self.exists(name):
            self.fetch(name)
        path = self.path(name) / MANIFEST_FILE
        if not path.is_file():
            raise AvatarNotFound(f"no prepared avatar named {name!r} in {self.root}; prepare it with "
                                 "`ray-lipsync avatar prepare --image PATH --name NAME`")  # fmt: skip
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise AvatarError(f"avatar {name!r}: unreadable manifest {path} ({exc}); prepare it again") from exc
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version != FORMAT_VERSION:
            raise AvatarError(
                f"avatar {name!r} has store format_version {version!r}, this version reads "
                f"{FORMAT_VERSION}; prepare the avatar again"
            )
        return manifest

    def save(self, avatar: Avatar, report: Any = None) -> Path:
        """Write `avatar` (replacing one of the same name); returns its directory.

        `report` is a PrepareReport (anything with `to_dict()`), a dict, or None.
        """
        name = validate_name(avatar.name)
        if report is not None and not isinstance(report, Mapping):
            report = report.to_dict()
        frames = np.asarray(avatar.frames)
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "width": int(frames.shape[2]),
            "height": int(frames.shape[1]),
            "frames": len(avatar),
            "fps": float(avatar.fps),
            "crop_size": int(np.asarray(avatar.crops).shape[1]),
            "source": str((report or {}).get("source", "")),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "extras": {},
            "clips": {clip: [frames.start, frames.stop] for clip, frames in avatar.clips.items()},
            "report": dict(report) if report is not None else None,
        }
        columns = {col: np.asarray(getattr(avatar, attr)) for attr, col in _CORE.items()}
        extras = {k: np.asarray(v) for k, v in avatar.extras.items()}
        table = self._table(columns, np.asarray(avatar.detected, dtype=bool), extras, manifest)
        return self._commit(name, table, manifest)

    def load(self, name: str, mmap: bool = True) -> Avatar:
        """Load avatar `name`. With mmap the arrays are read-only views of the mapped file."""
        manifest = self.manifest(name)
        path = self.path(name) / ARROW_FILE
        table = self._read(name, path)
        missing = [c for c in (*_CORE.values(), "detected") if c not in table.column_names]
        missing += [EXTRA_PREFIX + k for k in manifest["extras"] if EXTRA_PREFIX + k not in table.column_names]
        if missing or table.num_rows != manifest["frames"]:
            raise AvatarError(f"avatar {name!r}: {path} does not match its manifest "
                              f"(missing {missing}, rows {table.num_rows}); prepare it again")  # fmt: skip
        arrays = {
            attr: _decode(table.column(col), table.schema.field(col), copy=not mmap)
            for attr, col in _CORE.items()
        }
        detected = table.column("detected").to_numpy().astype(bool)
        extras = {
            key: _decode(table.column(EXTRA_PREFIX + key), table.schema.field(EXTRA_PREFIX + key), copy=not mmap)
            for key in manifest["extras"]
        }
        try:
            return Avatar(name=name, detected=detected, fps=float(manifest["fps"]), extras=extras,
                          clips=clip_ranges(manifest), **arrays)
        except (TypeError, ValueError) as exc:
            raise AvatarError(f"avatar {name!r}: {exc}; prepare it again") from exc

    def add_extras(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Add (or replace) per-frame backend arrays, e.g. "musetalk_latents" (N, 8, 32, 32)
        float16; they are recorded in the manifest and loaded into `Avatar.extras`."""
        manifest = self.manifest(name)
        frames = manifest["frames"]
        checked: dict[str, np.ndarray] = {}
        for key, value in arrays.items():
            if not isinstance(key, str) or not _EXTRA_KEY.match(key):
                raise AvatarError(f"invalid extras key {key!r}: use letters, digits and '_'")
            array = np.asarray(value)
            if array.dtype.kind not in "biuf" or array.ndim < 1 or len(array) != frames:
                raise AvatarError(
                    f"extras {key!r} must be a numeric array with one row per frame ({frames}), "
                    f"got {array.dtype} {array.shape}"
                )
            checked[key] = array
        avatar = self.load(name, mmap=True)
        extras = {**avatar.extras, **checked}
        columns = {col: np.asarray(getattr(avatar, attr)) for attr, col in _CORE.items()}
        table = self._table(columns, avatar.detected, extras, manifest)
        self._commit(name, table, manifest)

    def delete(self, name: str) -> None:
        """Remove avatar `name`; AvatarNotFound when there is none."""
        path = self.path(name)
        if not path.is_dir():
            raise AvatarNotFound(f"no prepared avatar named {name!r} in {self.root}")
        trash = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    # --- internals --------------------------------------------------------------------------

    @staticmethod
    def _table(
        columns: dict[str, np.ndarray],
        detected: np.ndarray,
        extras: dict[str, np.ndarray],
        manifest: dict[str, Any],
    ) -> pa.Table:
        """Build the Arrow table; records the extras' shapes/dtypes in `manifest`."""
        fields, data = [], []
        items = [*columns.items(), *((EXTRA_PREFIX + k, v) for k, v in extras.items())]
        for col, array in items:
            column, meta = _encode(array)
            fields.append(pa.field(col, column.type, nullable=False, metadata=meta))
            data.append(column)
            if col.startswith(EXTRA_PREFIX):
                manifest["extras"][col[len(EXTRA_PREFIX):]] = {
                    "shape": list(array.shape[1:]), "dtype": array.dtype.name,
                }  # fmt: skip
        fields.append(pa.field("detected", pa.bool_(), nullable=False))
        data.append(pa.array(np.asarray(detected, dtype=bool)))
        return pa.Table.from_arrays(data, schema=pa.schema(fields))

    def _commit(self, name: str, table: pa.Table, manifest: dict[str, Any]) -> Path:
        """Write table + manifest to a temp dir, then rename it to <root>/<name>."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            with pa.OSFile(str(tmp / ARROW_FILE), "wb") as sink:
                with pa.ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table, max_chunksize=max(table.num_rows, 1))
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
            final = self._swap_in(tmp, name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("saved avatar %r (%d frames) to %s", name, table.num_rows, final)
        return final

    def _swap_in(self, tmp: Path, name: str) -> Path:
        """Rename the complete directory `tmp` to <root>/<name>, replacing what is there."""
        final = self.root / name
        if final.exists():  # replace: move the old one aside, then swap in the new one
            old = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        return final

    def _shared_location(self) -> tuple[pafs.FileSystem, str]:
        """(filesystem, base path) of the shared location; a plain path is a local directory."""
        if self._shared_fs is None:
            assert self.shared is not None
            uri = self.shared if "://" in self.shared else str(Path(self.shared).expanduser().resolve())
            try:
                filesystem, base = pafs.FileSystem.from_uri(uri)
            except (pa.ArrowInvalid, ValueError, OSError) as exc:
                raise AvatarError(f"invalid avatar location {self.shared!r}: {exc}") from exc
            self._shared_fs = (filesystem, base.rstrip("/"))
        return self._shared_fs

    @staticmethod
    def _read(name: str, path: Path) -> pa.Table:
        """The avatar table over a memory map (load copies out of it when mmap=False)."""
        try:
            return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            raise AvatarError(f"avatar {name!r}: cannot read {path} ({exc}); prepare it again") from exc
