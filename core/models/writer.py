"""An incremental sharded safetensors writer (the merge engine's output)::

    w = ShardedWriter(out_dir, [(name, shape, dtype), ...], max_shard_bytes=2**30)
    w.write(name, tensor)                  # any order, thread-safe (positional writes at planned offsets)
    w.close()                              # checks completeness, writes model.safetensors.index.json
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from rlm.core.errors import ModelError
from rlm.core.models.reader import ST_INDEX, element_size, st_code


@dataclass
class _Slot:
    shard: int
    offset: int  # absolute byte offset in the shard file
    nbytes: int
    shape: tuple[int, ...]
    code: str
    written: bool = False
    done: int = 0


class ShardedWriter:
    """Write safetensors shards incrementally without holding more than one tensor in memory.

    The layout (which tensor goes into which shard, at what offset) is fixed up front from the planned
    ``(name, shape, dtype)`` list, so each shard's header is written first and tensor bytes go to their
    place with positional writes, in any order and from any thread. ``close()`` checks every tensor was
    written and writes ``model.safetensors.index.json`` (a single shard is named ``model.safetensors``)."""

    def __init__(self, out_dir: str | Path, tensors: Iterable[tuple[str, Sequence[int], Any]], *,
                 max_shard_bytes: int = 2 * 1024 ** 3, metadata: dict[str, str] | None = None,
                 prefix: str = "model") -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        groups: list[list[tuple[str, tuple[int, ...], str, int]]] = [[]]
        size = 0
        for name, shape, dtype in tensors:
            shape = tuple(int(s) for s in shape)
            nbytes = math.prod(shape) * element_size(dtype)
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, shape, st_code(dtype), nbytes))
            size += nbytes
        count = len(groups)
        self.files = ([f"{prefix}.safetensors"] if count == 1 else
                      [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self.slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        self.total_bytes = 0
        meta = {"format": "pt", **(metadata or {})}
        for i, group in enumerate(groups):
            header: dict[str, Any] = {"__metadata__": meta}
            pos = 0
            for name, shape, code, nbytes in group:
                if name in header:
                    raise ModelError(f"writer: tensor {name} planned twice")
                header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
                pos += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            start = 8 + len(raw)
            path = self.out_dir / self.files[i]
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, struct.pack("<Q", len(raw)) + raw, 0)
            os.ftruncate(fd, start + pos)
            for name, shape, code, nbytes in group:
                off = header[name]["data_offsets"][0]
                self.slots[name] = _Slot(i, start + off, nbytes, shape, code, written=nbytes == 0)
            self.total_bytes += pos
        self._lock = threading.Lock()
        self._closed = False

    def write(self, name: str, tensor: Any, rows_offset: int = 0) -> None:
        """Write ``tensor`` (whole, or a block of rows starting at row ``rows_offset``) into its slot."""
        import torch
        slot = self.slots.get(name)
        if slot is None:
            raise ModelError(f"writer: tensor {name} was not planned")
        if st_code(tensor.dtype) != slot.code:
            raise ModelError(f"writer: tensor {name} has dtype {tensor.dtype}, planned {slot.code}")
        t = tensor.detach().contiguous().reshape(-1)
        data = t.view(torch.uint8).numpy() if t.numel() else b""
        row_bytes = slot.nbytes // slot.shape[0] if slot.shape and slot.shape[0] else 0
        off = slot.offset + rows_offset * row_bytes
        if off + len(data) > slot.offset + slot.nbytes:
            raise ModelError(f"writer: tensor {name}: {len(data)} bytes at row {rows_offset} overflow its "
                             f"planned size {slot.nbytes}")
        mv = memoryview(data) if len(data) else b""
        done = 0
        while done < len(mv):
            done += os.pwrite(self._fds[slot.shard], mv[done:], off + done)
        with self._lock:
            slot.done += len(data)
            if slot.done >= slot.nbytes:
                slot.written = True

    def close(self) -> Path | None:
        """Flush, check completeness, write the index (for more than one shard); returns the index path."""
        if self._closed:
            return None
        missing = [n for n, s in self.slots.items() if not s.written]
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._closed = True
        if missing:
            raise ModelError(f"writer: tensor {missing[0]} was never written ({len(missing)} missing)")
        if len(self.files) == 1:
            return None
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {n: self.files[s.shard] for n, s in self.slots.items()}}
        path = self.out_dir / ST_INDEX
        path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return path

    def abort(self) -> None:
        if not self._closed:
            for fd in self._fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._closed = True
