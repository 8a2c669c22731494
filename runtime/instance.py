"""One server instance: its identity, the ports it needs, and the model repository it owns.

Two servers on one host must never share a tritonserver or a model repository:

- each instance has an id; its tritonserver is started with `--id` set to it, and the
  supervisor and the gateway talk to a Triton only once it answers with that id;
- the ports are checked before anything starts, and a taken one is refused by number;
- the repository is locked (an exclusive `flock` on a lock file beside it, released by
  the kernel however the process ends); the lock file holds a JSON record of what the
  instance leaves on disk while it runs (shared-memory prefix, temp folders, whether it
  exports into the repository). A clean exit empties the record; a record found by the next
  owner means its predecessor was killed, and exactly what that record names is swept, its processes
  that outlived it included (runtime.lifetime).
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from embcap.staged_folder import staged_leftovers
from runtime.lifetime import end_processes

SHM_DIR = Path("/dev/shm")
PYTHON_ENV_PATTERN = re.compile(r"python_env_\w+")  # the Python backend's own temp folders


def new_instance_id() -> str:
    """A fresh id for one server instance (12 hex digits)."""
    return uuid.uuid4().hex[:12]


def server_id(instance_id: str) -> str:
    """The tritonserver `--id` of an instance: what its Triton answers in its server metadata."""
    return f"embcap-{instance_id}"


def shm_prefix(instance_id: str) -> str:
    """Prefix of the instance's shared-memory regions and temp folders."""
    return f"embcap_{instance_id[:8]}_"


def port_owner(port: int) -> str | None:
    """'pid N (name)' of the process listening on TCP `port`, when this user may see it."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port \
                and connection.pid:
            try:
                return f"pid {connection.pid} ({psutil.Process(connection.pid).name()})"
            except psutil.Error:
                return f"pid {connection.pid}"
    return None


def port_taken(address: str, port: int) -> bool:
    """Whether `port` cannot be bound on `address` right now (as a server binds: closed connections
    still in TIME_WAIT do not count, only a listener does)."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def taken_ports(ports: dict[str, tuple[str, int]]) -> list[str]:
    """For each taken port (name -> (address, port)), a sentence naming it and, if known, its owner."""
    problems = []
    for name, (address, port) in ports.items():
        if port_taken(address, port):
            owner = port_owner(port)
            problems.append(f"{name} port {port} is already in use" + (f" by {owner}" if owner else ""))
    return problems


@dataclass
class Record:
    """What a running instance leaves on disk; the lock file holds it as JSON."""

    pid: int
    instance_id: str
    shm_prefix: str
    temp_root: str  # where its temp folders (shm_prefix*) go
    exports: bool = False  # it writes the repository (export): the repository and its staging are its own
    python_env_dirs: list[str] = field(default_factory=list)


class RepositoryInUse(RuntimeError):
    """Another live process holds the repository's lock."""


def lock_path(repository: Path) -> Path:
    """The lock file of `repository`: beside it (its parent is created), or under the temp folder when the
    parent cannot be written (a read-only mount served with --skip-export)."""
    repository = Path(repository).resolve()
    parent = repository.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if parent.is_dir() and os.access(parent, os.W_OK):
        return parent / f".{repository.name}.lock"
    digest = hashlib.sha256(str(repository).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "embcap-locks" / f"{repository.name}-{digest}.lock"


class RepositoryLock:
    """The exclusive claim of one instance on one model repository."""

    def __init__(self, repository: Path, file, path: Path, predecessor: Record | None) -> None:
        self.repository = repository
        self.path = path
        self.predecessor = predecessor  # the record of an owner that was killed, or None
        self._file = file
        self.record: Record | None = None

    @classmethod
    def acquire(cls, repository: Path) -> "RepositoryLock":
        """Lock `repository` or raise RepositoryInUse naming the owner's pid."""
        repository = Path(repository).resolve()
        path = lock_path(repository)
        path.parent.mkdir(parents=True, exist_ok=True)
        file = open(path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            owner = _parse(file.read())
            file.close()
            who = f"pid {owner.pid}" if owner else "another process"
            raise RepositoryInUse(f"model repository {repository} is in use by {who} (lock {path}); give this "
                                  "server its own --model-repository (make serve REPOSITORY=...)") from None
        file.seek(0)
        return cls(repository, file, path, _parse(file.read()))

    def write(self, record: Record) -> None:
        """Replace the lock file's record (the lock stays held)."""
        self.record = record
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps(asdict(record)) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def update(self, **changes) -> None:
        """Change fields of the record written last."""
        if self.record is not None:
            self.write(Record(**{**asdict(self.record), **changes}))

    def release(self) -> None:
        """A clean exit: empty the record (nothing left to sweep) and drop the lock."""
        self._file.seek(0)
        self._file.truncate()
        self._file.flush()
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def _parse(text: str) -> Record | None:
    try:
        return Record(**json.loads(text))
    except (ValueError, TypeError):
        return None


def sweep(record: Record, repository: Path | None) -> list[str]:
    """Remove what the killed instance `record` left: its processes still running (a tritonserver or stubs
    that outlived it), its shared memory, its temp folders, its Python-backend folders, and `repository`
    (with its export's staging folders) when given. Returns what was ended and removed."""
    removed = []
    prefix = record.shm_prefix
    if not prefix.startswith("embcap_") or len(prefix) < len("embcap_") + 8:
        return removed  # never sweep with a prefix that could match another instance's files
    removed += [f"ended {process}" for process in end_processes(prefix)]  # first: they hold the files
    for path in glob.glob(str(SHM_DIR / f"{glob.escape(prefix)}*")):
        Path(path).unlink(missing_ok=True)
        removed.append(path)
    for path in glob.glob(str(Path(record.temp_root) / f"{glob.escape(prefix)}*")):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for path in record.python_env_dirs:
        if PYTHON_ENV_PATTERN.fullmatch(Path(path).name) and Path(path).is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if repository is not None and record.exports:
        for path in [str(repository), *map(str, staged_leftovers(repository))]:
            if Path(path).is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed
