"""The end-of-session check: a tritonserver or stub that outlives the test run fails the run, in parallel too.

A process that really escapes (a stub re-parented to init) cannot be made to order: a copy of `sleep` named
`tritonserver` stands for it. It is started by a test of a child pytest run that loads this suite's conftest."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from conftest import ROOT, wait_until

PROBE_CONFTEST = f'''
import importlib.util, sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
spec = importlib.util.spec_from_file_location("suite_conftest", {str(ROOT / "tests" / "conftest.py")!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
pytest_sessionfinish = suite.pytest_sessionfinish
record_session_temp = suite.record_session_temp
'''
PROBE_TESTS = '''
import shutil, subprocess

def test_leaves_a_tritonserver_running(tmp_path):
    fake = tmp_path / "tritonserver"
    shutil.copy(shutil.which("sleep"), fake)
    subprocess.Popen([str(fake), "120"], start_new_session=True)

def test_another():
    pass
'''


def fakes_named(folder: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "tritonserver" and any(folder in arg for arg in process.info["cmdline"] or ()):
            found.append(process)
    return found


@pytest.mark.parametrize("workers", [None, "2"], ids=["one process", "two workers"])
def test_a_process_that_outlives_the_run_fails_it_and_is_ended(tmp_path, workers):
    (tmp_path / "conftest.py").write_text(PROBE_CONFTEST)
    (tmp_path / "test_probe.py").write_text(PROBE_TESTS)
    parallel = ["-p", "xdist", "-n", workers] if workers else ["-p", "no:xdist"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}  # this run may be a worker
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *parallel,
                          "--rootdir", str(tmp_path), "-c", "/dev/null", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    output = run.stdout + run.stderr
    assert "2 passed" in output, output[-3000:]
    assert run.returncode == 1, output[-3000:]
    assert "process(es) started by the test session outlived it (now ended): pid" in output, output[-3000:]
    assert wait_until(lambda: not fakes_named(str(tmp_path)), 10), "the leaked process was not ended"


def test_the_longest_modules_are_handed_out_first():
    from conftest import LONGEST_MODULES

    tests = ROOT / "tests"
    assert [name for name in LONGEST_MODULES if not (tests / f"{name}.py").exists()] == []  # a renamed module
    assert len(set(LONGEST_MODULES)) == len(LONGEST_MODULES)
    short, long_ = "test_docs", LONGEST_MODULES[0]  # given in file order: the long one is collected second
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-p", "no:xdist", f"tests/{short}.py", f"tests/{long_}.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    modules = [line.split("::")[0] for line in run.stdout.splitlines() if "::" in line]
    assert modules and modules[0] == f"tests/{long_}.py" and modules[-1] == f"tests/{short}.py", run.stdout[-2000:]
