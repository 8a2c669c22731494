"""`python -m doctor`: passes on this repository, fails with the right reason on broken copies."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from doctor import PLACEHOLDER_HOTKEY, dockerfile, dockerignore, ss58
from doctor.checks import _tool

ROW = re.compile(r"^(\S+)\s+(PASS|FAIL|WARN|SKIP)\s+(.*)$")
# A valid hotkey that is not the placeholder (Substrate's well-known development key "Alice").
ALICE = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
NEEDS_TOOLS = pytest.mark.skipif(not (_tool("hadolint") and _tool("docker-compose")),
                                 reason="hadolint / docker-compose not installed: make container-tools")


def doctor(repo: Path, *args: str) -> tuple[int, dict[str, tuple[str, str]], str]:
    """Run the CLI; return (exit code, {check: (status, reason)}, output)."""
    run = subprocess.run([sys.executable, "-m", "doctor", "--repo", str(repo), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    rows = {m[1]: (m[2], m[3]) for line in run.stdout.splitlines() if (m := ROW.match(line))}
    return run.returncode, rows, run.stdout + run.stderr


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def good_copy(tmp_path_factory) -> Path:
    """The files the evaluator looks at, copied into a fresh git repository that passes."""
    repo = tmp_path_factory.mktemp("good") / "repo"
    repo.mkdir()
    for name in ("Dockerfile", ".dockerignore", "docker-compose.yml", "requirements.txt", ".gitattributes"):
        shutil.copy2(ROOT / name, repo / name)
    shutil.copytree(ROOT / "models" / "default", repo / "models" / "default")
    for path in (repo / "models").rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    (repo / "hotkey.txt").write_text(ALICE)
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "miner")
    return repo


@pytest.fixture
def broken(good_copy, tmp_path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(good_copy, repo, symlinks=True)
    return repo


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_ss58_round_trip_and_known_address():
    alice = bytes.fromhex("d43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d")
    assert ss58.encode(alice) == ALICE
    assert ss58.validate_hotkey(ALICE) == alice
    placeholder_key = hashlib.sha256(b"embcap placeholder hotkey: replace with your own").digest()
    assert ss58.encode(placeholder_key) == PLACEHOLDER_HOTKEY
    assert ss58.decode(ss58.encode(b"\x07" * 32, prefix=1234)) == (1234, b"\x07" * 32)
    for bad, reason in [(ALICE[:-1] + "Z", "checksum"), (ALICE[:-2], "length"), (ALICE + "\n", "whitespace"),
                        ("0" + ALICE[1:], "base58"), (ss58.encode(alice, prefix=0), "prefix 0")]:
        with pytest.raises(ss58.SS58Error, match=reason):
            ss58.validate_hotkey(bad)


def test_dockerignore_rules_follow_docker():
    rules = ["models/", "*.pyc", "**/__pycache__", "!keep.pyc", "/.git"]
    assert dockerignore.is_excluded("models/default/w.safetensors", rules)
    assert dockerignore.is_excluded("x.pyc", rules) and not dockerignore.is_excluded("a/x.pyc", rules)
    assert dockerignore.is_excluded("a/b/__pycache__/m.pyc", rules)
    assert not dockerignore.is_excluded("keep.pyc", rules)
    assert dockerignore.is_excluded(".git/HEAD", rules) and not dockerignore.is_excluded("server.py", rules)


def test_dockerfile_parser_and_word_check():
    text = "FROM x\n# a comment about localhost\nENV A=1 \\\n    B=\"two words\"\nWORKDIR /app\nCMD [\"run\"]\n"
    assert [(i.keyword, i.line) for i in dockerfile.parse(text)] == [("FROM", 1), ("ENV", 3), ("WORKDIR", 5),
                                                                      ("CMD", 6)]
    assert dockerfile.env(dockerfile.parse(text)) == {"A": "1", "B": "two words"}
    assert dockerfile.forbidden_words(text) == [(2, "host")]


def test_buildkit_only_syntax_is_found_with_its_line():
    text = ("# syntax=docker/dockerfile:1.7\n# escape=\\\\\nFROM --platform=linux/amd64 x AS a\n"
            "RUN --mount=type=cache,target=/root/.cache \\\n    pip install x\n"
            "COPY --from=a --chown=1:1 a b\nCOPY --chmod=755 --link a b\nADD --checksum=sha256:00 u /f\n"
            "RUN echo \"<<EOF\" && echo '<<X' && cat <<<here && echo 1 << 2\n"
            "RUN --network=none true\nRUN <<EOF\necho hi\nEOF\nCOPY <<-END /f\nx\nEND\n")
    assert dockerfile.buildkit_only(text) == [
        (1, "'# syntax=docker/dockerfile:1.7' directive (a BuildKit frontend; the legacy builder ignores it and "
            "whatever needs it fails)"),
        (4, "RUN --mount"), (7, "COPY --chmod"), (7, "COPY --link"), (8, "ADD --checksum"), (10, "RUN --network"),
        (11, "heredoc in RUN ('<<')"), (14, "heredoc in COPY ('<<')")]
    # A syntax comment after the first instruction is no directive; FROM --platform, --from, --chown are legacy.
    assert dockerfile.buildkit_only("FROM --platform=$BUILDPLATFORM x\n# syntax=docker/dockerfile:1\n"
                                    "COPY --from=x --chown=1 a b\nRUN [\"sh\", \"-c\", \"true\"]\n") == []
    assert dockerfile.buildkit_only((ROOT / "Dockerfile").read_text()) == []


@NEEDS_TOOLS
def test_doctor_passes_on_this_repository():
    code, rows, output = doctor(ROOT)
    assert code == 0, output
    failed = {name: row for name, row in rows.items() if row[0] == "FAIL"}
    assert not failed, output
    for check in ("dockerfile-words", "dockerfile-legacy-builder", "dockerfile-workdir", "dockerfile-port",
                  "dockerignore", "models",
                  "hadolint", "compose", "compose-sandbox", "export"):
        assert rows[check][0] == "PASS", output


@NEEDS_TOOLS
def test_doctor_passes_on_a_clean_miner_copy(good_copy):
    code, rows, output = doctor(good_copy, "--skip-export", "--hotkey", ALICE)
    assert code == 0, output
    assert {status for status, _ in rows.values()} <= {"PASS", "SKIP"}, output


def _append(name: str, text: str):
    return lambda repo: (repo / name).write_text((repo / name).read_text() + text)


BREAKAGES = {
    "localhost-in-a-comment": (_append("Dockerfile", "# health: curl localhost:8000\n"), "dockerfile-words", "'host'"),
    "host-flag": (lambda r: edit(r / "Dockerfile", '"--port"', '"--host", "0.0.0.0", "--port"'),
                  "dockerfile-words", "'host'"),
    "sudo": (_append("Dockerfile", "RUN sudo true\n"), "dockerfile-words", "'sudo'"),
    "chmod-777": (_append("Dockerfile", "RUN chmod 777 /tmp\n"), "dockerfile-words", "'chmod 777'"),
    "run-mount": (lambda r: edit(r / "Dockerfile", "RUN python3 -m pip install",
                                 "RUN --mount=type=cache,target=/root/.cache python3 -m pip install"),
                  "dockerfile-legacy-builder", "RUN --mount"),
    "heredoc": (_append("Dockerfile", "RUN <<EOF\necho built > /tmp/built\nEOF\n"), "dockerfile-legacy-builder",
                "heredoc in RUN"),
    "syntax-directive": (lambda r: (r / "Dockerfile").write_text("# syntax=docker/dockerfile:1\n"
                                                                 + (r / "Dockerfile").read_text()),
                         "dockerfile-legacy-builder", "line 1: '# syntax=docker/dockerfile:1'"),
    "copy-chmod": (lambda r: edit(r / "Dockerfile", "COPY . .", "COPY --chmod=755 . ."), "dockerfile-legacy-builder",
                   "COPY --chmod"),
    "workdir": (lambda r: edit(r / "Dockerfile", "WORKDIR /app", "WORKDIR /srv"), "dockerfile-workdir", "/srv"),
    "port": (lambda r: edit(r / "Dockerfile", '"--port", "8000"', '"--port", "9000"'), "dockerfile-port", "9000"),
    "no-expose": (lambda r: edit(r / "Dockerfile", "EXPOSE 8000\n", ""), "dockerfile-port", "EXPOSE 8000 missing"),
    "copies-models": (lambda r: edit(r / "Dockerfile", "COPY . .", "COPY . .\nCOPY models/ /app/models/"),
                      "dockerfile-models", "excludes models/"),
    "online": (lambda r: edit(r / "Dockerfile", "HF_HUB_OFFLINE=1", "HF_HUB_OFFLINE=0"), "dockerfile-offline",
               "HF_HUB_OFFLINE=1"),
    "hadolint": (lambda r: edit(r / "Dockerfile", "COPY . .", "COPY . .\nRUN cd /app && ls"), "hadolint", "DL3003"),
    "dockerignore-models": (lambda r: edit(r / ".dockerignore", "models/\n", ""), "dockerignore", "models/"),
    "dockerignore-newline": (lambda r: (r / ".dockerignore").write_text((r / ".dockerignore").read_text().rstrip()),
                             "dockerignore", "newline"),
    "hotkey-newline": (lambda r: (r / "hotkey.txt").write_text(ALICE + "\n"), "hotkey", "trailing newline"),
    "hotkey-typo": (lambda r: (r / "hotkey.txt").write_text(ALICE[:-1] + "Z"), "hotkey", "checksum"),
    "hotkey-missing": (lambda r: (r / "hotkey.txt").unlink(), "hotkey", "no hotkey.txt"),
    "missing-weights": (lambda r: (r / "models/default/projector.safetensors").unlink(), "models",
                        "projector weights"),
    "no-models": (lambda r: shutil.rmtree(r / "models"), "models", "no models/"),
    "uncommitted-weights": (lambda r: git(r, "rm", "-q", "--cached", "models/default/projector.safetensors"),
                            "models-committed", "not committed"),
    "lfs-pointer": (lambda r: (r / "models/default/projector.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 10045912\n"), "weights-size", "git lfs pull"),
    "not-in-lfs": (lambda r: (r / ".gitattributes").write_text(""), "weights-size",
                   "add to .gitattributes: *.safetensors filter=lfs diff=lfs merge=lfs -text"),
    "compose-invalid": (lambda r: edit(r / "docker-compose.yml", "pids_limit: 100", "pids_limit: lots"),
                        "compose", "does not validate"),
    "compose-writable-root": (lambda r: edit(r / "docker-compose.yml", "    read_only: true\n    cap_drop",
                                             "    cap_drop"),
                              "compose-sandbox", "root is not read-only"),
    "compose-exec-tmp": (lambda r: edit(r / "docker-compose.yml", "/tmp:rw,noexec,nosuid", "/tmp:rw,nosuid"),
                         "compose-sandbox", "/tmp is not a noexec tmpfs"),
    "compose-no-app-cache": (lambda r: edit(r / "docker-compose.yml",
                                            "      - /app/cache:rw,exec,nosuid,size=8g\n", ""),
                             "compose-sandbox", "/app/cache is not an exec-able tmpfs"),
}


@NEEDS_TOOLS
@pytest.mark.parametrize("name", list(BREAKAGES))
def test_doctor_fails_with_the_reason(broken, name):
    mutate, check, reason = BREAKAGES[name]
    mutate(broken)
    code, rows, output = doctor(broken, "--skip-export", "--hotkey", ALICE) if name != "hotkey-newline" else \
        doctor(broken, "--skip-export")
    assert code == 1, output
    assert rows[check][0] == "FAIL" and reason in rows[check][1], output
    others = {n for n, (status, _) in rows.items() if status == "FAIL"} - {check}
    assert others <= {"models-committed", "weights-size", "models", "hadolint", "checkpoint-complete"}, \
        f"unrelated failures {others}:\n{output}"


@NEEDS_TOOLS
def test_incomplete_checkpoint_elsewhere_uncommitted_is_named_with_what_to_do(broken, tiny_checkpoint):
    """A checkpoint without decoder/tokenizer.json used to pass ("names 10 file(s), all present")."""
    shutil.copytree(tiny_checkpoint, broken / "models" / "mine")
    (broken / "models" / "mine" / "decoder" / "tokenizer.json").unlink()
    code, rows, output = doctor(broken, "--skip-export", "--hotkey", ALICE, "--checkpoint", "models/mine")
    assert code == 1, output
    assert rows["checkpoint-complete"][0] == "FAIL" and "decoder/tokenizer.json is missing" in rows[
        "checkpoint-complete"][1], output
    status, reason = rows["served-checkpoint"]  # the image serves models/default, whatever --checkpoint says
    assert status == "WARN" and "the image serves models/default" in reason, output
    files = len([p for p in (broken / "models" / "mine").rglob("*") if p.is_file()])
    status, reason = rows["models-committed"]
    assert status == "FAIL" and f"{files} of {files} checkpoint file(s) not committed" in reason, output
    assert f"and {files - 4} more" in reason and "git add models/mine && git commit" in reason, output


def test_export_refuses_a_checkpoint_without_its_tokenizer(tiny_checkpoint, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    (checkpoint / "decoder" / "tokenizer.json").unlink()
    run = subprocess.run([sys.executable, "-m", "export", str(checkpoint), "--out", str(tmp_path / "repo")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "decoder/tokenizer.json is missing" in run.stderr, run.stderr
    assert run.stderr.count("export failed") == 1 and not (tmp_path / "repo").exists()


def test_export_failure_is_reported(broken):
    for package in ("embcap", "export", "model_repository"):  # the export runs the repository's own code
        shutil.copytree(ROOT / package, broken / package, ignore=shutil.ignore_patterns("__pycache__"))
    (broken / "models/default/projector.safetensors").write_bytes(b"\0" * 64)
    code, rows, output = doctor(broken, "--hotkey", ALICE)
    assert code == 1
    assert rows["export"][0] == "FAIL", output


def test_hotkey_command_writes_exactly_and_refuses_bad_input(tmp_path):
    def run(*a):
        return subprocess.run([sys.executable, "-m", "doctor", "--repo", str(tmp_path), "hotkey", *a],
                              cwd=ROOT, capture_output=True, text=True)
    assert run(ALICE + "\n").returncode == 0  # a pasted newline is dropped
    assert (tmp_path / "hotkey.txt").read_bytes() == ALICE.encode()
    shown = run()
    assert shown.returncode == 0 and ALICE in shown.stdout
    refused = run(ALICE[:-1] + "Z")
    assert refused.returncode == 2 and "checksum" in refused.stderr
    assert (tmp_path / "hotkey.txt").read_bytes() == ALICE.encode(), "a refused hotkey must not be written"
    make = subprocess.run(["make", "-s", "-C", str(ROOT), "-n", "hotkey", "HOTKEY=" + ALICE], capture_output=True,
                          text=True)
    assert f"-m doctor hotkey {ALICE}" in make.stdout


@NEEDS_TOOLS
def test_a_reranking_encoders_files_count_as_the_checkpoints(broken, tiny_checkpoint, smollm2_dir):
    import json

    from tooling.builders import make_onnx_text_tower

    mine = broken / "models" / "mine"
    shutil.copytree(tiny_checkpoint, mine)
    make_onnx_text_tower(mine / "tower", smollm2_dir)
    spec = json.loads((mine / "caption_model.json").read_text())
    spec["rerank"] = {"candidates": 2, "encoder": {"kind": "onnx", "path": "tower/model.onnx",
                                                   "tokenizer": "tower/tokenizer.json"}}
    (mine / "caption_model.json").write_text(json.dumps(spec))
    git(broken, "add", "models/mine")
    git(broken, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "mine")
    git(broken, "rm", "-q", "--cached", "models/mine/tower/model.onnx")
    code, rows, output = doctor(broken, "--skip-export", "--hotkey", ALICE, "--checkpoint", "models/mine")
    status, reason = rows["models-committed"]
    assert status == "FAIL" and "1 of" in reason and "tower/model.onnx" in reason, output
    (mine / "tower" / "tokenizer.json").unlink()
    code, rows, output = doctor(broken, "--skip-export", "--hotkey", ALICE, "--checkpoint", "models/mine")
    assert code == 1 and "reranking encoder file" in output and "tokenizer.json is missing" in output, output


def big_weights(repo: Path, gib: float) -> Path:
    """A materialised (sparse) weight file of `gib` GiB in the served checkpoint's decoder-side folder."""
    path = repo / "models" / "default" / "big" / "weights.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.truncate(int(gib * 2**30))
    return path


@pytest.mark.parametrize("gib, status", [(0.3, "PASS"), (19.0, "WARN")])
def test_lfs_tracked_weights_of_any_size_pass_and_a_huge_total_warns(broken, gib, status):
    from doctor import lfs
    from doctor.checks import _check_sizes

    path = big_weights(broken, gib)
    files = [path, broken / "models" / "default" / "projector.safetensors"]
    result = _check_sizes(broken, files)  # the rule itself: a 300 MiB file is fine in LFS, 19 GiB is a warning
    assert result.status == status, result
    assert lfs.inspect(broken, files).not_routed == []
    (broken / ".gitattributes").write_text("*.onnx filter=lfs diff=lfs merge=lfs -text\n")
    result = _check_sizes(broken, files)
    assert result.status == "FAIL" and "models/default/big/weights.safetensors" in result.reason
    assert "*.safetensors filter=lfs diff=lfs merge=lfs -text" in result.reason


def test_this_repositorys_default_model_stays_under_githubs_file_limit():
    from doctor.lfs import GITHUB_FILE_LIMIT

    sizes = {path.name: path.stat().st_size for path in (ROOT / "models" / "default").rglob("*") if path.is_file()}
    assert sizes and max(sizes.values()) < GITHUB_FILE_LIMIT, sizes
