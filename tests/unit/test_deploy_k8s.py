"""The Kubernetes deployment, validated offline: every object the chart renders for each value set
(deploy/helm/moorage/ci) and each kustomize overlay (deploy/k8s/overlays) passes the Kubernetes
schemas of 1.30 and 1.37 in strict mode (kubernetes-validate) or, for a custom resource, the schema
of its CRD (deploy/schemas); the probe and drain arithmetic, the pods' security context, the PDB,
the autoscalers and the shipped alert rules are checked on the rendered objects."""

from __future__ import annotations

import asyncio
import base64
import functools
import importlib.util
import json
import math
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from moorage.config import Settings, load_settings

from tests.deploy_render import (
    CHART_DIR,
    K8S_DIR,
    RULES_DIR,
    SCHEMAS_DIR,
    kustomize_build,
    load_values,
    overlays,
    render_chart,
    value_sets,
)

K8S_VERSIONS = ["1.30", "1.37"]
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule_v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject_v1alpha1.json",
}
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
SOURCES = [f"chart:{name}" for name in value_sets()] + [f"kustomize:{name}" for name in overlays()]


@functools.cache
def _objects(source: str) -> tuple[dict[str, Any], ...]:
    kind, name = source.split(":")
    return tuple(render_chart(name) if kind == "chart" else kustomize_build(name))


def objects(source: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [o for o in _objects(source) if kind is None or o["kind"] == kind]


def one(source: str, kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [o for o in objects(source, kind) if o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{source}: {len(found)} {kind} objects named *{name_suffix}"
    return found[0]


@functools.cache
def _crd_validator(filename: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMAS_DIR / filename).read_text(encoding="utf-8")))


def _load_script(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pod_settings(source: str, environ: dict[str, str] | None = None) -> Settings:
    """The settings a pod of `source` starts with: its ConfigMap's config.yaml (and `environ`), loaded by moorage."""
    config = one(source, "ConfigMap")["data"]["config.yaml"]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(config, encoding="utf-8")
        return load_settings(path, environ=environ or {})


# ---- the generated files are up to date --------------------------------------------------------


def test_values_schema_is_generated_from_the_settings():
    generator = _load_script(CHART_DIR.parent.parent.parent / "scripts" / "gen_values_schema.py")
    assert (CHART_DIR / "values.schema.json").read_text(encoding="utf-8") == generator.render(), (
        "values.schema.json is out of date: python scripts/gen_values_schema.py"
    )
    schema = json.loads((CHART_DIR / "values.schema.json").read_text(encoding="utf-8"))
    serve = schema["$defs"]["ServeSettings"]["properties"]
    assert serve["load_budget_s"]["exclusiveMinimum"] == 0
    assert "master_key" not in schema["$defs"]["SecuritySettings"]["properties"]  # secrets go in the Secret


def test_kustomize_base_is_the_chart_rendered_with_its_defaults():
    generator = _load_script(K8S_DIR / "generate.py")
    for path, text in generator.files().items():
        assert path.read_text(encoding="utf-8") == text, f"{path} is out of date: python deploy/k8s/generate.py"


def test_the_schema_refuses_a_mistyped_setting_and_a_secret_in_the_configmap():
    from helm_python.errors import HelmValuesError

    with pytest.raises(HelmValuesError, match="prot"):
        render_chart({"settings": {"serve": {"prot": 8000}}})
    with pytest.raises(HelmValuesError, match="master_key"):
        render_chart({"settings": {"security": {"master_key": "c2VjcmV0"}}})
    with pytest.raises(HelmValuesError, match="engine"):
        render_chart({"autoscaling": {"enabled": True, "engine": "cpu"}})


# ---- every object passes its schema -------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_every_object_passes_its_schema(source):
    kinds = set()
    for obj in objects(source):
        kinds.add(obj["kind"])
        crd = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if crd is not None:
            errors = [
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _crd_validator(crd).iter_errors(obj)
            ]
            assert not errors, f"{source} {obj['kind']}/{obj['metadata']['name']}: {errors}"
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(map(str, exc.absolute_path))
                pytest.fail(f"{source} {obj['kind']}/{obj['metadata']['name']} on {version}: {path}: {exc.message}")
    assert {"Deployment", "ConfigMap", "ServiceAccount"} <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_helm_lint_finds_nothing_to_warn_about(version):
    from helm_python.chart import lint

    for name in value_sets():
        report = lint(CHART_DIR, load_values(name), strict=True, kube_version=f"v{version}.0")
        assert not report["errors"], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], (name, report["messages"])


def test_the_validators_catch_a_mistyped_field():
    import copy

    monitor = copy.deepcopy(one("chart:hpa", "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert [e.message for e in _crd_validator("servicemonitor_v1.json").iter_errors(monitor)]
    scaled = copy.deepcopy(one("chart:keda", "ScaledObject", "-server"))
    scaled["spec"]["minReplicas"] = 1
    assert [e.message for e in _crd_validator("scaledobject_v1alpha1.json").iter_errors(scaled)]
    deployment = copy.deepcopy(one("chart:minimal", "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, "1.30", strict=True)


def test_the_value_sets_cover_the_issue():
    assert {"minimal", "gpu", "keda", "hpa", "pdb-off", "tls"} <= set(value_sets())
    assert {"dev", "production", "gpu"} <= set(overlays())
    rendered = {o["kind"] for source in SOURCES for o in objects(source)}
    assert {"ServiceMonitor", "PrometheusRule", "ScaledObject", "HorizontalPodAutoscaler", "Secret"} <= rendered
    assert {"PodDisruptionBudget", "Service"} <= rendered


# what the pods' Secret would hold
_SECRETS = {
    "MOORAGE_SECURITY__MASTER_KEY": base64.b64encode(bytes(32)).decode(),
    "MOORAGE_REGISTRY__CATALOG_URL": "postgresql+psycopg://moorage:pw@postgres/moorage",
}


@pytest.mark.parametrize("source", SOURCES)
def test_pods_read_settings_moorage_accepts(source):
    settings = pod_settings(source)
    assert settings.serve.host == "0.0.0.0" and settings.stream.metrics_host == "0.0.0.0"
    for deployment in objects(source, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            names = [e["name"] for e in container["env"]]
            assert names[0] == "MOORAGE_CONFIG"
            # every MOORAGE_* variable of the pod names a setting: moorage refuses one that does not
            environ = {e["name"]: e.get("value", _SECRETS.get(e["name"])) for e in container["env"][1:]}
            assert all(n.startswith("MOORAGE_") and v for n, v in environ.items()), environ
            assert pod_settings(source, environ).catalog_url == _SECRETS["MOORAGE_REGISTRY__CATALOG_URL"]


# ---- probes and drain ---------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_probe_and_grace_period_arithmetic(source):
    serve = pod_settings(source).serve
    pod = one(source, "Deployment", "-server")["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    startup, ready, live = server["startupProbe"], server["readinessProbe"], server["livenessProbe"]
    # startup: the models get serve.load_budget_s, then one more period; /readyz is 503 until loaded
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["failureThreshold"] == math.ceil(serve.load_budget_s / startup["periodSeconds"]) + 1
    assert startup["failureThreshold"] * startup["periodSeconds"] >= serve.load_budget_s + startup["periodSeconds"]
    assert ready["httpGet"]["path"] == "/readyz" and live["httpGet"]["path"] == "/healthz"
    assert live["failureThreshold"] * live["periodSeconds"] > 2 * live["timeoutSeconds"]
    # drain: preStop sleep (Kubernetes takes the pod out of the endpoints), then SIGTERM: drain_delay_s
    # with /readyz 503 while serving, graceful_timeout_s for in-flight work, 5 s of margin
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 1
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + serve.graceful_timeout_s + 5
    assert grace >= pre_stop + serve.drain_delay_s + serve.graceful_timeout_s + 5
    scheme = "HTTPS" if serve.ssl_certfile or _env(server, "MOORAGE_SERVE__SSL_CERTFILE") else "HTTP"
    assert {p["httpGet"]["scheme"] for p in (startup, ready, live)} == {scheme}


def test_the_chart_computes_with_the_servers_own_defaults():
    chart = yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))
    for key in ("port", "load_budget_s", "graceful_timeout_s", "drain_delay_s"):
        assert chart["settings"]["serve"][key] == Settings.model_fields["serve"].default_factory().model_dump()[key]


def test_several_replicas_need_a_shared_catalog_and_store():
    from helm_python.errors import HelmRenderError

    with pytest.raises(HelmRenderError, match="secret.databaseUrl"):
        render_chart({"server": {"replicas": 2}})
    with pytest.raises(HelmRenderError, match="store_url"):
        render_chart({"autoscaling": {"enabled": True}, "secret": {"existingSecret": "moorage"}})
    with pytest.raises(HelmRenderError, match="secret.databaseUrl"):  # a worker would see none of the jobs
        render_chart({"jobsWorker": {"enabled": True}})
    shared = {
        "secret": {"databaseUrl": "postgresql+psycopg://db/moorage"},
        "settings": {"registry": {"store_url": "s3://b"}},
    }
    assert one_of(render_chart({"server": {"replicas": 3}, **shared}), "Deployment")["spec"]["replicas"] == 3


def one_of(rendered: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = [o for o in rendered if o["kind"] == kind]
    return obj


def test_the_arithmetic_follows_the_values():
    values = {
        "settings": {"serve": {"load_budget_s": 7.5, "graceful_timeout_s": 12.2, "drain_delay_s": 0}},
        "server": {"preStopSleepSeconds": 3, "probes": {"periodSeconds": 2}},
    }
    pod = next(o for o in render_chart(values) if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["startupProbe"]["failureThreshold"] == 4 + 1  # ceil(7.5 / 2) + 1
    assert pod["terminationGracePeriodSeconds"] == 3 + 0 + 13 + 5


def _env(container: dict[str, Any], name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


@pytest.mark.anyio
async def test_the_probed_and_scraped_paths_answer_on_a_server_with_the_pods_settings(tmp_path, fake_model):
    """The chart's settings file, as a pod reads it, starts a server whose probe paths and /metrics
    (no key: the ServiceMonitor sends none) answer: /readyz once the served model is loaded."""
    import httpx
    from asgi_lifespan import LifespanManager

    from moorage.registry import Registry
    from moorage.server import create_app

    settings = pod_settings("chart:minimal").model_copy(update={"home": tmp_path / "home"})
    registry = Registry.from_settings(settings)
    registry.register(fake_model("embed"), "emb", "embed")
    (server,) = one("chart:minimal", "Deployment", "-server")["spec"]["template"]["spec"]["containers"]
    paths = {probe: server[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    app = create_app(settings, ["emb"], registry=registry)
    try:
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://moorage") as client:
                assert (await client.get(paths["livenessProbe"])).status_code == 200
                await asyncio.wait([app.state.loading], timeout=60)  # the models load in the background
                assert (await client.get(paths["readinessProbe"])).status_code == 200
                assert (await client.get(paths["startupProbe"])).status_code == 200
                metrics = await client.get("/metrics")
                assert metrics.status_code == 200 and "moorage_queue_depth" in metrics.text
                assert (await client.post("/v1/embeddings", json={"model": "emb", "input": "a"})).status_code == 401
    finally:
        registry.close()


# ---- security -----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
def test_every_pod_runs_locked_down(source):
    workloads = [o for o in objects(source) if o["kind"] in POD_KINDS]
    assert workloads
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        where = f"{source} {workload['metadata']['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod["automountServiceAccountToken"] is False, where
        empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["runAsNonRoot"] is True, where
            assert ctx["capabilities"]["drop"] == ["ALL"] and "add" not in ctx["capabilities"], where
            assert ctx["seccompProfile"]["type"] == "RuntimeDefault", where
            writable = {m["mountPath"]: m["name"] for m in container["volumeMounts"] if not m.get("readOnly")}
            assert (
                {"/tmp", str(pod_settings(source).home)}
                <= set(writable)
                <= {"/tmp", "/dev/shm", str(pod_settings(source).home)}
            ), where
            assert set(writable.values()) <= empty_dirs, where
            assert "limits" in container["resources"] and "requests" in container["resources"], where
    for account in objects(source, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False
    assert not [o for o in objects(source) if o["kind"] in {"Role", "ClusterRole", "RoleBinding"}]


def test_credentials_come_from_a_secret():
    secret = one("chart:hpa", "Secret")
    assert base64.b64decode(secret["data"]["database-url"]).startswith(b"postgresql+psycopg://")
    assert set(secret["data"]) == {"master-key", "database-url"}
    assert "change-me" not in one("chart:hpa", "ConfigMap")["data"]["config.yaml"]
    (server,) = one("chart:keda", "Deployment", "-server")["spec"]["template"]["spec"]["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in server["env"] if "valueFrom" in e}
    assert refs["MOORAGE_SECURITY__MASTER_KEY"] == {
        "name": "moorage-credentials",
        "key": "master-key",
        "optional": False,
    }
    assert refs["MOORAGE_REGISTRY__CATALOG_URL"]["key"] == "database-url"
    assert not objects("chart:keda", "Secret")  # existingSecret: the chart makes none


# ---- availability: PDB, spread ------------------------------------------------------------------


def test_pdb_and_topology_spread_on_by_default_off_in_pdb_off():
    pdb = one("chart:minimal", "PodDisruptionBudget")
    deployment = one("chart:minimal", "Deployment", "-server")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(c["labelSelector"]["matchLabels"] == pdb["spec"]["selector"]["matchLabels"] for c in spread)
    assert not objects("chart:pdb-off", "PodDisruptionBudget")
    assert "topologySpreadConstraints" not in one("chart:pdb-off", "Deployment")["spec"]["template"]["spec"]
    # the stream workers get their own PDB
    assert {o["metadata"]["name"] for o in objects("chart:hpa", "PodDisruptionBudget")} == {
        "moorage-server",
        "moorage-stream-worker",
    }


# ---- autoscaling --------------------------------------------------------------------------------


def test_hpa_scales_servers_on_queue_depth_and_workers_on_lag():
    server = one("chart:hpa", "HorizontalPodAutoscaler", "-server")
    (metric,) = server["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "moorage_queue_depth"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "8"}
    behavior = server["spec"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert "replicas" not in one("chart:hpa", "Deployment", "-server")["spec"]  # the HPA owns it
    (lag,) = one("chart:hpa", "HorizontalPodAutoscaler", "-stream-worker")["spec"]["metrics"]
    assert lag["type"] == "External" and lag["external"]["metric"]["name"] == "moorage_stream_lag"
    # prometheus-adapter serves exactly the metrics the HPAs read
    adapter = yaml.safe_load((CHART_DIR / "prometheus-adapter-values.yaml").read_text(encoding="utf-8"))
    assert [r["name"]["as"] for r in adapter["rules"]["custom"]] == ["moorage_queue_depth"]
    assert [r["name"]["as"] for r in adapter["rules"]["external"]] == ["moorage_stream_lag"]
    assert adapter["rules"]["custom"][0]["metricsQuery"].startswith("sum(")


def test_keda_scales_on_the_same_queries_and_never_to_zero():
    assert not objects("chart:keda", "HorizontalPodAutoscaler")  # KEDA makes its own
    server = one("chart:keda", "ScaledObject", "-server")["spec"]
    (trigger,) = server["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["query"] == 'sum(moorage_queue_depth{namespace="moorage",pod=~"moorage-server-.*"})'
    assert trigger["metadata"]["threshold"] == "16"
    assert server["minReplicaCount"] >= 1
    assert server["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
    (lag,) = one("chart:keda", "ScaledObject", "-stream-worker")["spec"]["triggers"]
    assert lag["metadata"]["query"].startswith("max(moorage_stream_lag{")


# ---- GPU, TLS -----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["chart:gpu", "kustomize:gpu"])
def test_gpu_pods_ask_for_a_gpu_on_gpu_nodes(source):
    pod = one(source, "Deployment", "-server")["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["image"].endswith("-cu126")
    assert _env(server, "MOORAGE_RUNTIME__DEVICE") == "cuda"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in server["volumeMounts"]


def test_tls_mounts_the_certificate_and_probes_use_https():
    pod = one("chart:tls", "Deployment", "-server")["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert _env(server, "MOORAGE_SERVE__SSL_CERTFILE") == "/etc/moorage/tls/tls.crt"
    assert {"name": "tls", "mountPath": "/etc/moorage/tls", "readOnly": True} in server["volumeMounts"]
    assert next(v for v in pod["volumes"] if v["name"] == "tls")["secret"]["secretName"] == "moorage-tls"
    assert server["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    (endpoint,) = one("chart:tls", "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"


# ---- monitoring ---------------------------------------------------------------------------------


def test_prometheus_rule_carries_exactly_the_shipped_rules():
    shipped = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        shipped.extend(yaml.safe_load(path.read_text(encoding="utf-8"))["groups"])
    assert one("chart:hpa", "PrometheusRule")["spec"]["groups"] == shipped
    assert len(shipped) >= 3


def test_service_monitor_scrapes_servers_and_workers_under_the_rules_job_names():
    monitor = one("chart:hpa", "ServiceMonitor")["spec"]
    assert [e["port"] for e in monitor["endpoints"]] == ["http", "metrics"]
    jobs = {s["metadata"]["labels"][monitor["jobLabel"]] for s in objects("chart:hpa", "Service")}
    assert jobs == {"moorage-serve", "moorage-stream"}  # the jobs deploy/prometheus/rules select
    for service in objects("chart:hpa", "Service"):
        assert all(service["metadata"]["labels"][k] == v for k, v in monitor["selector"]["matchLabels"].items())


# ---- kustomize ----------------------------------------------------------------------------------


def test_overlays_change_what_they_say():
    (dev,) = one("kustomize:dev", "Deployment")["spec"]["template"]["spec"]["containers"]
    assert _env(dev, "MOORAGE_LOG_LEVEL") == "DEBUG" and dev["resources"]["requests"]["cpu"] == "500m"
    production = one("kustomize:production", "Deployment")
    assert production["spec"]["replicas"] == 3
    (server,) = production["spec"]["template"]["spec"]["containers"]
    assert _env(server, "MOORAGE_REGISTRY__STORE_URL").startswith("s3://")
    assert all(e["valueFrom"]["secretKeyRef"]["optional"] is False for e in server["env"] if "valueFrom" in e)
    assert one("kustomize:production", "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == "moorage-server"
    assert server["image"] == "moorage:0.1.0"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl (kustomize) on this machine")
@pytest.mark.parametrize("overlay", overlays())
def test_the_builder_agrees_with_kubectl_kustomize(overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S_DIR / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    theirs = [d for d in yaml.safe_load_all(out.stdout) if d]

    def key(o: dict[str, Any]) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    assert sorted(theirs, key=key) == sorted(objects(f"kustomize:{overlay}"), key=key)
