"""The Kubernetes manifests in k8s/, checked offline: they render with kustomize, validate against the Kubernetes
and KubeRay schemas, and follow the deployment's policies. Each policy is also shown to catch a broken manifest.

The tools come with the project's test extra (`pip install -e ".[test]"`); without them the tests fail. The KubeRay
CRD schemas come from no registry ($ORCH_KUBERAY_SCHEMAS, else ../shared/k8s-schemas/kuberay/ beside the
repository): without them only the KubeRay checks skip, saying how to enable them; under CI=true they fail.
"""

from __future__ import annotations

import re
import subprocess
import textwrap

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import k8s_checks as kc

OVERLAYS = kc.OVERLAYS
POLICIES = {
    "resources": kc.check_resources,
    "images-pinned": kc.check_images_pinned,
    "ray-version": kc.check_ray_versions,
    "ray-auth": kc.check_ray_auth,
    "mlflow-server": kc.check_mlflow_server,
    "no-external-exposure": kc.check_no_external_exposure,
    "dev-shm": kc.check_shm,
    "rayjob": kc.check_rayjob,
    "network-policies": kc.check_network_policies,
}


# ------------------------------------------------------------------------------------------------ the tools
def test_kubectl_with_kustomize_v5_is_installed():
    out = subprocess.run([kc.kubectl(), "version", "--client"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    m = re.search(r"Kustomize Version: v(\d+)\.", out.stdout)
    assert m and int(m.group(1)) >= 5, out.stdout


def test_schema_packages_cover_the_target_kubernetes_versions():
    from kubernetes_validate.utils import all_versions

    versions = set(all_versions())
    for v in kc.K8S_VERSIONS:
        assert v in versions, f"kubernetes-validate has no schemas for {v} (has {sorted(versions)[-3:]}...)"


def test_kuberay_crd_schemas_are_present():
    # CI clones the repository with shared/ beside it (and sets CI=true): there a missing folder fails.
    folder = kc.kuberay_schemas()
    for kind, name in kc.CRD_FILES.items():
        assert (folder / name).is_file(), name
        kc.crd_validator(kind)


# ------------------------------------------------------------------------------------- rendering and schemas
EXPECTED = {
    "Namespace": 1, "PersistentVolumeClaim": 2, "Service": 2, "StatefulSet": 1, "ConfigMap": 1,
    "Deployment": 1, "RayCluster": 1, "RayJob": 1, "NetworkPolicy": 5,
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_deployment(overlay):
    docs = kc.rendered(overlay)
    kinds = {}
    for d in docs:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    assert kinds == EXPECTED
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "orch", f"{d['kind']}/{d['metadata']['name']}"
    # credentials never ship with the overlays (k8s/README.md creates them; secrets-example/ is a template)
    assert not kc.by_kind(docs, "Secret")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_core_objects_match_the_kubernetes_schemas(overlay):
    docs = [d for d in kc.rendered(overlay) if not kc.is_kuberay(d)]
    assert docs
    errors = [e for d in docs for e in kc.validate(d)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_kuberay_objects_match_their_crds(overlay):
    kc.kuberay_schemas()  # skips (fails under CI=true) without the CRD schemas
    docs = [d for d in kc.rendered(overlay) if kc.is_kuberay(d)]
    assert {d["kind"] for d in docs} == set(kc.CRD_FILES)
    errors = [e for d in docs for e in kc.validate(d)]
    assert not errors, "\n".join(errors)


def test_secrets_example_covers_every_reference_with_placeholders_only():
    secrets = kc.rendered("secrets-example")
    errors = [e for d in secrets for e in kc.validate(d)]
    assert not errors, "\n".join(errors)
    keys = {(s["metadata"]["name"], k) for s in secrets for k in (s.get("data") or {})}
    for overlay in OVERLAYS:
        missing = kc.secret_references(kc.rendered(overlay)) - keys
        assert not missing, f"{overlay} reads Secret keys the example does not define: {sorted(missing)}"
    import base64

    for s in secrets:
        assert s["metadata"].get("namespace") == "orch"
        for key, value in (s.get("data") or {}).items():
            if re.search(r"password|token|secret", key, re.I):
                assert "CHANGE-ME" in base64.b64decode(value).decode(), f"{s['metadata']['name']}/{key}"


# ------------------------------------------------------------------------------------------------- policies
@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policy(overlay, policy):
    violations = POLICIES[policy](kc.rendered(overlay))
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_only_in_the_gpu_overlay(overlay):
    violations = kc.check_gpu(kc.rendered(overlay), gpu=overlay == "gpu")
    assert not violations, "\n".join(violations)


def test_ray_version_agrees_with_the_repo_pins_and_the_dockerfile():
    pins = kc.repo_ray_pins()
    assert "pyproject.toml" in pins, "pyproject.toml lists no ray dependency"
    assert Version(kc.RAY_VERSION) in SpecifierSet(pins["pyproject.toml"]), pins
    if ".ci/run" in pins:  # the exact install-path pin
        assert pins[".ci/run"] == kc.RAY_VERSION, pins
    df = kc.dockerfile_args()
    assert df.get("RAY_VERSION") == kc.RAY_VERSION, df
    for overlay in OVERLAYS:
        assert not kc.check_ray_versions(kc.rendered(overlay), kc.RAY_VERSION)


def test_dockerfile_builds_cpu_or_gpu_from_the_ray_image():
    df = kc.dockerfile_args()
    assert df.get("PYTHON_TAG") == "py311" and df.get("DEVICE") == "cpu", df
    froms = df["FROM"]
    assert "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG} AS base-cpu" in froms, froms
    assert "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu AS base-gpu" in froms, froms
    assert froms[-1] == "base-${DEVICE}", froms
    run = "\n".join(df["RUN"])
    assert "download.pytorch.org/whl/cpu" in run and "download.pytorch.org/whl/${TORCH_CUDA}" in run
    assert re.search(r"pip install [^\n]*-c /tmp/constraints.txt \. ", run), "the project is not pip-installed"
    assert "psycopg2-binary" in run and "mlflow[auth]" in run
    assert df.get("TORCH_VERSION") and df.get("PSYCOPG2_VERSION")


# ----------------------------------------------------------------------- the validators reject broken input
BROKEN = textwrap.dedent(
    """\
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: wrong-field}
    spec:
      replica: 2                      # wrong field name (replicas)
      selector: {matchLabels: {app: x}}
      template:
        metadata: {labels: {app: x}}
        spec:
          containers: [{name: c, image: "x:1"}]
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: wrong-type}
    spec:
      replicas: two                   # wrong type
      selector: {matchLabels: {app: x}}
      template:
        metadata: {labels: {app: x}}
        spec:
          containers: [{name: c, image: "x:1"}]
    ---
    apiVersion: ray.io/v1
    kind: RayCluster
    metadata: {name: wrong-field}
    spec:
      rayVersion: "2.60.0"
      headGroupSpec:
        rayStartParam: {}             # wrong field name (rayStartParams)
        template:
          spec:
            containers: [{name: ray-head, image: "x:1"}]
    ---
    apiVersion: ray.io/v1
    kind: RayCluster
    metadata: {name: wrong-type}
    spec:
      rayVersion: "2.60.0"
      headGroupSpec:
        template:
          spec:
            containers: [{name: ray-head, image: "x:1"}]
      workerGroupSpecs:
        - groupName: workers
          replicas: two               # wrong type
          template:
            spec:
              containers: [{name: ray-worker, image: "x:1", resources: {limits: {cpu: [1]}}}]
    """
)

GOOD_CRD = textwrap.dedent(
    """\
    apiVersion: ray.io/v1
    kind: RayCluster
    metadata: {name: defaults-omitted}
    spec:
      headGroupSpec:
        template:
          spec:
            containers: [{name: ray-head, image: "x:1"}]
      workerGroupSpecs:
        - groupName: workers        # minReplicas and maxReplicas are required but defaulted: may be omitted
          template:
            spec:
              containers: [{name: ray-worker, image: "x:1"}]
    """
)


def _render_files(tmp_path, **files):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n"
        + "".join(f"  - {n}\n" for n in files)
    )
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in kc.render(tmp_path)}


def _rejects(docs, expected):
    for name, field in expected.items():
        errors = kc.validate(docs[name])
        assert errors and any(field in e for e in errors), f"{name}: {errors}"


def test_core_validator_rejects_a_broken_manifest(tmp_path):
    docs = _render_files(tmp_path, **{"broken.yaml": BROKEN})
    _rejects(docs, {"Deployment/wrong-field": "replica", "Deployment/wrong-type": "replicas"})


def test_crd_validator_rejects_a_broken_manifest(tmp_path):
    kc.kuberay_schemas()
    docs = _render_files(tmp_path, **{"broken.yaml": BROKEN})
    _rejects(docs, {"RayCluster/wrong-field": "rayStartParam", "RayCluster/wrong-type": "replicas"})
    # the wrong-type RayCluster also nests a wrong type inside the embedded core PodSpec
    assert any("limits.cpu" in e for e in kc.validate(docs["RayCluster/wrong-type"]))


def test_crd_validator_applies_defaulting_and_requires_the_rest(tmp_path):
    kc.kuberay_schemas()
    docs = _render_files(tmp_path, **{"good.yaml": GOOD_CRD})
    good = docs["RayCluster/defaults-omitted"]
    assert kc.validate(good) == []
    del good["spec"]["workerGroupSpecs"][0]["groupName"]  # required, no default
    assert any("groupName" in e for e in kc.validate(good))
    del good["spec"]["headGroupSpec"]
    assert any("headGroupSpec" in e for e in kc.validate(good))


def test_validator_rejects_unknown_kinds():
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert any("no schema" in e for e in kc.validate(widget))


def test_crd_validator_rejects_cel_violations_and_bad_names():
    kc.kuberay_schemas()
    job = kc.one(kc.rendered("cpu"), "RayJob", "orch-train")
    job["spec"]["managedBy"] = "someone-else"  # a CEL rule of the RayJob CRD
    assert any("managedBy" in e or "CEL" in e for e in kc.validate(job))
    cluster = kc.one(kc.rendered("cpu"), "RayCluster", "orch-ray")
    cluster["metadata"]["name"] = "Not_A_Name"
    assert kc.validate(cluster)


def test_a_missing_kubectl_fails_rather_than_skips(monkeypatch, tmp_path):
    monkeypatch.setattr(kc.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception):
        kc.kubectl()


def test_missing_kuberay_schemas_skip_saying_how_to_enable_them(monkeypatch, tmp_path):
    monkeypatch.setattr(kc, "KUBERAY_SCHEMAS", tmp_path / "nowhere")
    monkeypatch.delenv(kc.KUBERAY_SCHEMAS_ENV, raising=False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        kc.crd_validator("RayCluster")
    reason = str(skipped.value)
    assert "\n" not in reason and "ORCH_KUBERAY_SCHEMAS=" in reason and "shared/" in reason, reason


def test_missing_kuberay_schemas_fail_in_ci(monkeypatch, tmp_path):
    monkeypatch.setattr(kc, "KUBERAY_SCHEMAS", tmp_path / "nowhere")
    monkeypatch.delenv(kc.KUBERAY_SCHEMAS_ENV, raising=False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        kc.crd_validator("RayCluster")
    # a folder named explicitly that is not there fails outside CI too
    monkeypatch.delenv("CI")
    monkeypatch.setenv(kc.KUBERAY_SCHEMAS_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(pytest.fail.Exception):
        kc.kuberay_schemas()


TINY_CRD = textwrap.dedent(
    """\
    apiVersion: apiextensions.k8s.io/v1
    kind: CustomResourceDefinition
    metadata: {name: rayclusters.ray.io}
    spec:
      group: ray.io
      names: {kind: RayCluster}
      versions:
        - name: v1
          served: true
          schema:
            openAPIV3Schema:
              type: object
              properties:
                apiVersion: {type: string}
                kind: {type: string}
                metadata: {type: object}
                spec: {type: object, required: [rayVersion], properties: {rayVersion: {type: string}}}
    """
)


def test_kuberay_schemas_folder_from_the_environment(monkeypatch, tmp_path):
    (tmp_path / kc.CRD_FILES["RayCluster"]).write_text(TINY_CRD)
    monkeypatch.setattr(kc, "KUBERAY_SCHEMAS", tmp_path / "nowhere")
    monkeypatch.setenv(kc.KUBERAY_SCHEMAS_ENV, str(tmp_path))
    assert kc.kuberay_schemas() == tmp_path
    ok = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "c"}, "spec": {"rayVersion": "2.60.0"}}
    assert kc.validate(ok) == []
    assert any("rayVersionn" in e for e in kc.validate({**ok, "spec": {"rayVersion": "2.60.0", "rayVersionn": 1}}))


# --------------------------------------------------------------------------- each policy catches a violation
def _job(docs):
    return kc.one(docs, "RayJob", "orch-train")["spec"]


def _job_worker(docs):
    return _job(docs)["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]


def _mlflow(docs):
    return kc.one(docs, "Deployment", "orch-mlflow")["spec"]["template"]["spec"]


def _np(docs, name):
    return kc.one(docs, "NetworkPolicy", name)["spec"]


def _set_arg(docs, prefix, value):
    c = _mlflow(docs)["containers"][0]
    c["args"] = [a for a in c["args"] if not a.startswith(prefix)] + ([value] if value else [])


MUTATIONS = {
    # name: (policy, mutation of the cpu overlay's rendered objects)
    "worker without limits": ("resources", lambda d: _job_worker(d)["containers"][0]["resources"].pop("limits")),
    "submitter without resources": ("resources", lambda d: _job(d)["submitterPodTemplate"]["spec"]["containers"][0].pop("resources")),
    "init container without resources": ("resources", lambda d: _mlflow(d).setdefault("initContainers", []).append({"name": "init", "image": "busybox:1.36"})),
    "limit below request": ("resources", lambda d: _mlflow(d)["containers"][0]["resources"]["limits"].update(memory="512Mi")),
    "image tag latest": ("images-pinned", lambda d: _job_worker(d)["containers"][0].update(image="repo/orchestrator:latest")),
    "image without tag": ("images-pinned", lambda d: kc.one(d, "StatefulSet", "orch-postgres")["spec"]["template"]["spec"]["containers"][0].update(image="postgres")),
    "rayVersion off the pin": ("ray-version", lambda d: kc.one(d, "RayCluster", "orch-ray")["spec"].update(rayVersion="2.59.0")),
    "image of another ray": ("ray-version", lambda d: _job_worker(d)["containers"][0].update(image="repo/orchestrator:0.1.0-ray2.59.0-cpu")),
    "no authOptions": ("ray-auth", lambda d: _job(d)["rayClusterSpec"].pop("authOptions")),
    "worker without token": ("ray-auth", lambda d: _job_worker(d)["containers"][0].update(env=[e for e in _job_worker(d)["containers"][0]["env"] if e["name"] != "RAY_AUTH_TOKEN"])),
    "auth disabled": ("ray-auth", lambda d: kc.one(d, "RayCluster", "orch-ray")["spec"]["authOptions"].update(mode="disabled")),
    "mlflow without basic-auth": ("mlflow-server", lambda d: _set_arg(d, "--app-name", None)),
    "mlflow allows any host": ("mlflow-server", lambda d: _set_arg(d, "--allowed-hosts", "--allowed-hosts=*")),
    "mlflow host list misses a name": ("mlflow-server", lambda d: _set_arg(d, "--allowed-hosts", "--allowed-hosts=orch-mlflow,orch-mlflow:5000,localhost")),
    "mlflow admin password literal": ("mlflow-server", lambda d: [e.update(value="hunter2") or e.pop("valueFrom") for e in _mlflow(d)["containers"][0]["env"] if e["name"] == "MLFLOW_AUTH_ADMIN_PASSWORD"]),
    "mlflow artifacts off the PVC": ("mlflow-server", lambda d: _set_arg(d, "--artifacts-destination", "--artifacts-destination=/tmp/artifacts")),
    "mlflow on sqlite": ("mlflow-server", lambda d: [e.update(value="sqlite:////mlflow/mlflow.db") for e in _mlflow(d)["containers"][0]["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI"]),
    "mlflow LoadBalancer": ("no-external-exposure", lambda d: kc.one(d, "Service", "orch-mlflow")["spec"].update(type="LoadBalancer")),
    "dashboard NodePort": ("no-external-exposure", lambda d: _job(d)["rayClusterSpec"]["headGroupSpec"].update(serviceType="NodePort")),
    "head ingress": ("no-external-exposure", lambda d: kc.one(d, "RayCluster", "orch-ray")["spec"]["headGroupSpec"].update(enableIngress=True)),
    "shm on disk": ("dev-shm", lambda d: _job_worker(d)["volumes"][0]["emptyDir"].pop("medium")),
    "shm not mounted": ("dev-shm", lambda d: _job_worker(d)["containers"][0].update(volumeMounts=[m for m in _job_worker(d)["containers"][0]["volumeMounts"] if m["mountPath"] != "/dev/shm"])),
    "tracking URI elsewhere": ("rayjob", lambda d: [e.update(value="http://mlflow.other:5000") for e in _job_worker(d)["containers"][0]["env"] if e["name"] == "MLFLOW_TRACKING_URI"]),
    "cluster kept after the job": ("rayjob", lambda d: _job(d).update(shutdownAfterJobFinishes=False)),
    "no deadline": ("rayjob", lambda d: _job(d).pop("activeDeadlineSeconds")),
    "submission mode implicit": ("rayjob", lambda d: _job(d).pop("submissionMode")),
    "checkpoints off the PVC": ("rayjob", lambda d: _job(d).update(entrypoint=_job(d)["entrypoint"].replace("/mnt/shared/", "/tmp/"))),
    "MLflow password literal": ("rayjob", lambda d: [e.pop("valueFrom") and e.update(value="x") for e in _job_worker(d)["containers"][0]["env"] if e["name"] == "MLFLOW_TRACKING_PASSWORD"]),
    "no default deny": ("network-policies", lambda d: d.remove(kc.one(d, "NetworkPolicy", "orch-default-deny-ingress"))),
    "mlflow open to an IP block": ("network-policies", lambda d: _np(d, "orch-mlflow-ingress")["ingress"].append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})),
    "dashboard open to the namespace's every pod": ("network-policies", lambda d: _np(d, "orch-ray-head-api")["ingress"][0]["from"][0].update(podSelector={})),
    "dashboard open to every namespace": ("network-policies", lambda d: _np(d, "orch-ray-head-api")["ingress"][1]["from"][0].update(namespaceSelector={})),
    "postgres open to orchestrator pods": ("network-policies", lambda d: _np(d, "orch-postgres-ingress")["ingress"][0]["from"][0].update(podSelector={"matchLabels": {"app.kubernetes.io/part-of": "orchestrator"}})),
    "submitter cut off the dashboard": ("network-policies", lambda d: _job(d)["submitterPodTemplate"]["metadata"]["labels"].pop("app.kubernetes.io/part-of")),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_policy_catches(name):
    policy, fn = MUTATIONS[name]
    docs = kc.rendered("cpu")
    assert not POLICIES[policy](docs), "the unmodified overlay must pass"
    violations = POLICIES[policy](kc.mutate(docs, fn))
    assert violations, f"policy {policy} missed: {name}"


def test_gpu_policy_catches_a_cpu_worker_and_a_cpu_trainer():
    gpu = kc.rendered("gpu")
    no_gpu = kc.mutate(gpu, lambda d: [r.pop("nvidia.com/gpu") for r in _job_worker(d)["containers"][0]["resources"].values()])
    assert kc.check_gpu(no_gpu, gpu=True)
    no_sel = kc.mutate(gpu, lambda d: _job_worker(d).pop("tolerations"))
    assert kc.check_gpu(no_sel, gpu=True)
    cpu_trainer = kc.mutate(gpu, lambda d: _job(d).update(entrypoint=_job(d)["entrypoint"].replace("trainer=gpu ", "")))
    assert kc.check_gpu(cpu_trainer, gpu=True)
    assert kc.check_gpu(gpu, gpu=False), "the GPU overlay must not pass as a CPU one"


def test_storage_class_and_rwx_are_required():
    docs = kc.rendered("cpu")
    no_class = kc.mutate(docs, lambda d: kc.one(d, "PersistentVolumeClaim", "orch-shared")["spec"].pop("storageClassName"))
    assert any("storageClassName" in v for v in kc.check_rayjob(no_class))
    rwo = kc.mutate(docs, lambda d: kc.one(d, "PersistentVolumeClaim", "orch-shared")["spec"].update(accessModes=["ReadWriteOnce"]))
    assert any("ReadWriteMany" in v for v in kc.check_rayjob(rwo))


def test_repo_ray_pin_mismatch_would_fail(monkeypatch, tmp_path):
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "run").write_text('pip install "ray[train,tune,default]==2.59.1" torch==2.13.0\n')
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["ray[default]>=2.61"]\n')
    monkeypatch.setattr(kc, "REPO", tmp_path)
    pins = kc.repo_ray_pins()
    assert pins == {"pyproject.toml": ">=2.61", ".ci/run": "2.59.1"}
    assert Version(kc.RAY_VERSION) not in SpecifierSet(pins["pyproject.toml"])
    assert pins[".ci/run"] != kc.RAY_VERSION
