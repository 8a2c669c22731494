"""deploy/kubernetes: every kustomization renders, validates against the Kubernetes schemas,
and agrees with the Dockerfile, docker-compose.yml and the server's own defaults.

Offline: `kubectl kustomize` renders without a cluster, `kubernetes_validate` holds the
schemas. Nothing here applies the manifests to a cluster.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient

from conftest import ROOT
from doctor import dockerfile
from gateway.app import HEALTH_PATHS, create_app
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from runtime.serve import parse_args  # server.py's options
from runtime.triton import KILL_GRACE_S, TritonOptions

DEPLOY = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))
MONITORING = DEPLOY / "monitoring"  # scraping and the adapter's rules; the rest serve the stack
SERVING = [p for p in KUSTOMIZATIONS if p != MONITORING]
# The oldest release the manifests claim (the namespace's pod-security enforce-version) and
# the newest schema set of the pinned kubernetes-validate.
KUBERNETES_VERSIONS = ("1.29.0", "1.31.0")
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}  # Pod Security "restricted": the only volume types allowed


KUBECTL_MIN = (1, 27)  # `kubectl kustomize` with the kustomize these manifests need


def _kubectl() -> str:
    """The venv's kubectl (`make setup` installs the pinned wheel on x86-64 Linux), else the one on PATH."""
    local = Path(sys.executable).parent / "kubectl"
    tool = str(local) if local.is_file() else shutil.which("kubectl")
    if tool is None:
        pytest.fail(f"kubectl not found: neither {local} nor `kubectl` on PATH. It renders deploy/kubernetes "
                    "(`kubectl kustomize`, no cluster needed): `make setup` installs it on x86-64 Linux; elsewhere "
                    f"install kubectl >= {'.'.join(map(str, KUBECTL_MIN))} and put it on PATH")
    run = subprocess.run([tool, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=30)
    try:
        version = json.loads(run.stdout)["clientVersion"]
        found = (int(version["major"]), int(re.sub(r"\D.*", "", version["minor"])))
    except (ValueError, KeyError):
        pytest.fail(f"{tool} does not tell its version (`kubectl version --client -o json`): {run.stderr.strip()}")
    if found < KUBECTL_MIN:
        pytest.fail(f"{tool} is kubectl {found[0]}.{found[1]}; the manifests need >= "
                    f"{'.'.join(map(str, KUBECTL_MIN))} (its kustomize)")
    return tool


_RENDERED: dict[Path, list[dict]] = {}


def render(folder: Path) -> list[dict]:
    """The objects `kubectl kustomize folder` renders (cached per folder)."""
    if folder not in _RENDERED:
        run = subprocess.run([_kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"kubectl kustomize {folder.relative_to(ROOT)}: {run.stderr.strip()}"
        _RENDERED[folder] = [doc for doc in yaml.safe_load_all(run.stdout) if doc]
    return _RENDERED[folder]


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def server_container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container: the image runs gateway and tritonserver together"
    return containers[0]


def named_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    matches = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert matches, f"no container port named {port!r}"
    return matches[0]


def to_bytes(quantity: str) -> int:
    """A Kubernetes quantity (4Gi, 64Mi) or a Docker size (4g, 64m; binary units) in bytes."""
    match = re.fullmatch(r"(\d+)([KMG]i?|[kmg])?", str(quantity))
    assert match, f"unknown size {quantity!r}"
    unit = (match[2] or "").lower().rstrip("i")
    return int(match[1]) * 1024 ** " kmg".index(unit or " ")


def image_facts() -> dict:
    """Port, user, command and environment of the image, read from the Dockerfile."""
    stage = dockerfile.final_stage(dockerfile.load(ROOT / "Dockerfile"))
    last = {ins.keyword: ins.arguments for ins in stage}
    command = json.loads(last["CMD"])
    port = int(last["EXPOSE"].split("/")[0])
    assert command[command.index("--port") + 1] == str(port), "the Dockerfile's CMD and EXPOSE disagree"
    user, _, group = last["USER"].partition(":")
    return {"port": port, "user": int(user), "group": int(group or user), "command": command,
            "workdir": Path(last["WORKDIR"]), "env": dockerfile.env(stage)}


def compose_service() -> dict:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert len(services) == 1
    return next(iter(services.values()))


def probe_budget_s(probe: dict) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


# --- rendering and schemas -----------------------------------------------------------------


def test_every_overlay_is_checked():
    names = {p.relative_to(DEPLOY).as_posix() for p in KUSTOMIZATIONS}
    assert {"base", "overlays/single-gpu", "overlays/cluster", "monitoring"} <= names
    assert {p.relative_to(DEPLOY).as_posix() for p in SERVING} == names - {"monitoring"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_renders_and_validates(folder: Path, version: str):
    """Strict: unknown fields fail too (a misspelt probe field would otherwise be dropped silently)."""
    objects = render(folder)
    assert objects
    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert not errors, "\n".join(errors)


# --- the serving stack, in every overlay ---------------------------------------------------


@pytest.fixture(params=SERVING, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def objects(request) -> list[dict]:
    return render(request.param)


def test_agrees_with_dockerfile(objects):
    image = image_facts()
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(deployment)
    args = container["args"]
    assert "command" not in container, "keep the image's entrypoint; args replace only its CMD"
    assert args[:len(image["command"])] == image["command"], "args must start with the Dockerfile's CMD"
    assert args.count("--port") == 1 and int(args[args.index("--port") + 1]) == image["port"]
    assert [p["containerPort"] for p in container["ports"]] == [image["port"]]
    assert pod["securityContext"]["runAsUser"] == image["user"]
    assert pod["securityContext"]["runAsGroup"] == image["group"]
    checkpoint = Path(image["env"]["EMBCAP_CHECKPOINT"])
    models = next(m for m in container["volumeMounts"] if m["name"] == "models")
    assert Path(models["mountPath"]) in checkpoint.parents, "EMBCAP_CHECKPOINT must lie in the models mount"
    assert Path(models["mountPath"]) == image["workdir"] / "models"


def test_triton_metrics_port_is_free():
    """The extra --metrics-port (Triton's metrics, appended to /metrics) must not clash."""
    args = server_container(one(render(DEPLOY / "base"), "Deployment"))["args"]
    metrics_port = int(args[args.index("--metrics-port") + 1])
    defaults = parse_args([])
    assert metrics_port not in (image_facts()["port"], defaults.grpc_port)


def test_mirrors_compose_sandbox(objects):
    """docker-compose.yml is the evaluator's sandbox: same tmpfs folders and sizes, shm, cache env."""
    service = compose_service()
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(deployment)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    wanted = {entry.split(":")[0]: dict(o.partition("=")[::2] for o in entry.split(":")[1].split(","))
              for entry in service["tmpfs"]}
    wanted["/dev/shm"] = {"size": service["shm_size"]}
    for path, options in wanted.items():
        assert path in mounts, f"{path} is a tmpfs in docker-compose.yml but not mounted in the pod"
        empty_dir = mounts[path].get("emptyDir")
        assert empty_dir and empty_dir.get("medium") == "Memory", f"{path}: not a memory-backed emptyDir"
        assert to_bytes(empty_dir["sizeLimit"]) == to_bytes(options["size"]), path
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    for name, value in service["environment"].items():
        if name == "CUDA_VISIBLE_DEVICES":
            continue  # the device plugin gives the pod its GPU(s); a fixed index would be wrong
        assert env.get(name) == value, f"{name}: docker-compose.yml has {value!r}, the pod {env.get(name)!r}"
    compose_models = next(v for v in service["volumes"] if v["target"] == "/app/models")
    assert compose_models["read_only"]
    assert "/app/models" in mounts


def test_security_context(objects):
    """The evaluator's rules, which also meet Pod Security "restricted" (the namespace enforces it)."""
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(deployment)
    effective = {**pod["securityContext"], **container["securityContext"]}
    assert effective["runAsNonRoot"] is True and effective["runAsUser"] != 0
    assert effective["readOnlyRootFilesystem"] is True
    assert effective["allowPrivilegeEscalation"] is False
    assert effective["capabilities"] == {"drop": ["ALL"]}
    assert effective["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost")
    assert not effective.get("privileged")
    assert not any(pod.get(f"host{ns}") for ns in ("Network", "PID", "IPC"))
    assert not any("hostPort" in p for p in container["ports"])
    for volume in pod["volumes"]:
        kinds = set(volume) - {"name"}
        assert kinds <= RESTRICTED_VOLUMES, f"volume {volume['name']}: {kinds} not allowed under 'restricted'"
    namespace = one(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert deployment["metadata"]["namespace"] == namespace["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False


def test_models_read_only(objects):
    deployment = one(objects, "Deployment")
    container = server_container(deployment)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/app/models")
    assert mount["readOnly"] is True
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    claim = volume["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    claims = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}
    pvc = claims[claim["claimName"]]
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]


def test_gpu_requested(objects):
    resources = server_container(one(objects, "Deployment"))["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] >= 1


def test_service_links_off(objects):
    """Service links would inject EMBCAP_PORT=tcp://IP:8000 for the Service named embcap;
    server.py reads $EMBCAP_PORT as its port's default and exits with a ValueError."""
    assert any(o["metadata"]["name"] == "embcap" for o in objects if o["kind"] == "Service")
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_probes(objects):
    image = image_facts()
    container = server_container(one(objects, "Deployment"))
    readiness, startup, liveness = (container[f"{k}Probe"] for k in ("readiness", "startup", "liveness"))
    for probe in (readiness, startup, liveness):
        assert named_port(container, probe["httpGet"]["port"]) == image["port"]
    assert readiness["httpGet"]["path"] == HEALTH_PATHS[0]
    assert startup["httpGet"]["path"] == HEALTH_PATHS[0]
    assert liveness["httpGet"]["path"] not in HEALTH_PATHS, "health is 503 while loading: liveness would kill it"
    assert readiness["timeoutSeconds"] > GatewaySettings().health_timeout_s
    # The startup probe outlasts tritonserver's own load timeout plus the export before it.
    defaults = parse_args([])
    assert probe_budget_s(startup) >= defaults.ready_timeout + 300
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["progressDeadlineSeconds"] > probe_budget_s(startup)


def test_probe_paths_answer_as_assumed():
    """The real gateway: health 503 while loading and 200 once serving; liveness 200 throughout."""
    container = server_container(one(render(DEPLOY / "base"), "Deployment"))
    health, live = container["readinessProbe"]["httpGet"]["path"], container["livenessProbe"]["httpGet"]["path"]
    loading = {"problem": "starting: loading models in tritonserver"}

    class Serving:
        async def readiness(self):
            return True, None

        async def close(self):
            pass

    with TestClient(create_app(status_source=lambda: loading["problem"])) as client:
        assert client.get(health).status_code == 503
        assert client.get(live).status_code == 200
        client.app.state.readiness.captioner = Serving()
        loading["problem"] = None
        assert client.get(health).status_code == 200
        assert client.get(live).status_code == 200


def test_graceful_termination(objects):
    """The grace period covers preStop, the gateway's drain and tritonserver's stop."""
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = server_container(one(objects, "Deployment"))
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    triton = TritonOptions(model_repository=Path("."))
    needed = int(command[1]) + parse_args([]).graceful_timeout + triton.exit_timeout_s + KILL_GRACE_S
    assert pod["terminationGracePeriodSeconds"] > needed


def test_service_and_pdb_select_the_pods(objects):
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = server_container(deployment)
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert named_port(container, port["targetPort"]) == image_facts()["port"] == port["port"]
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1 and "minAvailable" not in pdb["spec"]


def test_scrape_annotations(objects):
    """The pod asks to be scraped where the gateway serves its metrics."""
    template = one(objects, "Deployment")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == image_facts()["port"]
    routes = {route.path for route in create_app().routes}
    assert annotations["prometheus.io/path"] in routes


# --- autoscaling and monitoring --------------------------------------------------------------


def monitoring_file(key: str) -> dict:
    configmap = next(o for o in render(MONITORING) if o["kind"] == "ConfigMap" and key in o["data"])
    return yaml.safe_load(configmap["data"][key])


def test_hpa_targets_deployment_on_gateway_metric():
    in_flight = GatewayMetrics().in_flight.describe()[0]
    assert in_flight.type == "gauge"
    rules = monitoring_file("config.yaml")["rules"]
    for folder in SERVING:
        objects = render(folder)
        deployment = one(objects, "Deployment")
        hpas = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
        if folder.name == "single-gpu":
            assert not hpas, "one GPU: nothing to scale to"
            assert deployment["spec"]["strategy"]["type"] == "Recreate", "no second GPU for a surge pod"
            continue
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
        (hpa,) = hpas
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"], target["apiVersion"]) == (
            "Deployment", deployment["metadata"]["name"], deployment["apiVersion"])
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
        served = [r for r in rules if r["name"]["as"] == metric["pods"]["metric"]["name"]]
        assert served, "no adapter rule serves the HPA's metric"
        assert served[0]["seriesQuery"].startswith(in_flight.name + "{")
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert one(render(DEPLOY / "overlays" / "cluster"), "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2


def test_scrape_config_finds_the_pods():
    """The scrape job keeps exactly the pods the Deployment labels and annotates, in their
    namespace, and sets the namespace/pod labels the adapter rules map to objects."""
    base = render(DEPLOY / "base")
    deployment = one(base, "Deployment")
    namespace = deployment["metadata"]["namespace"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    (job,) = monitoring_file("embcap.yaml")["scrape_configs"]
    (discovery,) = job["kubernetes_sd_configs"]
    assert discovery["role"] == "pod" and discovery["namespaces"]["names"] == [namespace]
    meta = {}
    for key, value in labels.items():
        meta["__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
    for key, value in annotations.items():
        meta["__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
    meta.update({"__address__": "10.1.2.3", "__meta_kubernetes_namespace": namespace,
                 "__meta_kubernetes_pod_name": "embcap-abc", "__meta_kubernetes_pod_node_name": "gpu-1",
                 "__metrics_path__": "/metrics"})
    target = dict(meta)
    for rule in job["relabel_configs"]:  # Prometheus's relabelling, for keep and replace
        value = ";".join(target.get(s, "") for s in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if rule["action"] == "keep":
            assert match, f"the scrape job drops the pod at {rule['source_labels']}"
        elif match:
            target[rule["target_label"]] = match.expand(rule.get("replacement", "$1").replace("$", "\\"))
    assert target["__address__"] == f"10.1.2.3:{image_facts()['port']}"
    assert target["__metrics_path__"] == annotations["prometheus.io/path"]
    rules = monitoring_file("config.yaml")["rules"]
    for rule in rules:
        assert set(rule["resources"]["overrides"]) <= set(target), "the adapter maps labels the job never sets"
    role = next(o for o in render(MONITORING) if o["kind"] == "Role")
    assert role["metadata"]["namespace"] == namespace
