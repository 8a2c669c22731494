"""Where run-time caches go: the evaluator's exec-able `/app/cache` when there is one.

The newest evaluator sandbox mounts an exec-able tmpfs at `/app/cache` (compiled
kernels of torch's inductor and of Triton-the-compiler must be mapped executable,
which the noexec `/tmp` forbids) and points HF_HOME, XDG_CACHE_HOME,
TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR there. Earlier sandboxes have no such
folder: caches then stay where they went before (`/tmp`, the image's folders).

Rule: when the folder exists and is writable, each cache variable that is unset or
points into `/tmp` (the fallback for a read-only root) is pointed under it; any other
explicit setting is kept (the image's pre-built EMBCAP_CACHE_DIR, for one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

APP_CACHE = Path("/app/cache")
APP_CACHE_ENV = "EMBCAP_APP_CACHE"  # another path for it (tests); the evaluator's is /app/cache
ENGINE_CACHE_ENV = "EMBCAP_ENGINE_CACHE_DIR"  # TensorRT engines of the projector (export --engine-cache-dir)
SCRATCH = Path("/tmp")

# variable -> its folder under the cache root ("" is the root itself, as the evaluator sets it)
CACHE_VARIABLES = {
    "HF_HOME": "",
    "XDG_CACHE_HOME": "",
    "TORCHINDUCTOR_CACHE_DIR": "",
    "TRITON_CACHE_DIR": "",
    "HOME": "home",  # ONNX Runtime, CUDA's compute cache and other libraries write under $HOME
    "EMBCAP_CACHE_DIR": "embcap",  # de-quantised decoders
    ENGINE_CACHE_ENV: "embcap-trt-engines",
}


def app_cache(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The exec-able cache folder if it exists and this user can write to it, else None."""
    root = Path(environ.get(APP_CACHE_ENV) or APP_CACHE)
    return root if root.is_dir() and os.access(root, os.W_OK | os.X_OK) else None


def _under(value: str, folder: Path) -> bool:
    return Path(value) == folder or folder in Path(value).parents


def cache_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables to set (see the module's rule); {} when there is no usable `/app/cache`."""
    root = app_cache(environ)
    if root is None:
        return {}
    updates = {}
    for name, folder in CACHE_VARIABLES.items():
        current = environ.get(name)
        if current and _under(current, root):
            continue  # already there: the evaluator points its own variables at it
        if not current or _under(current, SCRATCH):
            updates[name] = str(root / folder) if folder else str(root)
    for path in updates.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    return updates


def engine_cache_dir(environ: Mapping[str, str]) -> str | None:
    """The TensorRT engine folder $EMBCAP_ENGINE_CACHE_DIR names (server.py hands it to the export
    unless --engine-cache-dir is given), or None."""
    return environ.get(ENGINE_CACHE_ENV) or None
