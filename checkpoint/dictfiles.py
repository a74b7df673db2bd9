"""Checkpoint storage held in a dict, for in-process runs and the simulation."""

from __future__ import annotations

from sluiceway.checkpoint.storage import JobStorage, StorageRetry


class DictFiles:
    """A dict of files with the few filesystem calls :class:`JobStorage`
    makes. Each instance is its own store (fsspec's ``memory://`` is one
    store per process, whose listings slow down as it fills), and nothing
    leaves the process: for in-process runs and the simulation."""

    protocol = "dict"

    def __init__(self):
        self.files: dict[str, bytes] = {}

    def unstrip_protocol(self, path: str) -> str:
        return f"dict://{path}"

    def makedirs(self, path: str, exist_ok: bool = True) -> None:
        pass

    def pipe_file(self, path: str, data: bytes) -> None:
        self.files[path] = bytes(data)

    def mv(self, source: str, target: str) -> None:
        self.files[target] = self.files.pop(source)

    def open(self, path: str, mode: str):
        assert mode == "xb", mode
        if path in self.files:
            raise FileExistsError(path)
        files = self.files

        class _Exclusive:
            def __enter__(self):
                return self

            def write(self, data):
                files[path] = bytes(data)

            def __exit__(self, *exc):
                return False
        return _Exclusive()

    def cat_file(self, path: str) -> bytes:
        if path not in self.files:
            raise FileNotFoundError(path)
        return self.files[path]

    def size(self, path: str) -> int:
        return len(self.cat_file(path))

    def exists(self, path: str) -> bool:
        prefix = path.rstrip("/") + "/"
        return path in self.files or any(f.startswith(prefix) for f in self.files)

    def find(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted(f for f in self.files if f.startswith(prefix))

    def ls(self, path: str, detail: bool = False) -> list[str]:
        prefix = path.rstrip("/") + "/"
        children = {prefix + f[len(prefix):].split("/", 1)[0] for f in self.files if f.startswith(prefix)}
        if not children:
            raise FileNotFoundError(path)
        return sorted(children)

    def rm_file(self, path: str) -> None:
        if self.files.pop(path, None) is None:
            raise FileNotFoundError(path)

    def rm(self, path: str, recursive: bool = False) -> None:
        doomed = [f for f in self.files if f == path or f.startswith(path.rstrip("/") + "/")]
        if not doomed:
            raise FileNotFoundError(path)
        for f in doomed:
            del self.files[f]


def in_memory_storage(job: str, retry: StorageRetry = StorageRetry()) -> JobStorage:
    """A :class:`JobStorage` over a fresh :class:`DictFiles`: gone with the process."""
    storage = JobStorage("memory://in-process", job, retry)
    storage.fs = DictFiles()
    return storage
