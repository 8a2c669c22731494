"""Where caches go: the evaluator's /app/cache when it exists and is writable, else where they went."""

from __future__ import annotations

import os

from export.options import ExportOptions
from runtime.cache_dirs import APP_CACHE_ENV, cache_environment, engine_cache_dir
from runtime.serve import export_options, parse_args


def test_no_app_cache_changes_nothing(tmp_path):
    assert cache_environment({APP_CACHE_ENV: str(tmp_path / "absent"), "HOME": "/tmp"}) == {}
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() != 0:  # root writes anywhere
        assert cache_environment({APP_CACHE_ENV: str(read_only)}) == {}


def test_app_cache_takes_unset_and_tmp_caches_and_keeps_explicit_ones(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    environ = {APP_CACHE_ENV: str(root), "HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/.cache", "HF_HOME": str(root),
               "EMBCAP_CACHE_DIR": "/opt/embcap/cache"}  # the image's pre-built decoder stays where it is
    updates = cache_environment(environ)
    assert updates == {"HOME": f"{root}/home", "XDG_CACHE_HOME": str(root), "TORCHINDUCTOR_CACHE_DIR": str(root),
                       "TRITON_CACHE_DIR": str(root), "EMBCAP_ENGINE_CACHE_DIR": f"{root}/embcap-trt-engines"}
    assert (root / "home").is_dir() and (root / "embcap-trt-engines").is_dir()
    assert cache_environment({APP_CACHE_ENV: str(root)})["EMBCAP_CACHE_DIR"] == f"{root}/embcap"


def test_engine_cache_reaches_the_export_unless_given():
    env = {"EMBCAP_ENGINE_CACHE_DIR": "/app/cache/embcap-trt-engines"}
    assert engine_cache_dir(env) == "/app/cache/embcap-trt-engines"
    assert engine_cache_dir({}) is None
    assert export_options(parse_args([]), env).engine_cache_dir == "/app/cache/embcap-trt-engines"
    assert export_options(parse_args(["--engine-cache-dir=/x"]), env).engine_cache_dir == "/x"
    assert export_options(parse_args(["--max-batch-size=8"]), {}) == ExportOptions(max_batch_size=8)
