"""deploy/k8s: every manifest validated strictly and offline with kubernetes-validate (unknown fields are
errors), the overlays built with `kubectl kustomize` where kubectl exists (else every listed resource
and patch must exist and each overlay must build on the base), the operator's CRD objects checked
structurally (no schema for them ships with kubernetes-validate), and the deployment rules of the issue."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import unknown_variables
from tests.deploy.deploy_support import K8S, missing

KUBERNETES_VERSIONS = ["1.29.0", "1.37.0"]  # oldest supported here (native sidecars, v2 HPA) and newest
KUSTOMIZATIONS = [K8S / "base", K8S / "overlays" / "dev", K8S / "overlays" / "prod", K8S / "prometheus-adapter"]
CRD_GROUPS = ("monitoring.coreos.com/",)


def load_all(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def kustomization(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return data


def resource_files(directory: Path) -> list[Path]:
    """The files a kustomization lists as resources, recursively through the directories it names."""
    files: list[Path] = []
    for entry in kustomization(directory).get("resources", []):
        target = (directory / entry).resolve()
        files.extend(resource_files(target) if target.is_dir() else [target])
    return files


def env_file(path: Path) -> dict[str, str]:
    """A configMapGenerator's `envs` file as kustomize reads it: KEY=value lines; blank lines and lines
    starting with '#' skipped (a '#' after a value is part of the value)."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def generated(directory: Path) -> list[dict[str, Any]]:
    """The ConfigMaps a kustomization's configMapGenerator makes, without kustomize's name hash."""
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": g["name"]},
            "data": {k: v for env in g.get("envs", []) for k, v in env_file(directory / env).items()},
        }
        for g in kustomization(directory).get("configMapGenerator", [])
    ]


def built(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR` (needs no cluster). Without kubectl: the listed resource files and generated
    ConfigMaps of a kustomization without patches (the base); an overlay's checks are skipped, saying so."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if kustomization(directory).get("patches") or any(
            p.is_dir() for p in map(directory.joinpath, kustomization(directory).get("resources", []))
        ):
            pytest.skip(f"kubectl not found: {directory.relative_to(K8S)} not built (its file lists are still checked)")
        return [d for f in resource_files(directory) for d in load_all(f.read_text())] + generated(directory)
    run = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, f"kubectl kustomize {directory}:\n{run.stderr}"
    return load_all(run.stdout)


def kv() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate", "pip install -e '.[dev]' installs it")
    return kubernetes_validate


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_lists_only_existing_files(directory: Path) -> None:
    k = kustomization(directory)
    for entry in k.get("resources", []):
        assert (directory / entry).exists(), f"{directory}: resource {entry} does not exist"
    for generator in k.get("configMapGenerator", []):
        for env in generator.get("envs", []):
            assert (directory / env).is_file(), f"{directory}: configMapGenerator file {env} does not exist"
            # kustomize keeps a value's trailing spaces, which env_file (the fallback builder) strips
            lines = (directory / env).read_text().splitlines()
            assert all(line == line.strip() for line in lines), f"{directory / env}: a line with surrounding spaces"
    for patch in k.get("patches", []):
        if "path" in patch:
            assert (directory / patch["path"]).is_file(), f"{directory}: patch {patch['path']} does not exist"
        else:
            assert "patch" in patch and "target" in patch
    if directory.parent.name == "overlays":
        assert "../../base" in k["resources"], f"{directory} must build on the base"
        assert k.get("namespace"), f"{directory} must set a namespace"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_built_manifests_validate_strictly(directory: Path) -> None:
    validate = kv()
    docs = built(directory)
    assert docs
    native = [d for d in docs if not d["apiVersion"].startswith(CRD_GROUPS)]
    for version in KUBERNETES_VERSIONS:
        for doc in native:
            try:
                validate.validate(doc, version, strict=True)
            except validate.ValidationError as e:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} against Kubernetes {version}: {e.message}")


def test_raw_resource_files_validate_strictly() -> None:
    """Each file on its own too (what kubectl apply -f would see), patches excluded."""
    validate = kv()
    files = {f for d in KUSTOMIZATIONS for f in resource_files(d)}
    for f in sorted(files):
        for doc in load_all(f.read_text()):
            if not doc["apiVersion"].startswith(CRD_GROUPS):
                validate.validate(doc, "1.37.0", strict=True)


def test_the_validator_rejects_unknown_fields() -> None:
    validate = kv()
    doc = next(d for d in load_all((K8S / "base" / "deployment.yaml").read_text()))
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(validate.ValidationError):
        validate.validate(doc, "1.37.0", strict=True)


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in docs}


BUILDS = ["base", "overlays/dev", "overlays/prod"]


@pytest.mark.parametrize("overlay", BUILDS)
def test_deployment_follows_the_rules(overlay: str) -> None:
    docs = by_kind(built(K8S / overlay))
    dep, svc, cm = docs["Deployment"], docs["Service"], docs["ConfigMap"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(cm["data"]["LCS_DRAIN_SECONDS"])
    # after the drain, uvicorn waits up to drain + 1 s more for open connections (service/__main__.py)
    assert pod["terminationGracePeriodSeconds"] > sleep + 2 * drain + 1, "grace must outlast preStop + both waits"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])  # writable scratch on a read-only root
    assert cm["data"]["LCS_HOST"] == "0.0.0.0"
    # generated with a hash of the settings in its name (kubectl kustomize), which the pods reference: a
    # changed setting is a new name, so `kubectl apply -k` rolls the pods (settings are read at start-up)
    assert cm["metadata"]["name"].startswith("lcs-serve-config")
    assert [e["configMapRef"]["name"] for e in c["envFrom"]] == [cm["metadata"]["name"]]
    assert all(k.startswith("LCS_") for k in cm["data"])
    assert unknown_variables({**cm["data"], **{e["name"]: "" for e in c["env"]}}) is None  # each one a setting
    # the Service lcs-serve would otherwise inject LCS_SERVE_PORT=tcp://... and the like beside the settings
    assert pod["enableServiceLinks"] is False
    assert "LCS_API_KEY" not in cm["data"]  # the key lives in a Secret
    (key,) = [e for e in c["env"] if e["name"] == "LCS_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"]["name"] == "lcs-serve-api-key"
    port_names = {p["name"] for p in c["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for selector in (svc["spec"]["selector"], docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    if overlay == "overlays/dev":
        assert docs["Secret"]["metadata"]["name"] == "lcs-serve-api-key"
    elif overlay == "overlays/prod":
        assert "Secret" not in docs  # made out of band in production
        assert cm["data"]["LCS_PROMETHEUS_URL"].startswith("http")


@pytest.mark.parametrize("overlay", BUILDS)
def test_node_drains_take_one_replica_at_a_time(overlay: str) -> None:
    """prod's `minAvailable: 2` let a drain (a node-pool upgrade at peak) evict all but two of up to 20."""
    spec = by_kind(built(K8S / overlay))["PodDisruptionBudget"]["spec"]
    assert spec.get("maxUnavailable") == 1 and "minAvailable" not in spec


@pytest.mark.parametrize("overlay", BUILDS)
def test_hpa_scales_on_demand_and_quality_not_latency(overlay: str) -> None:
    docs = by_kind(built(K8S / overlay))
    hpa = docs["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert {"lcs_quality_deficit", "lcs_predict_requests_per_second"} <= names
    assert not any("latency" in n or "duration" in n or "p99" in n for n in names)
    assert all(m["type"] == "Pods" for m in hpa["spec"]["metrics"])
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "config.yaml").read_text())["rules"]
    served = {r["name"]["as"] for r in adapter}
    assert names <= served, f"the adapter does not serve {names - served}"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # the HPA owns the count: a `replicas` in the manifest reset a scaled-out fleet on every `kubectl apply`
    assert "replicas" not in docs["Deployment"]["spec"]


def test_adapter_configmap_carries_the_adapter_config() -> None:
    """Byte for byte: the adapter reads its config strictly (duplicate keys refused), where a YAML loader
    that keeps the last duplicate hid a comment line that had lost its `#` and become a second `rules:`."""
    (cm,) = load_all((K8S / "prometheus-adapter" / "configmap.yaml").read_text())
    assert cm["data"]["config.yaml"] == (K8S / "prometheus-adapter" / "config.yaml").read_text()
    for rule in yaml.safe_load(cm["data"]["config.yaml"])["rules"]:
        assert set(rule) == {"seriesQuery", "resources", "name", "metricsQuery"}
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


@pytest.mark.parametrize("overlay", BUILDS)
def test_operator_objects_are_well_formed(overlay: str) -> None:
    """ServiceMonitor and PrometheusRule: the fields the operator reads, against the Service they watch."""
    docs = by_kind(built(K8S / overlay))
    sm, svc, rule = docs["ServiceMonitor"], docs["Service"], docs["PrometheusRule"]
    assert sm["apiVersion"] == rule["apiVersion"] == "monitoring.coreos.com/v1"
    for obj in (sm, rule):  # kube-prometheus-stack loads only what carries its release label: dev was unscraped
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(sm["spec"]) <= {
        "selector",
        "endpoints",
        "namespaceSelector",
        "jobLabel",
        "targetLabels",
        "podTargetLabels",
    }
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    service_ports = {p["name"] for p in svc["spec"]["ports"]}
    allowed = {"port", "path", "interval", "scrapeTimeout", "relabelings", "metricRelabelings", "scheme", "honorLabels"}
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= allowed, set(ep) - allowed
        assert ep["port"] in service_ports and ep["path"] == "/metrics"
        assert any(r.get("targetLabel") == "job" and r.get("replacement") == "lcs" for r in ep["relabelings"])
    assert set(rule["spec"]) == {"groups"}
    for g in rule["spec"]["groups"]:
        assert set(g) <= {"name", "interval", "rules"}
        for r in g["rules"]:
            assert set(r) <= {"record", "alert", "expr", "for", "labels", "annotations"}
            assert ("record" in r) != ("alert" in r) and r["expr"]
    assert sm["metadata"].get("namespace") == svc["metadata"].get("namespace")
