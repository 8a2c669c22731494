"""A folder or file written whole or not at all (embcap.staged_folder), as export, import, the decoder conversion
and the caches use it."""

import pytest

from embcap.staged_folder import staged_file, staged_folder, staged_leftovers


def test_a_complete_write_replaces_the_target(tmp_path):
    target = tmp_path / "repo"
    target.mkdir()
    (target / "old").write_text("old")
    with staged_folder(target) as staging:
        (staging / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new"] and staged_leftovers(target) == []


def test_a_failed_write_leaves_the_old_target_and_no_staging(tmp_path):
    target = tmp_path / "repo"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError, match="half way"):
        with staged_folder(target) as staging:
            (staging / "new").write_text("new")
            assert staged_leftovers(target) == [staging]  # what a killed writer would leave, for the sweep
            raise RuntimeError("half way")
    assert sorted(p.name for p in target.iterdir()) == ["old"] and staged_leftovers(target) == []


def test_a_staged_file_appears_whole_with_its_mode_or_not_at_all(tmp_path):
    target = tmp_path / "cache" / "entry.npy"
    with staged_file(target, mode=0o755) as file:
        file.write(b"half")
        assert not target.exists(), "a reader must not see the file before it is complete"
        file.write(b" and whole")
    assert target.read_bytes() == b"half and whole" and target.stat().st_mode & 0o777 == 0o755
    with pytest.raises(RuntimeError, match="half way"):
        with staged_file(target) as file:
            file.write(b"other")
            raise RuntimeError("half way")
    assert target.read_bytes() == b"half and whole" and [p.name for p in target.parent.iterdir()] == ["entry.npy"]
