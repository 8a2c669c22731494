"""Where tritonserver is and the environment its Python-backend stub needs.

The server comes from NVIDIA's container (`/opt/tritonserver`) or, on a plain host,
from the `nvidia-pytriton` wheel. Override with $TRITONSERVER_HOME (a folder with
`bin/tritonserver` and `backends/`).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from runtime.threads import worker_environment

HOME_ENV = "TRITONSERVER_HOME"
NGC_HOME = Path("/opt/tritonserver")

@dataclass(frozen=True)
class TritonInstall:
    """Where a tritonserver binary, its backends and extra libraries are."""

    binary: Path
    backends: Path
    library_dirs: tuple[Path, ...] = ()


def _wheel_install() -> TritonInstall | None:
    try:
        import pytriton
    except ImportError:
        return None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    if not (root / "bin" / "tritonserver").is_file():
        return None
    return TritonInstall(root / "bin" / "tritonserver", root / "backends", (libs,))


def find_triton() -> TritonInstall:
    """$TRITONSERVER_HOME, else /opt/tritonserver, else the nvidia-pytriton wheel."""
    configured = os.environ.get(HOME_ENV)
    candidates = [Path(configured)] if configured else [NGC_HOME]
    for home in candidates:
        if (home / "bin" / "tritonserver").is_file():
            return TritonInstall(home / "bin" / "tritonserver", home / "backends", (home / "lib",))
    if configured:
        raise FileNotFoundError(f"${HOME_ENV}={configured} has no bin/tritonserver")
    install = _wheel_install()
    if install is None:
        raise FileNotFoundError("no tritonserver found: install nvidia-pytriton or set $" + HOME_ENV)
    return install


def ensure_python_stub(install: TritonInstall) -> None:
    """The wheel ships the Python-backend stub apart from the backend: put it in place."""
    stub = install.backends / "python" / "triton_python_backend_stub"
    if stub.exists():
        return
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = install.backends.parent / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not source.is_file():
        raise FileNotFoundError(f"no Python-backend stub for Python {version} at {source}")
    shutil.copy2(source, stub)


def triton_environment(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment in which the Python-backend stub finds this interpreter and its packages."""
    env = worker_environment(base)
    python_lib = sysconfig.get_config_var("LIBDIR")  # the stub embeds libpython of this interpreter
    lib_dirs = [str(p) for p in install.library_dirs if p.is_dir()] + ([python_lib] if python_lib else [])
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(lib_dirs)
    # The stub ignores PYTHONPATH and takes the first python3 on PATH as its prefix.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    return env
