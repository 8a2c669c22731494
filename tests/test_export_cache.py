"""The export cache (export/cache.py): a repository exported before is reused only while nothing it was made
from has changed. The exports here are real (the tiny checkpoint, in this process); that a reused repository
serves is checked on a real server.py in tests/test_instances.py (a killed server's successor reuses its export)."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import pytest

from export.cache import (EXPORT_ENVIRONMENT, EXPORT_RECORD, MANIFEST, RACY_S, CachedExport, ExportCache,
                          code_digest, export_key)
from export.options import ExportOptions
from export.repository import export_repository
from runtime.exporting import keep, probe_disagrees

OPTIONS = ExportOptions(max_batch_size=4, decoder_threads=1)


def aged(folder: Path, seconds: float = 10 * RACY_S) -> Path:
    """`folder` with every file dated `seconds` ago: inputs older than RACY_S may be cached."""
    past = time.time() - seconds
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (past, past))
    return folder


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny checkpoint (the tests change its files)."""
    return aged(Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint")))


def export(checkpoint: Path, out: Path) -> Path:
    return export_repository(checkpoint, out, OPTIONS, log=lambda _: None)


def key_for(checkpoint: Path, options: ExportOptions = OPTIONS, environ: dict | None = None) -> str:
    return export_key(checkpoint, options.to_dict(), environ or {}, code="code")


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def test_an_exported_repository_names_no_path_of_its_own(checkpoint, tmp_path):
    repository = export(checkpoint, tmp_path / "somewhere" / "repo")
    for path, data in tree(repository).items():
        assert str(repository).encode() not in data, f"{path} names the repository's own path"
        assert str(repository.parent).encode() not in data, path
    record = (repository / EXPORT_RECORD).read_text()
    assert str(checkpoint / "caption_model.json") in record  # the inputs it read are named


def test_an_unchanged_export_is_reused_whole_from_another_place(checkpoint, tmp_path):
    cache = ExportCache(tmp_path / "cache")
    repository = export(checkpoint, tmp_path / "first" / "repo")
    key = key_for(checkpoint)
    assert cache.lookup(key) == (None, "no cached export for this checkpoint, these options and this code")
    assert cache.store(key, repository) is None
    entry, why = cache.lookup(key)
    assert isinstance(entry, CachedExport) and why == "unchanged" and entry.device == "cpu"
    cache.restore(entry, tmp_path / "second" / "repo")
    assert tree(tmp_path / "second" / "repo") == tree(repository)
    assert not (tmp_path / "second" / "repo" / MANIFEST).exists()


@pytest.mark.parametrize("change", ["rewritten", "touched", "added", "removed"])
def test_a_changed_input_file_sends_the_next_start_to_export_again_naming_it(checkpoint, tmp_path, change):
    cache = ExportCache(tmp_path / "cache")
    key = key_for(checkpoint)
    assert cache.store(key, export(checkpoint, tmp_path / "repo")) is None
    projector = checkpoint / "projector.safetensors"
    assert projector.is_file()
    if change == "rewritten":  # same size, new content, same second
        data = bytearray(projector.read_bytes())
        data[-1] ^= 1
        stat = projector.stat()
        projector.write_bytes(bytes(data))
        os.utime(projector, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
        changed = projector
    elif change == "touched":
        os.utime(projector)
        changed = projector
    elif change == "added":
        changed = checkpoint / "decoder" / "generation_config.extra.json"
        changed.write_text("{}")
    else:
        changed = checkpoint / "decoder" / "config.json"
        changed.unlink()
    entry, why = cache.lookup(key)
    assert entry is None and why == f"{changed} changed since the cached export"


def test_inputs_modified_just_before_the_export_are_not_cached(checkpoint, tmp_path):
    """A rewrite within the same clock tick at the same size would pass for unchanged: not cached at all."""
    cache = ExportCache(tmp_path / "cache")
    (checkpoint / "caption_model.json").touch()
    repository = export(checkpoint, tmp_path / "repo")
    refused = cache.store(key_for(checkpoint), repository)
    assert refused == f"{checkpoint / 'caption_model.json'} was modified less than {RACY_S:.0f} s before the " \
                      "export read it"
    assert not (tmp_path / "cache" / key_for(checkpoint)).exists()


def test_the_key_changes_with_the_path_the_options_the_environment_and_the_code(checkpoint, tmp_path):
    key = key_for(checkpoint)
    assert key == key_for(checkpoint) == export_key(checkpoint, OPTIONS.to_dict(), {"UNRELATED": "1"}, code="code")
    others = {
        "path": key_for(aged(Path(shutil.copytree(checkpoint, tmp_path / "copy")))),
        "options": key_for(checkpoint, ExportOptions(max_batch_size=8, decoder_threads=1)),
        "code": export_key(checkpoint, OPTIONS.to_dict(), {}, code="other code"),
        **{name: key_for(checkpoint, environ={name: "7"}) for name in EXPORT_ENVIRONMENT},
    }
    assert key not in others.values() and len(set(others.values())) == len(others), others


def test_the_code_digest_covers_what_writes_a_repository(tmp_path):
    root = tmp_path / "code"
    for folder in ("embcap", "export", "model_repository/decoder"):
        (root / folder).mkdir(parents=True)
        (root / folder / "a.py").write_text("x = 1\n")
    before = code_digest(root)
    (root / "model_repository" / "decoder" / "a.py").write_text("x = 2\n")
    assert code_digest(root) != before
    (root / "embcap" / "__pycache__").mkdir()
    after = code_digest(root)
    (root / "embcap" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"compiled")
    assert code_digest(root) == after  # byte code is not code


@pytest.mark.parametrize("damage", ["file removed", "file truncated", "manifest unreadable"])
def test_a_damaged_entry_is_not_served(checkpoint, tmp_path, damage):
    cache = ExportCache(tmp_path / "cache")
    key = key_for(checkpoint)
    cache.store(key, export(checkpoint, tmp_path / "repo"))
    entry = tmp_path / "cache" / key
    if damage == "file removed":
        (entry / "decoder" / "config.pbtxt").unlink()
    elif damage == "file truncated":
        (entry / "projector" / "1" / "projector.onnx").write_bytes(b"")
    else:
        (entry / MANIFEST).write_text("{")
    found, why = cache.lookup(key)
    assert found is None and str(entry) in why, why


def test_the_least_recently_used_entries_go_first(checkpoint, tmp_path):
    cache = ExportCache(tmp_path / "cache", max_entries=2)
    repository = export(checkpoint, tmp_path / "repo")
    keys = ["a" * 32, "b" * 32, "c" * 32]
    for key in keys[:2]:
        cache.store(key, repository)
        time.sleep(0.02)
    cache.restore(cache.lookup(keys[0])[0], tmp_path / "restored")  # used again: b is now the oldest
    time.sleep(0.02)
    cache.store(keys[2], repository)
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [keys[0], keys[2]]


def test_an_entry_evicted_before_it_is_copied_fails_the_copy_and_leaves_no_repository(checkpoint, tmp_path):
    cache = ExportCache(tmp_path / "cache")
    key = key_for(checkpoint)
    cache.store(key, export(checkpoint, tmp_path / "repo"))
    entry, _ = cache.lookup(key)
    shutil.rmtree(entry.path)
    with pytest.raises(OSError):
        cache.restore(entry, tmp_path / "target")
    assert not (tmp_path / "target").exists() and list(tmp_path.glob("target.*")) == []


def test_a_cache_that_cannot_be_written_is_logged_and_costs_only_the_reuse(checkpoint, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    repository = export(checkpoint, tmp_path / "repo")
    with caplog.at_level(logging.WARNING, logger="embcap.server"):
        assert keep(ExportCache(blocker / "exports"), key_for(checkpoint), repository) is False
    assert "export cache: the export is not kept" in caplog.text and str(blocker) in caplog.text
    assert (repository / EXPORT_RECORD).is_file()


def test_a_device_auto_export_is_reused_only_where_the_probe_decides_the_same_device(tmp_path):
    entry = CachedExport(tmp_path, "cpu", 1.0)
    assert probe_disagrees(entry, {"serve": True, "device": "cpu"}) is None
    assert probe_disagrees(entry, {"serve": True, "device": "cuda"}) == \
        "the cached export is for cpu, the GPU probe decided cuda"
    assert "refuses" in probe_disagrees(entry, {"serve": False, "device": "cpu"})
    assert "no answer" in probe_disagrees(entry, None)
