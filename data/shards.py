"""WebDataset tar shards of token samples: a size-capped writer and a random-access reader over them.

Each sample is one tar member `<key>.input_ids.npy`, so any WebDataset pipeline can read the shards. Beside
each shard the writer leaves `<shard>.idx.npy`, the byte offset and token count of every sample's array
data, so training reads sample i with one slice of a memory map instead of scanning tar headers.
"""

import hashlib
import io
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from orchestrator.errors import LmforgeError

OPEN_SHARDS = 64  # memory maps kept open per store; beyond this the least recently used is closed


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Writes `<split>-NNNNNN.tar` shards of about `shard_bytes` each under `directory`."""

    def __init__(self, directory: Path, split: str, shard_bytes: int, dtype: np.dtype):
        self.directory, self.split, self.shard_bytes, self.dtype = directory, split, shard_bytes, dtype
        self.shards: list[dict] = []
        self.samples = self.tokens = 0
        self._tar = None
        self._index: list[tuple[int, int]] = []

    def write(self, tokens: np.ndarray) -> None:
        if self._tar is None:
            path = self.directory / f"{self.split}-{len(self.shards):06d}.tar"
            self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - closed per shard
        array = np.ascontiguousarray(tokens, dtype=self.dtype)
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        payload = buf.getvalue()
        info = tarfile.TarInfo(f"{self.samples:010d}.input_ids.npy")
        info.size, info.mode = len(payload), 0o644
        header = len(info.tobuf(self._tar.format, self._tar.encoding, self._tar.errors))
        data_at = self._tar.offset + header + len(payload) - array.nbytes
        self._tar.addfile(info, io.BytesIO(payload))
        self._index.append((data_at, len(array)))
        self.samples += 1
        self.tokens += len(array)
        if self._tar.offset >= self.shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        path = Path(self._tar.name)
        self._tar.close()
        np.save(path.with_name(path.name + ".idx.npy"), np.asarray(self._index, dtype=np.int64))
        self.shards.append({"name": path.name, "samples": len(self._index), "bytes": path.stat().st_size,
                            "sha256": sha256_file(path)})
        self._tar, self._index = None, []

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._close_shard()
        return self.shards


class ShardStore:
    """Random access to the samples of one split: `store[i]` is an array of `seq_len` token ids.

    Unpacked samples are shorter than `seq_len` and are right-padded with `pad_id` on read.
    """

    def __init__(self, directory: str | Path, shards: list[dict], dtype: str, seq_len: int, pad_id: int):
        self.directory, self.dtype, self.seq_len, self.pad_id = Path(directory), np.dtype(dtype), seq_len, pad_id
        self.shards = shards
        for shard in shards:
            path = self.directory / shard["name"]
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                found = path.stat().st_size if path.is_file() else "missing"
                raise LmforgeError(f"prepared shard {path} is truncated or missing (size {found}, manifest says "
                                   f"{shard['bytes']}); delete {self.directory} and prepare again")
        self.shard_sizes = np.asarray([s["samples"] for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.shard_sizes)])
        self._index: dict[int, np.ndarray] = {}
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        offset, count = self._shard_index(shard)[index - self.starts[shard]]
        start = int(offset)
        tokens = self._map(shard)[start:start + int(count) * self.dtype.itemsize].view(self.dtype)
        if len(tokens) == self.seq_len:
            return tokens
        return np.concatenate([tokens, np.full(self.seq_len - len(tokens), self.pad_id, dtype=self.dtype)])

    def _shard_index(self, shard: int) -> np.ndarray:
        if shard not in self._index:
            self._index[shard] = np.load(self.directory / (self.shards[shard]["name"] + ".idx.npy"))
        return self._index[shard]

    def _map(self, shard: int) -> np.ndarray:
        if shard in self._maps:
            self._maps.move_to_end(shard)
        else:
            self._maps[shard] = np.memmap(self.directory / self.shards[shard]["name"], dtype=np.uint8, mode="r")
            if len(self._maps) > OPEN_SHARDS:
                self._maps.popitem(last=False)
        return self._maps[shard]

    def __getstate__(self) -> dict:
        # Memory maps do not pickle; a DataLoader worker or Ray actor reopens them lazily.
        return self.__dict__ | {"_maps": OrderedDict(), "_index": {}}


def verify_shards(directory: str | Path, shards: list[dict]) -> list[str]:
    """Names of shards whose sha256 differs from the manifest (slow: reads every byte)."""
    return [s["name"] for s in shards if sha256_file(Path(directory) / s["name"]) != s["sha256"]]
