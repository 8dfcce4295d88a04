"""deploy/: the Serve config, the KubeRay manifests (base and every overlay) against the KubeRay
v1.7.0 CRD schemas, the generated parts being current, and dashboards/alerts naming only metrics
that shardline.metrics exports."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from shardline.metrics import ENGINE_METRIC_NAMES, METRIC_NAMES, MOE_EXPERT_TOKENS, TTFT_BUCKETS

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CRDS = Path(__file__).parent / "data" / "kuberay"
OVERLAY_DIRS = sorted(p.parent for p in (DEPLOY / "kuberay" / "overlays").glob("*/kustomization.yaml"))


def load_render():
    spec = importlib.util.spec_from_file_location("shardline_deploy_render", DEPLOY / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


render = load_render()


# --- CRD schema validation -------------------------------------------------------------------


def strict_structural(schema: Any) -> Any:
    """A Kubernetes structural schema made checkable by jsonschema: int-or-string becomes anyOf,
    and objects with listed properties refuse unknown fields (the API server would silently
    prune them; here a misspelled field should fail). CEL rules (x-kubernetes-validations) are
    left out: they need a CEL engine."""
    if isinstance(schema, list):
        return [strict_structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_structural(v) for k, v in schema.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    plural = {"RayService": "rayservices", "RayCluster": "rayclusters"}[kind]
    crd = yaml.safe_load((CRDS / f"ray.io_{plural}.yaml").read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict_structural(version["schema"]["openAPIV3Schema"])
    # The API server checks metadata itself; the CRD leaves it open.
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict[str, Any]) -> list[str]:
    validator = crd_validator(doc["kind"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def rendered(directory: Path) -> list[dict[str, Any]]:
    return render.build(directory)


def rayservice(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == "RayService"]
    return doc


ALL_TREES = [DEPLOY / "kuberay" / "base"] + OVERLAY_DIRS
TREE_IDS = [p.name for p in ALL_TREES]


def test_there_are_overlays_for_tp1_and_tp2() -> None:
    assert {p.name for p in OVERLAY_DIRS} >= {"h100-tp1", "h100-tp2"}


@pytest.mark.parametrize("tree", ALL_TREES, ids=TREE_IDS)
def test_rendered_rayservice_validates_against_the_kuberay_crd(tree: Path) -> None:
    doc = rayservice(rendered(tree))
    assert doc["apiVersion"] == "ray.io/v1"
    assert crd_errors(doc) == []


def test_crd_validation_catches_misspelled_fields_and_wrong_types() -> None:
    doc = rayservice(rendered(DEPLOY / "kuberay" / "base"))
    typo = copy.deepcopy(doc)
    typo["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    wrong_type = copy.deepcopy(doc)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    missing = copy.deepcopy(doc)
    del missing["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    for broken in (typo, wrong_type, missing):
        assert crd_errors(broken), broken


def test_dev_raycluster_validates_against_the_kuberay_crd() -> None:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / "dev" / "raycluster.yaml").read_text()) if d]
    [cluster] = [d for d in docs if d["kind"] == "RayCluster"]
    assert crd_errors(cluster) == []
    heads = cluster["spec"]["headGroupSpec"]["rayStartParams"]
    assert heads.get("num-gpus") == "0"


# --- the Serve config --------------------------------------------------------------------------


def serve_schema():
    return pytest.importorskip("ray.serve.schema").ServeDeploySchema


def serve_configs() -> dict[str, str]:
    configs = {"deploy/serve.yaml": (DEPLOY / "serve.yaml").read_text()}
    for tree, name in zip(ALL_TREES, TREE_IDS):
        configs[name] = rayservice(rendered(tree))["spec"]["serveConfigV2"]
    return configs


@pytest.mark.parametrize("name", ["deploy/serve.yaml"] + TREE_IDS)
def test_serve_config_validates_with_ray_serve_schema(name: str) -> None:
    schema = serve_schema()
    config = schema.model_validate(yaml.safe_load(serve_configs()[name]))
    [app] = config.applications
    assert app.import_path == "shardline.cluster.app:build_app"
    assert {d.name for d in app.deployments} == {"ReplicaGroup", "Ingress"}
    autoscaling = pytest.importorskip("ray.serve.config").AutoscalingConfig
    [group] = [d for d in app.deployments if d.name == "ReplicaGroup"]
    scaling = autoscaling(**group.autoscaling_config)
    assert scaling.min_replicas <= scaling.max_replicas
    # Continuous batching: a replica takes many requests, and scales before its batch is full.
    max_num_seqs = app.args["engine"]["max_num_seqs"]
    assert scaling.target_ongoing_requests < max_num_seqs <= group.max_ongoing_requests


def test_base_serve_config_is_deploy_serve_yaml_verbatim() -> None:
    base = rayservice(rendered(DEPLOY / "kuberay" / "base"))
    assert base["spec"]["serveConfigV2"] == (DEPLOY / "serve.yaml").read_text()


def test_generated_files_are_up_to_date() -> None:
    stale = [str(p.relative_to(ROOT)) for p, text in render.generated_files().items() if p.read_text() != text]
    assert stale == [], "run: python deploy/render.py"


@pytest.mark.parametrize("overlay", OVERLAY_DIRS, ids=[p.name for p in OVERLAY_DIRS])
def test_overlay_sizes_worker_pods_by_tensor_parallelism(overlay: Path) -> None:
    values = yaml.safe_load((overlay / "values.yaml").read_text())
    doc = rayservice(rendered(overlay))
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    app = config["applications"][0]
    [group] = [d for d in app["deployments"] if d["name"] == "ReplicaGroup"]
    [workers] = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    resources = workers["template"]["spec"]["containers"][0]["resources"]
    tp = values["tensor_parallel_size"]
    assert app["args"]["tensor_parallel_size"] == tp and app["args"]["model"] == values["model"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == tp
    # One worker pod per replica group: the pod bounds follow the Serve autoscaling bounds.
    assert workers["minReplicas"] == group["autoscaling_config"]["min_replicas"] == values["min_replicas"]
    assert workers["maxReplicas"] == group["autoscaling_config"]["max_replicas"] == values["max_replicas"]
    assert workers["template"]["spec"]["nodeSelector"]["cloud.google.com/gke-accelerator"] == values["accelerator"]


@pytest.mark.parametrize("tree", ALL_TREES, ids=TREE_IDS)
def test_cluster_layout_head_without_gpu_workers_autoscaled_with_shm(tree: Path) -> None:
    spec = rayservice(rendered(tree))["spec"]
    config = yaml.safe_load(spec["serveConfigV2"])
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert ports["serve"] == config["http_options"]["port"]
    assert ports["grpc"] == config["grpc_options"]["port"]
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert {"readinessProbe", "livenessProbe"} <= set(container)
        assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])
        assert {t["key"] for t in pod["tolerations"]} >= {"nvidia.com/gpu"}


@pytest.mark.parametrize("tree", ALL_TREES, ids=TREE_IDS)
def test_prestop_drain_fits_in_the_termination_grace_period(tree: Path) -> None:
    spec = rayservice(rendered(tree))["spec"]
    app = yaml.safe_load(spec["serveConfigV2"])["applications"][0]
    graceful = max(d.get("graceful_shutdown_timeout_s", 20) for d in app["deployments"])
    for group in spec["rayClusterConfig"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        command = " ".join(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"])
        assert "ray drain-node" in command
        waits = [int(s) for s in re.findall(r"sleep (\d+)", command)]
        assert waits and graceful <= max(waits) < pod["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("tree", ALL_TREES, ids=TREE_IDS)
def test_head_prestop_drains_the_ingress_within_the_grace_period(tree: Path) -> None:
    spec = rayservice(rendered(tree))["spec"]
    app = yaml.safe_load(spec["serveConfigV2"])["applications"][0]
    ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")
    pod = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    command = " ".join(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"])
    drain = re.search(r"python -m shardline\.cluster\.drain --app (\S+) --timeout-s (\d+)", command)
    assert drain and drain[1] == app["name"]
    waits = int(drain[2]) + sum(int(s) for s in re.findall(r"sleep (\d+)", command))
    assert ingress.get("graceful_shutdown_timeout_s", 20) <= int(drain[2]) and waits < pod["terminationGracePeriodSeconds"]


def pod_envs(cluster_spec: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Each Ray container's env (name -> value) of a RayCluster spec: the head and every worker group."""
    pods = [cluster_spec["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]
    return {c["name"]: {e["name"]: e.get("value") for e in c.get("env", [])} for p in pods for c in p["containers"]}


def dev_raycluster() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / "dev" / "raycluster.yaml").read_text()) if d]
    [cluster] = [d for d in docs if d["kind"] == "RayCluster"]
    return cluster


@pytest.mark.parametrize("tree", ALL_TREES + ["dev"], ids=TREE_IDS + ["dev"])
def test_every_pod_gives_the_proxies_the_environment_shardline_serve_sets(tree, tmp_path: Path) -> None:
    """Serve's proxies run on every node and read their gRPC message bound (Serve's default:
    2 GiB), handle loop and draining period from the pod's environment: the same values
    `shardline serve` gives them for the deployed Serve config (cluster/proxies.py)."""
    from shardline.cluster.config import ClusterConfig
    from shardline.cluster.proxies import proxy_environment

    if tree == "dev":
        spec, serve_config = dev_raycluster()["spec"], DEPLOY / "serve.yaml"
    else:
        service = rayservice(rendered(tree))["spec"]
        spec, serve_config = service["rayClusterConfig"], tmp_path / "serve.yaml"
        serve_config.write_text(service["serveConfigV2"])
    expected = proxy_environment(ClusterConfig.from_file(serve_config))
    assert expected["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(8 * 2**20)  # not Serve's 2 GiB
    envs = pod_envs(spec)
    assert len(envs) >= 2
    for container, env in envs.items():
        assert {k: env.get(k) for k in expected} == expected, container


def test_grpc_service_selects_serving_pods_on_the_named_port() -> None:
    docs = rendered(DEPLOY / "kuberay" / "base")
    [service] = [d for d in docs if d["kind"] == "Service"]
    [port] = service["spec"]["ports"]
    assert port["port"] == 9000 and port["targetPort"] == "grpc"
    labels = rayservice(docs)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    selector = dict(service["spec"]["selector"])
    assert selector.pop("ray.io/serve") == "true"
    assert selector.items() <= labels.items()


# --- the small kustomize ----------------------------------------------------------------------


def test_json6902_patch_refuses_a_path_that_does_not_exist() -> None:
    with pytest.raises(render.RenderError, match="does not exist"):
        render.apply_json6902({"spec": {}}, [{"op": "replace", "path": "/spec/nothing/here", "value": 1}])


def test_build_applies_images_and_namespace(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [str(DEPLOY / "kuberay" / "overlays" / "h100-tp2")],
        "namespace": "llm",
        "images": [{"name": "shardline", "newName": "registry.example/shardline", "newTag": "0.1.0"}],
    }))
    docs = render.build(tmp_path)
    assert {d["metadata"]["namespace"] for d in docs} == {"llm"}
    spec = rayservice(docs)["spec"]["rayClusterConfig"]
    images = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]] + [
        g["template"]["spec"]["containers"][0]["image"] for g in spec["workerGroupSpecs"]]
    assert set(images) == {"registry.example/shardline:0.1.0"}


def test_build_refuses_kustomize_features_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": [], "helmCharts": []}))
    with pytest.raises(render.RenderError, match="unsupported"):
        render.build(tmp_path)


# --- dashboards and alerts --------------------------------------------------------------------

_HISTOGRAM_FAMILIES = {n for n in ENGINE_METRIC_NAMES if n.endswith("_seconds")} | {MOE_EXPERT_TOKENS}
_METRIC_IN_PROMQL = re.compile(r"shardline:[A-Za-z0-9_:]+")


def families_in(expr: str) -> set[str]:
    """Metric families a PromQL expression reads; histogram series map to their family."""
    names = set()
    for name in _METRIC_IN_PROMQL.findall(expr):
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name[: -len(suffix)] in _HISTOGRAM_FAMILIES:
                name = name[: -len(suffix)]
        names.add(name)
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "monitoring" / "grafana-dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DEPLOY / "monitoring" / "alerts.yaml").read_text())
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def test_families_in_maps_histogram_series_to_their_family() -> None:
    assert families_in("rate(shardline:time_to_first_token_seconds_bucket[5m]) + shardline:prompt_tokens_total") == {
        "shardline:time_to_first_token_seconds", "shardline:prompt_tokens_total"}


def test_dashboard_reads_only_exported_metrics_and_covers_them_all() -> None:
    used = set().union(*(families_in(e) for e in dashboard_exprs()))
    assert used <= set(METRIC_NAMES), used - set(METRIC_NAMES)
    assert used == set(METRIC_NAMES), set(METRIC_NAMES) - used


def test_dashboard_latency_panels_use_histogram_quantile() -> None:
    exprs = dashboard_exprs()
    for family in _HISTOGRAM_FAMILIES:
        for quantile in ("0.5", "0.99"):
            assert any(f"histogram_quantile({quantile}" in e and family + "_bucket" in e for e in exprs), family


def test_alert_rules_parse_and_read_only_exported_metrics() -> None:
    rules = alert_rules()
    assert {"ShardlineNoProgress", "ShardlineKVCacheNearlyFull", "ShardlineHighErrorRate",
            "ShardlineHighRejectionRate", "ShardlineTTFTBudgetBurnFast"} <= {r["alert"] for r in rules}
    for rule in rules:
        expr = rule["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]"), rule["alert"]
        families = families_in(expr)
        assert families and families <= set(METRIC_NAMES), (rule["alert"], families)
        assert rule["labels"]["severity"] in {"warning", "critical"}


def test_alert_bucket_bounds_exist_in_the_ttft_histogram() -> None:
    bounds = {float(le) for rule in alert_rules() for le in re.findall(r'le="([^"]+)"', rule["expr"])}
    assert bounds and bounds <= set(TTFT_BUCKETS)
    # prometheus_client writes bounds as Python floats; the alert must spell them the same way.
    for rule in alert_rules():
        for le in re.findall(r'le="([^"]+)"', rule["expr"]):
            assert le == repr(float(le))


def test_podmonitor_scrapes_the_ingress_http_port_on_the_head() -> None:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "monitoring" / "podmonitor.yaml").read_text()) if d]
    [monitor] = [d for d in docs if d["metadata"]["name"] == "shardline"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "serve" and endpoint["path"] == "/metrics"
    head = rayservice(rendered(DEPLOY / "kuberay" / "base"))["spec"]["rayClusterConfig"]["headGroupSpec"]
    labels = head["template"]["metadata"]["labels"]
    selector = dict(monitor["spec"]["selector"]["matchLabels"])
    assert selector.pop("ray.io/node-type") == "head"
    assert selector.items() <= labels.items()
