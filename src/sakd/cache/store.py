"""The teacher cache on disk: safetensors shards, a manifest of completed shards, and the capture settings.

Layout of a cache folder:
- `manifest.json`: format, `settings` (what the cached distributions depend on: checked when training reads
  the cache), `layout` (how the capture run cut the data into shards: checked when a capture resumes), and
  `shards`: {shard index: {"file", "rows", "windows": [first, end)}} of the shards already written;
  `complete` once every shard is there.
- `shard-NNNNN.safetensors`, one per `shard_windows` windows, each holding for every teacher position of its
  windows: `ids` (R, k) int32 top-k token ids, `probs` (R, k) float16/float32 their probabilities at
  temperature 1, `tail` (R,) float32 the remaining mass, `keys` (R, 3) int64 (see `sakd.cache.keys`).
A shard is written to a temporary name and renamed, then the manifest is rewritten the same way, so an
interrupted capture leaves only complete shards behind and continues from the first missing one.
Reading maps the shard files into memory (numpy memmap over the documented safetensors layout): the cache
never has to fit in RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from sakd.data.tokenize import special_prefix
from sakd.errors import UserError

FORMAT = 1
MANIFEST = "manifest.json"
_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_folder(ref: str) -> Path | None:
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    try:  # a hub id: its files in the local Hugging Face cache, if there
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:
        return None


def model_files_hash(ref: str) -> str:
    """A hash of the model's config.json and of its weight files' names and sizes (not their contents: cheap
    for a large teacher, and any retrained or re-saved model changes them). A single-file model (GGUF) is
    hashed by its name and size."""
    path = Path(ref).expanduser()
    if path.is_file():
        return _digest([path.name, path.stat().st_size])
    folder = _model_folder(ref)
    if folder is None:
        return _digest(["unresolved", ref])
    files = sorted(p for p in folder.iterdir() if p.is_file())
    config = folder / "config.json"
    sizes = [(p.name, p.stat().st_size) for p in files if p.name.endswith(_WEIGHT_SUFFIXES)]
    return _digest([config.read_text() if config.exists() else None, sizes])


def vocab_hash(tokenizer) -> str:
    return _digest(sorted(tokenizer.get_vocab().items()))


def capture_settings(
    teacher_model: str, teacher_tokenizer, sources: list, max_length: int, data_fingerprint: str
) -> dict[str, Any]:
    """What the cached distributions depend on (the same values must hold when training reads the cache).
    `data_fingerprint`: the documents' content (`sakd.cache.keys.documents_fingerprint`), since `sources`
    names only where they are."""
    return {
        "teacher_model": str(teacher_model),
        "teacher_files": model_files_hash(teacher_model),
        "teacher_vocab": vocab_hash(teacher_tokenizer),
        "teacher_vocab_size": len(teacher_tokenizer),
        # the special tokens the teacher read before each window (its BOS): distributions captured without
        # them are not the teacher's
        "teacher_prefix": list(special_prefix(teacher_tokenizer)),
        "data": sources,
        "data_fingerprint": data_fingerprint,
        "max_length": max_length,
    }


def settings_mismatch(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The settings that differ. A cache captured before the data's fingerprint was recorded has none to
    compare: its other settings are still checked. One captured before the teacher's prefix tokens were
    recorded fed it none."""
    saved = {"teacher_prefix": [], **saved}
    keys = saved.keys() | now.keys()
    if "data_fingerprint" not in saved:
        keys -= {"data_fingerprint"}
    return sorted(k for k in keys if saved.get(k) != now.get(k))


def _refuse_changed_data(root: Path, diff: list[str]) -> None:
    if "data_fingerprint" in diff and "data" not in diff:
        raise UserError(
            f"the training data changed since the teacher cache '{root}' was captured: data.train names the "
            "same sources, but their content differs; restore the data, or delete the cache and capture it "
            "again (`sakd cache-teacher`)"
        )


def manifest_file(root: Path, name: Any) -> Path:
    """The path of a file the manifest names: a plain file name inside the cache folder, nothing else (an
    edited or foreign manifest must not make the cache read or replace files elsewhere)."""
    plain = isinstance(name, str) and name not in ("", ".") and ".." not in name
    plain = plain and not any(sep in name for sep in ("/", "\\", os.sep)) and not Path(name).is_absolute()
    path = root / name if plain else None
    if path is None or path.resolve().parent != root.resolve():
        raise UserError(
            f"the teacher cache manifest '{root / MANIFEST}' names the file {name!r}, which is not a file of the "
            "cache folder: delete the folder and run `sakd cache-teacher` again"
        )
    return path


def read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(
            f"the teacher cache manifest '{path}' is unreadable: delete the folder and run `sakd cache-teacher` again"
        ) from None


def _write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CacheWriter:
    """Writes shards and keeps the manifest; resumes a capture whose settings and layout match."""

    def __init__(self, root: Path, settings: dict[str, Any], layout: dict[str, Any], num_shards: int):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = read_manifest(self.root)
        if manifest is not None:
            diff = settings_mismatch(
                {**manifest.get("settings", {}), **manifest.get("layout", {})}, {**settings, **layout}
            )
            _refuse_changed_data(self.root, diff)
            if diff or manifest.get("format") != FORMAT:
                raise UserError(
                    f"the teacher cache in '{self.root}' was captured with other settings ({', '.join(diff) or 'format'}): "
                    "delete it, or write the cache elsewhere (teacher.cache)"
                )
            # a shard listed but missing on disk is captured again
            manifest["shards"] = {
                i: s for i, s in manifest["shards"].items() if manifest_file(self.root, s["file"]).exists()
            }
        else:
            manifest = {"format": FORMAT, "settings": settings, "layout": layout, "shards": {}}
        manifest["num_shards"] = num_shards
        manifest["complete"] = len(manifest["shards"]) == num_shards
        self.manifest = manifest
        _write_json_atomic(self.root / MANIFEST, manifest)

    def done(self, index: int) -> bool:
        return str(index) in self.manifest["shards"]

    def write(self, index: int, tensors: dict[str, torch.Tensor], windows: tuple[int, int]) -> None:
        name = shard_name(index)
        tmp = self.root / (name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.root / name)
        self.manifest["shards"][str(index)] = {
            "file": name,
            "rows": int(tensors["ids"].shape[0]),
            "windows": list(windows),
            "tail_sum": float(tensors["tail"].double().sum()),  # for the mean mass the top-k keeps
        }
        self.manifest["complete"] = len(self.manifest["shards"]) == self.manifest["num_shards"]
        _write_json_atomic(self.root / MANIFEST, self.manifest)


def _memmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read-only numpy views of a safetensors file's tensors, memory-mapped (one map per file)."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    base = 8 + header_len
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, stop = meta["data_offsets"]
        dtype = _NUMPY_DTYPES[meta["dtype"]]
        out[name] = data[base + start : base + stop].view(dtype).reshape(meta["shape"])
    return out


class TeacherCache:
    """A complete cache folder, read through memory maps: keys of all rows and row gathering."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        order = sorted(manifest["shards"], key=int)
        self.shards = [_memmap_safetensors(manifest_file(root, manifest["shards"][i]["file"])) for i in order]
        rows = [manifest["shards"][i]["rows"] for i in order]
        self.offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)  # (S + 1,)
        self.top_k = int(manifest["layout"]["top_k"])

    @classmethod
    def open(cls, root: str | Path, settings: dict[str, Any]) -> TeacherCache:
        """Open for training: a UserError (one line) if missing, incomplete or captured with other settings."""
        root = Path(root).expanduser()
        manifest = read_manifest(root)
        if manifest is None:
            raise UserError(
                f"no teacher cache in '{root}' (teacher.cache): run `sakd cache-teacher CONFIG` first"
            )
        diff = settings_mismatch(manifest.get("settings", {}), settings)
        _refuse_changed_data(root, diff)
        if diff or manifest.get("format") != FORMAT:
            raise UserError(
                f"the teacher cache '{root}' was captured with other settings ({', '.join(diff) or 'format'} "
                "differ): restore them, or capture a cache for this config (`sakd cache-teacher`) elsewhere"
            )
        if not manifest.get("complete"):
            raise UserError(
                f"the teacher cache '{root}' is incomplete ({len(manifest['shards'])} of "
                f"{manifest.get('num_shards')} shards): run `sakd cache-teacher CONFIG` again to finish it"
            )
        return cls(root, manifest)

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    def keys(self) -> np.ndarray:
        """(R, 3) int64: the key of every row, in row order."""
        if not self.shards:
            return np.zeros((0, 3), dtype=np.int64)
        return np.concatenate([np.asarray(s["keys"]) for s in self.shards])

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids (n, k) int64, probs (n, k) float32, tail (n,) float32 of the given global rows (n,)."""
        rows = np.asarray(rows, dtype=np.int64)
        ids = np.empty((len(rows), self.top_k), dtype=np.int64)
        probs = np.empty((len(rows), self.top_k), dtype=np.float32)
        tail = np.empty(len(rows), dtype=np.float32)
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(shard):
            pick = np.flatnonzero(shard == s)
            local = rows[pick] - self.offsets[s]
            arrays = self.shards[s]
            ids[pick] = arrays["ids"][local]
            probs[pick] = arrays["probs"][local]
            tail[pick] = arrays["tail"][local]
        return torch.from_numpy(ids), torch.from_numpy(probs), torch.from_numpy(tail)
