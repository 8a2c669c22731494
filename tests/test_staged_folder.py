"""A folder written whole or not at all (embcap.staged_folder), as export, import and the decoder conversion use it."""

import pytest

from embcap.staged_folder import staged_folder, staged_leftovers


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
