"""The cluster configs (cluster/) checked without a cluster: they cannot be applied here, so every fact they rely on
is checked statically — Ray's own launcher schema, Kubernetes schemas, deitlab's spec loaders, the versions pinned in
pyproject.toml, no literal secret anywhere, and every `deitlab …` command in the docs parsed by the real CLI."""
from __future__ import annotations

import base64
import contextlib
import copy
import fnmatch
import re
import shlex
from pathlib import Path
from typing import Annotated, Optional

import cli_commands
import pytest
import tomllib
import typer
import typer.main
import yaml
from cli_commands import CommandError, check, check_args, commands_in_file, commands_in_text
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"
LAUNCHER = CLUSTER / "aws" / "cluster.yaml"
KUBERAY = CLUSTER / "kuberay"
GPU = "nvidia.com/gpu"


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def yaml_files() -> list[Path]:
    return sorted(p for d in (CLUSTER, ROOT / "experiments") for p in d.rglob("*") if p.suffix in (".yaml", ".yml"))


# ---------------------------------------------------------------------------------------------- pyproject facts
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
VERSION = PYPROJECT["version"]
REQUIREMENTS = {r.name: r for r in map(Requirement, PYPROJECT["dependencies"])}


def allowed(package: str, version: str) -> bool:
    return Version(version) in REQUIREMENTS[package].specifier


# --------------------------------------------------------------------------------------------------- Dockerfile
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined, comments dropped and ARG defaults substituted."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    defaults: dict[str, str] = {}
    out = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, rest = line.strip().partition(" ")
        rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m[1] or m[2], m[0]), rest.strip())
        if instruction.upper() == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name] = value.strip('"')
        out.append((instruction.upper(), rest))
    return out


def pip_installs() -> list[list[str]]:
    """The arguments of each `pip install` in a RUN (options included)."""
    found = []
    for instruction, rest in dockerfile():
        if instruction == "RUN":
            for segment in re.split(r"&&|\|\||;", rest):
                words = shlex.split(segment)
                at = next((i for i in range(len(words) - 1) if words[i].endswith("pip") and words[i + 1] == "install"),
                          None)
                if at is not None:
                    found.append(words[at + 2:])
    return found


def docker_pins() -> dict[str, str]:
    """name -> version of every `name[extras]==version` that a RUN pip-installs."""
    pins = {}
    for words in pip_installs():
        for word in words:
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([\w.]+)", word)
            if match:
                pins[match[1].lower()] = match[3]
    return pins


def base_image() -> str:
    return next(rest.split()[0] for instruction, rest in dockerfile() if instruction == "FROM")


def labels() -> dict[str, str]:
    found = {}
    for instruction, rest in dockerfile():
        if instruction == "LABEL":
            found.update(dict(word.split("=", 1) for word in shlex.split(rest)))
    return found


IMAGE_NAME = labels().get("org.opencontainers.image.title", "")


def is_deitlab_image(image: str) -> bool:
    """REGISTRY/…/deitlab:<pyproject version>: the image built from cluster/docker/Dockerfile."""
    name, _, tag = image.rpartition(":")
    return name.rsplit("/", 1)[-1] == IMAGE_NAME and tag == VERSION


def test_dockerfile_base_image_is_a_tagged_cuda_image():
    image = base_image()
    name, _, tag = image.partition(":")
    assert tag and tag != "latest", f"FROM {image}: pin a tag"
    cuda = (name == "nvidia/cuda" and re.search(r"(runtime|devel|cudnn)", tag)) or \
        (name in ("rayproject/ray", "rayproject/ray-ml") and re.search(r"-(cu\d+|gpu)\b", tag))
    assert cuda, f"FROM {image}: expected an NVIDIA CUDA image or a Ray GPU (-cuXXX) image"
    runs = [rest for instruction, rest in dockerfile() if instruction == "RUN"]
    assert "py311" in tag or any("python3.11" in rest for rest in runs), f"FROM {image}: expected Python 3.11"
    if name.startswith("rayproject/"):  # Ray's images carry their Ray version: the one installed on top
        assert tag.split("-")[0] == docker_pins()["ray"], f"FROM {image}: its Ray differs from the pip pin"


def test_dockerfile_runs_as_a_non_root_user():
    steps = dockerfile()
    users = [i for i, (instruction, _) in enumerate(steps) if instruction == "USER"]
    assert users, "no USER: the image would run as root"
    final = steps[users[-1]][1]
    uid = final.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {final}: a numeric, non-zero uid (runAsNonRoot verifies only those)"
    root = [i for i in users if steps[i][1].split(":")[0] in ("root", "0")]
    assert not root or users[-1] > max(root), "the image ends as root"
    workdir = [rest for instruction, rest in steps if instruction == "WORKDIR"][-1]
    assert workdir.startswith("/home/"), f"WORKDIR {workdir}: expected the user's home"


def test_dockerfile_installs_this_repository_with_pinned_ray_and_mlflow():
    steps = dockerfile()
    copies = {}
    for instruction, rest in steps:
        if instruction == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            copies.update({src: words[-1] for src in words[:-1]})
    assert {"pyproject.toml", "README.md", "platform"} <= set(copies), f"COPY the package sources: {copies}"
    source = copies["pyproject.toml"].rstrip("/")
    assert copies["platform"].rstrip("/") == f"{source}/platform", "platform/ must sit beside pyproject.toml"
    installed = {re.sub(r"\[[^\]]*\]$", "", w).rstrip("/") for words in pip_installs() for w in words}
    assert source in installed, f"no `pip install {source}`: the image would not contain this repository's deitlab"
    assert not any({"-e", "--editable"} & set(words) for words in pip_installs()), \
        "an editable install breaks once the sources are removed"
    pins = docker_pins()
    for package in ("ray", "mlflow"):
        assert package in pins, f"{package} is not pinned (name==version) in the Dockerfile"
    assert labels().get("org.opencontainers.image.version") == VERSION
    assert IMAGE_NAME == "deitlab"


def test_dockerignore_keeps_the_build_context_to_the_package():
    """BuildKit reads <Dockerfile>.dockerignore; patterns apply in order, the last match wins, ! re-includes."""
    patterns = [line.strip() for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def excluded(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        verdict = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            body = pattern.lstrip("!").strip("/")
            if any(fnmatch.fnmatchcase(p, body) or fnmatch.fnmatchcase(p, body.removeprefix("**/"))
                   for p in prefixes):
                verdict = not negate
        return verdict

    for path in (".venv/bin/python", ".git/HEAD", "test-artifacts/ui.png", "tests/unit/test_spec.py",
                 "deitlab-work/mlflow.db", "mlflow.db", ".pytest_cache/v", "platform/deitlab/__pycache__/cli.pyc",
                 "cluster/aws/cluster.yaml", "experiments/tau_lambda.yaml"):
        assert excluded(path), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "README.md", "platform/deitlab/cli.py",
                 "platform/deitlab/specs/quickstart_sweep.yaml"):
        assert not excluded(path), f"{path} is needed by the image's build but ignored"


# ------------------------------------------------------------------------------------------- cluster launcher
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text(encoding="utf-8"))


def ray_start_segments(commands: list[str]) -> list[list[str]]:
    """The words of each `ray start` simple command, with the VAR=value prefixes in front of it."""
    found = []
    for command in commands:
        for segment in re.split(r"&&|\|\||;", command):
            words = shlex.split(segment)
            if any(words[i:i + 2] == ["ray", "start"] for i in range(len(words))):
                found.append(words)
    return found


def option(words: list[str], name: str) -> str | None:
    for i, word in enumerate(words):
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
        if word == name and i + 1 < len(words):
            return words[i + 1]
    return None


def test_launcher_config_passes_rays_own_validation():
    # What `ray up` does before it talks to AWS: fill in the provider's defaults, then the JSON schema and checks.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher())))


def test_launcher_head_is_cpu_only_and_gpu_workers_scale_from_zero():
    config = launcher()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu_family = re.compile(r"(g\d|p\d)")  # AWS GPU instance families: g4dn, g5, g6, p4d, p5…
    assert not gpu_family.match(head["node_config"]["InstanceType"]), "the head is a GPU instance"
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0, \
        "head resources: CPU 0 (no trial lands on the head) and no GPU"
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]
               and gpu_family.match(t["node_config"]["InstanceType"])}
    assert workers, "no GPU worker node type"
    for name, worker in workers.items():
        assert worker.get("min_workers", 0) == 0, f"{name}: min_workers 0, so an idle cluster holds no GPU"
        assert worker.get("max_workers", 0) > 0, f"{name}: max_workers > 0, or it never starts"
        assert config["max_workers"] >= worker["max_workers"]
        assert worker["resources"].get("GPU", 1) >= 1
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert config.get(key) == [], f"{key}: the image has everything; the launcher's default would pip-install Ray"


def test_launcher_runs_token_auth_and_a_loopback_dashboard():
    config = launcher()
    head = ray_start_segments(config["head_start_ray_commands"])
    workers = ray_start_segments(config["worker_start_ray_commands"])
    assert head and workers
    for words in head + workers:
        assert "RAY_AUTH_MODE=token" in words[:words.index("ray")], f"ray start without RAY_AUTH_MODE=token: {words}"
    assert all("--head" in words for words in head)
    for words in head:
        assert option(words, "--dashboard-host") == "127.0.0.1", "the dashboard must listen on loopback only"
    assert "0.0.0.0" not in LAUNCHER.read_text(), "something listens on all interfaces"
    # The token comes from a file generated outside the repository and mounted at the path Ray reads.
    mounts = config["file_mounts"]
    token = [remote for remote in mounts if remote.endswith(".ray/auth_token")]
    assert token, "no file mount for ~/.ray/auth_token"
    local = Path(mounts[token[0]]).expanduser()
    assert ROOT not in local.parents, "the token file must live outside the repository"
    for words in head + workers:
        path = next((w.split("=", 1)[1] for w in words if w.startswith("RAY_AUTH_TOKEN_PATH=")), None)
        assert path is None or path.replace("$HOME", "~") == token[0], f"RAY_AUTH_TOKEN_PATH={path} is not mounted"
    assert not re.search(r"RAY_AUTH_TOKEN=", LAUNCHER.read_text()), "a literal token in the config"


def test_launcher_uses_the_deitlab_image():
    docker = launcher()["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    assert images and all(is_deitlab_image(i) for i in images), f"{images}: expected …/{IMAGE_NAME}:{VERSION}"


# --------------------------------------------------------------------------------------------------- Kubernetes
def manifests() -> list[tuple[str, dict]]:
    """(file#index, document) of every Kubernetes object under cluster/."""
    found = []
    for path in yaml_files():
        if CLUSTER not in path.parents:
            continue
        for i, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if isinstance(doc, dict) and ("apiVersion" in doc or "kind" in doc):
                found.append((f"{rel(path)}#{i}", doc))
    return found


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in manifests() if doc.get("kind") == kind]


def the(kind: str) -> dict:
    docs = of_kind(kind)
    assert len(docs) == 1, f"expected one {kind} under cluster/, found {len(docs)}"
    return docs[0]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    return [("RayCluster", the("RayCluster")["spec"]), ("RayJob", the("RayJob")["spec"]["rayClusterSpec"])]


def pod_templates(doc: dict) -> list[dict]:
    """Every pod template of a workload manifest (RayCluster, RayJob, Deployment, …)."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob":
        spec = spec.get("rayClusterSpec") or {}
    templates = [spec["template"]] if isinstance(spec.get("template"), dict) else []
    if "headGroupSpec" in spec:
        templates.append(spec["headGroupSpec"]["template"])
        templates += [group["template"] for group in spec.get("workerGroupSpecs", [])]
    return templates


def containers(doc: dict) -> list[dict]:
    return [c for t in pod_templates(doc) for key in ("containers", "initContainers")
            for c in (t.get("spec") or {}).get(key, [])]


CORE_GROUPS = ("v1", "apps/v1", "batch/v1", "networking.k8s.io/v1", "policy/v1", "rbac.authorization.k8s.io/v1",
               "autoscaling/v2")


@pytest.mark.parametrize("where,doc", manifests(), ids=[w for w, _ in manifests()])
def test_manifest_has_api_version_kind_and_name(where, doc):
    assert doc.get("apiVersion") and doc.get("kind"), f"{where}: apiVersion and kind are required"
    assert (doc.get("metadata") or {}).get("name"), f"{where}: metadata.name is required"


def test_core_manifests_match_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (offline Kubernetes JSON schemas) is not installed")
    from kubernetes_validate.utils import latest_version

    def validate(obj: dict, where: str) -> None:
        try:
            kubernetes_validate.validate(obj, latest_version(), strict=True)  # strict: an unknown field is an error
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{where}: {err.message} (at {'.'.join(map(str, err.path))})")

    checked = 0
    for where, doc in manifests():
        if doc["apiVersion"] in CORE_GROUPS:
            validate(doc, where)
            checked += 1
        for template in pod_templates(doc):  # a RayCluster's pods are plain pod templates: the same schema
            validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template},
                     f"{where}, a pod template")
    assert checked >= 3  # the ConfigMap and two Secrets at least


def test_core_manifests_have_their_required_fields():
    """The same facts by hand, for machines without kubernetes-validate."""
    for where, doc in manifests():
        kind = doc["kind"]
        if kind == "ConfigMap":
            data = doc.get("data") or {}
            assert all(isinstance(v, str) for v in data.values()), f"{where}: data values are strings"
        elif kind == "Secret":
            values = {**(doc.get("stringData") or {}), **(doc.get("data") or {})}
            assert values and all(isinstance(v, str) for v in values.values()), f"{where}: string values"
        elif kind == "Deployment":
            selector = doc["spec"]["selector"]["matchLabels"]
            template_labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= template_labels.items(), f"{where}: the selector must match the pod labels"
        elif kind == "Service":
            assert doc["spec"]["ports"] and all("port" in p for p in doc["spec"]["ports"]), f"{where}: ports"
        for container in containers(doc):
            assert container.get("name") and container.get("image"), f"{where}: every container has a name and image"


def test_ray_clusters_have_what_kuberay_requires():
    ray_pin = docker_pins()["ray"]
    for kind, spec in ray_cluster_specs():
        assert spec["rayVersion"] == ray_pin, f"{kind}: rayVersion {spec['rayVersion']} != the image's Ray {ray_pin}"
        assert spec.get("enableInTreeAutoscaling") is True, f"{kind}: autoscaling off"
        assert (spec.get("authOptions") or {}).get("mode") == "token", f"{kind}: token authentication off"
        head = spec["headGroupSpec"]
        params = head["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), f"{kind}: rayStartParams values must be strings"
        assert params.get("num-cpus") == "0", f"{kind}: the head must offer no CPU to trials"
        for container in head["template"]["spec"]["containers"]:
            assert GPU not in str(container.get("resources")), f"{kind}: the head asks for a GPU"
        gpu_groups = [g for g in spec.get("workerGroupSpecs", [])
                      if any(int(c.get("resources", {}).get("limits", {}).get(GPU, 0)) >= 1
                             for c in g["template"]["spec"]["containers"])]
        assert gpu_groups, f"{kind}: no worker group with an {GPU} limit"
        for group in gpu_groups:
            assert group["groupName"] and isinstance(group["rayStartParams"], dict)
            assert all(isinstance(v, str) for v in group["rayStartParams"].values())
            assert group["minReplicas"] == 0 and group["maxReplicas"] > 0, f"{kind}: scale GPU pods from 0 to N"
            assert 0 <= group.get("replicas", 0) <= group["maxReplicas"]
        images = [c["image"] for c in containers({"kind": "RayCluster", "spec": spec})]
        assert all(is_deitlab_image(i) for i in images), f"{kind}: images {images}, expected …/deitlab:{VERSION}"


def test_rayjob_runs_the_sweep_of_the_configmap_on_the_same_cluster_spec():
    job = the("RayJob")
    assert job["spec"]["rayClusterSpec"] == the("RayCluster")["spec"], \
        "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml's spec"
    assert job["spec"].get("shutdownAfterJobFinishes") is True, "the job's GPU cluster would outlive the sweep"
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["deitlab", "sweep", "run"], f"entrypoint: {job['spec']['entrypoint']}"
    check_args(words[1:])  # the real CLI accepts it
    spec_path = Path(words[3])
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])}
    config_maps = {v["name"]: v["configMap"]["name"] for v in head.get("volumes", []) if "configMap" in v}
    served = [config_maps[name] for name, path in mounts.items() if name in config_maps
              and Path(path) == spec_path.parent]
    assert served, f"{spec_path} is not in a ConfigMap volume mounted in the head"
    config_map = next(doc for doc in of_kind("ConfigMap") if doc["metadata"]["name"] == served[0])
    assert spec_path.name in config_map["data"], f"ConfigMap {served[0]} has no key {spec_path.name}"


def configmap_specs() -> list[tuple[str, str, str]]:
    """(ConfigMap name, key, text) of every spec (sweep*.yaml, teacher*.yaml) that a ConfigMap holds."""
    return [(doc["metadata"]["name"], key, text) for doc in of_kind("ConfigMap")
            for key, text in (doc.get("data") or {}).items() if re.match(r"(sweep|teacher).*\.ya?ml$", key)]


def test_configmap_specs_load_with_deitlab(tmp_path):
    from deitlab.spec.loading import load_sweep, load_teacher_training

    assert any(key.startswith("sweep") for _, key, _ in configmap_specs())
    for name, key, text in configmap_specs():
        path = tmp_path / name / key
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        if key.startswith("sweep"):
            sweep = load_sweep(path)  # every trial validated, as `deitlab sweep run` does first
            assert sweep.trial_overrides()
            run = sweep.experiment.run
        else:
            run = load_teacher_training(path).run
        where = f"ConfigMap {name}, {key}"
        assert run.gpus_per_worker >= 1, f"{where}: a GPU cluster's spec asks for a GPU per worker"
        assert run.storage and run.storage.startswith("s3://"), f"{where}: run.storage must be s3:// (shared by pods)"
        assert run.artifacts and run.artifacts.startswith("s3://"), f"{where}: run.artifacts must be s3://"
        assert re.match(r"http://mlflow\.[a-z0-9-]+\.svc(\.cluster\.local)?:5000$", run.tracking_uri or ""), \
            f"{where}: run.tracking_uri should be the MLflow Service, got {run.tracking_uri}"


# ------------------------------------------------------------------------------------------------------ secrets
SECRET_NAME = re.compile(r"(?i)(password|passwd|secret|token|access_key_id|secret_access_key|api_key|private_key"
                         r"|username)$")
PLACEHOLDER = re.compile(r"(REPLACE_ME\w*|<[^>]*>|\$.*|)")
LITERAL_SECRETS = {
    "an AWS access key id": re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "a GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
    "a JSON web token": re.compile(r"\beyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]{8,}"),
    "a password in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:(?!\$|REPLACE_ME|<)[^/\s@]+@"),
    "an AWS-secret-shaped string": re.compile(r"(?<![\w/+])(?=[\w/+]*\d)(?=[\w/+]*[a-z])(?=[\w/+]*[A-Z])"
                                              r"[A-Za-z0-9/+]{40}(?![\w/+=])"),
}
# A secret-named key (a name, not the tail of a path or of another word: not ~/.ray/auth_token, not NOPASSWD) with
# a value: the value must be a placeholder, a reference ($VAR, $(command)) or a flag (distillation.token: true).
ASSIGNED_SECRET = re.compile(r"(?i)(?<![\w/.-])((?:[a-z0-9]+[_.-])*(?:password|passwd|secret|token|access_key_id"
                             r"|secret_access_key|api_key))[\"']?\s*(?:=|:\s)\s*([^\s,}]*)")
NOT_A_SECRET = re.compile(r"(?i)true|false|yes|no|null|none")


def secret_findings(text: str) -> list[str]:
    """What in `text` looks like a literal secret: key-shaped strings, or a secret-named key with a real value."""
    found = [what for what, pattern in LITERAL_SECRETS.items() if pattern.search(text)]
    for key, value in ASSIGNED_SECRET.findall(text):
        value = value.strip("\"'")
        if not (PLACEHOLDER.fullmatch(value) or NOT_A_SECRET.fullmatch(value)):
            found.append(f"{key} = {value!r}")
    return found


def test_the_secret_scan_finds_planted_secrets():
    assert secret_findings("password: hunter2") and secret_findings('AWS_SECRET_ACCESS_KEY="abc123"')
    assert secret_findings("key AKIAABCDEFGHIJKLMNOP here")
    assert secret_findings("aws_secret=abc") and secret_findings("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert secret_findings("--from-literal=password=hunter2")
    assert secret_findings("postgresql://mlflow:hunter2@db:5432/mlflow")
    assert not secret_findings("postgresql://mlflow:$(PGPASSWORD)@db/mlflow http://mlflow.deitlab.svc:5000")
    assert not secret_findings("password: REPLACE_ME\nRAY_AUTH_TOKEN=\"$(kubectl get secret x)\"\n"
                               "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token\nkey: password\nmode: token\n"
                               '"~/.ray/auth_token": "~/.ray/auth_token"\nray ALL=NOPASSWD: ALL\ntoken: true')


@pytest.mark.parametrize("path", sorted(p for p in CLUSTER.rglob("*") if p.is_file()), ids=rel)
def test_no_literal_secret_in_cluster_files(path):
    findings = secret_findings(path.read_text(encoding="utf-8"))
    assert not findings, f"{rel(path)}: {findings} — credentials come from Secrets, instance profiles or the" \
                         " environment, never from a file"


def test_secrets_hold_placeholders_only():
    secrets = of_kind("Secret")
    assert secrets
    for doc in secrets:
        values = dict(doc.get("stringData") or {})
        values.update({k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()})
        for key, value in values.items():
            assert PLACEHOLDER.fullmatch(value), f"Secret {doc['metadata']['name']}: {key} holds a real value"


def test_credentials_reach_pods_only_through_secret_references():
    secrets = {doc["metadata"]["name"]: {**(doc.get("stringData") or {}), **(doc.get("data") or {})}
               for doc in of_kind("Secret")}
    config_maps = {doc["metadata"]["name"]: doc.get("data") or {} for doc in of_kind("ConfigMap")}
    references = 0
    for where, doc in manifests():
        for container in containers(doc):
            for env in container.get("env", []):
                source = env.get("valueFrom") or {}
                if SECRET_NAME.search(env["name"]):
                    assert "secretKeyRef" in source, f"{where}: {env['name']} must come from a secretKeyRef"
                if "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    assert ref["key"] in secrets.get(ref["name"], {}), \
                        f"{where}: {env['name']} reads {ref['name']}/{ref['key']}, which no Secret under cluster/" \
                        " declares (add it, with placeholders, to secrets.example.yaml)"
                    references += 1
            for env_from in container.get("envFrom", []):
                if "secretRef" in env_from:
                    assert env_from["secretRef"]["name"] in secrets, f"{where}: unknown Secret {env_from}"
                    references += 1
                if "configMapRef" in env_from:
                    keys = config_maps.get(env_from["configMapRef"]["name"], {})
                    assert not [k for k in keys if SECRET_NAME.search(k)], f"{where}: a secret in a ConfigMap"
    assert references, "no pod reads a Secret: where do the S3 and MLflow credentials come from?"


# ----------------------------------------------------------------------------------------------------- versions
def test_versions_match_pyproject():
    pins = docker_pins()
    assert allowed("ray", pins["ray"]), f"Dockerfile ray=={pins['ray']} outside pyproject's {REQUIREMENTS['ray']}"
    assert allowed("mlflow", pins["mlflow"]), f"Dockerfile mlflow=={pins['mlflow']} outside {REQUIREMENTS['mlflow']}"
    for package, version in pins.items():
        if package in REQUIREMENTS:
            assert allowed(package, version), f"Dockerfile {package}=={version} outside {REQUIREMENTS[package]}"
    for kind, spec in ray_cluster_specs():
        assert allowed("ray", spec["rayVersion"]), f"{kind} rayVersion {spec['rayVersion']} outside pyproject"
    assert labels()["org.opencontainers.image.version"] == VERSION
    images = [launcher()["docker"]["image"]] + [c["image"] for _, doc in manifests() for c in containers(doc)
                                                if doc["kind"] in ("RayCluster", "RayJob")]
    for image in images:
        assert image.rpartition(":")[2] == VERSION, f"image {image}: tag it with the package version {VERSION}"


@pytest.mark.parametrize("path", yaml_files(), ids=rel)
def test_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert any(doc is not None for doc in docs), f"{rel(path)}: no document"


# ------------------------------------------------------------------------------------------ deitlab commands
DOCUMENTED = [ROOT / "README.md"] + sorted(p for p in CLUSTER.rglob("*") if p.is_file())


@pytest.mark.parametrize("path", DOCUMENTED, ids=rel)
def test_documented_commands_are_real(path):
    problems = []
    for command in commands_in_file(path, rel(path)):
        try:
            check(command)
        except CommandError as err:
            problems.append(f"{command.source}: `{command.text}`: {err}")
    assert not problems, "commands the CLI rejects:\n" + "\n".join(problems)


def test_commands_are_found_where_they_are_written():
    """The extraction itself: a checker that finds nothing passes everything."""
    def found(path: Path) -> list[str]:
        return [" ".join(c.args) for c in commands_in_file(path, rel(path))]

    assert len(found(ROOT / "README.md")) >= 20
    assert "sweep run /config/sweep.yaml" in found(KUBERAY / "rayjob.yaml")
    assert "--help" in found(DOCKERFILE)
    readme = found(CLUSTER / "README.md")
    assert len(readme) >= 8 and "teacher train /config/teacher.yaml" in readme


def test_the_checker_rejects_wrong_commands():
    wrong = {
        "deitlab sweep run x.yaml --no-such-flag": "No such option: --no-such-flag",
        "deitlab sweeps run x": "No such command 'sweeps'",
        "deitlab sweep run": "Missing argument",
        "deitlab sweep": "missing a command",
        "deitlab train SPEC --workers many": "--workers",
        "deitlab bench step --pack lots": "argument --pack",
        "deitlab bench step --no-such-flag": "unrecognized arguments",
    }
    for text, message in wrong.items():
        [command] = commands_in_text(text, "test")
        with pytest.raises(CommandError, match=re.escape(message)):
            check(command)


def test_the_checker_reads_doc_notation(tmp_path):
    markdown = ("| `deitlab report SWEEP [--format table\\|json] [--out DIR]` | the `deitlab sweep plan` of it |\n"
                "```\nFOO=1 .venv/bin/deitlab sweep run x.yaml \\\n  --set 'seeds=[0,1]' --workdir \"$W\" 2>/dev/null"
                " && kubectl exec pod -- deitlab teacher train <spec>\n```\n")
    path = tmp_path / "notation.md"
    path.write_text(markdown, encoding="utf-8")
    commands = cli_commands.commands_in_markdown(path, "notation.md")
    assert [(c.args, c.mention) for c in commands] == [
        (("report", "1", "--format", "table", "--out", "1"), True),
        (("sweep", "plan"), True),  # a mention: only the subcommands must exist
        (("sweep", "run", "x.yaml", "--set", "seeds=[0,1]", "--workdir", "1"), False),
        (("teacher", "train", "1"), False),
    ]
    for command in commands:
        check(command)
    assert commands_in_text("the deitlab image; name: deitlab", "prose") == []  # names, not commands


def test_the_checker_parses_paths_that_do_not_exist(monkeypatch):
    """A parameter declared with exists=True would reject every documented placeholder path; the check relaxes it."""
    app = typer.Typer()

    @app.command()
    def run(spec: Annotated[Path, typer.Argument(exists=True)],
            out: Annotated[Optional[Path], typer.Option(exists=True)] = None):
        pass

    @app.command()
    def other():
        pass

    root = typer.main.get_command(app)
    check_args(["run", "/no/such/spec.yaml", "--out", "/no/such/dir"], root=root)
    with pytest.raises(CommandError, match="Missing argument"):
        check_args(["run"], root=root)
    monkeypatch.setattr(cli_commands, "_paths_need_not_exist", lambda command: contextlib.nullcontext())
    with pytest.raises(CommandError, match="does not exist"):  # what the relaxation prevents
        check_args(["run", "/no/such/spec.yaml"], root=root)
