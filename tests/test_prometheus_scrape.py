"""A real Prometheus runs deploy/prometheus/prometheus.yml's job against a live
server, and reads keyserve's series back through its HTTP API; every PromQL
expression of the Grafana dashboard and the adapter rules must parse there."""

import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from live_server import MODEL_NAME, metric

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "keyserve.json"
ADAPTER_RULES = ROOT / "deploy" / "kubernetes" / "prometheus-adapter-rules.yaml"
JOB = "keyserve"
START_TIMEOUT = 30.0
SCRAPE_TIMEOUT = 30.0

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="Debian's prometheus package is not installed; .ci/run installs it "
    "(apt-get install -y prometheus)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_config(target: str) -> dict:
    """deploy/prometheus/prometheus.yml with the keyserve job aimed at `target`, every second."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"] = {**config.get("global", {}), "scrape_interval": "1s", "scrape_timeout": "1s"}
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    job.pop("scrape_interval", None)
    job.pop("scrape_timeout", None)
    job["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [job]
    return config


def query(base: str, promql: str) -> dict:
    response = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5)
    body = response.json()
    assert body["status"] == "success", f"{promql}: {body}"
    return body["data"]


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen, log: Path):
    """Poll `check()` until it returns something truthy; fail with Prometheus's log if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{log.read_text()[-3000:]}")


@pytest.fixture
def prometheus(live_server, tmp_path):
    """A Prometheus on a free loopback port scraping the live server; its base URL."""
    target = f"127.0.0.1:{live_server.port}"
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(target)))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                shutil.which("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        ready = lambda: httpx.get(f"{base}/-/ready", timeout=2).status_code == 200  # noqa: E731
        wait_for("Prometheus to be ready", ready, START_TIMEOUT, proc, log)
        yield base, target, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_prometheus_scrapes_keyserve(live_server, prometheus):
    base, target, proc, log = prometheus

    def scraped():
        return query(base, "keyserve:kv_blocks_total")["result"]

    (series,) = wait_for("a scrape of keyserve:kv_blocks_total", scraped, SCRAPE_TIMEOUT, proc, log)
    labels = series["metric"]
    assert labels["job"] == JOB
    assert labels["instance"] == target
    assert labels["model_name"] == MODEL_NAME
    assert float(series["value"][1]) == metric(live_server, "keyserve:kv_blocks_total")
    (up,) = query(base, f'up{{job="{JOB}"}}')["result"]
    assert up["value"][1] == "1"
    # Counters and histograms arrive too, under the names the dashboard reads.
    for name in (
        "keyserve:generation_tokens_total",
        "keyserve:time_to_first_token_seconds_bucket",
        "keyserve:num_requests_waiting",
    ):
        assert query(base, name)["result"], name


def test_dashboard_and_adapter_queries_parse_in_prometheus(prometheus):
    base, _, _, _ = prometheus
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    # Grafana's variables, as Grafana would fill them in.
    grafana = {"$__rate_interval": "1m", "$model_name": ".*"}
    for expr in exprs:
        for var, value in grafana.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        query(base, expr)
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    for rule in rules:
        query(base, rule["seriesQuery"])
        (series,) = re.findall(r"keyserve:[a-z_:]+", rule["seriesQuery"])
        # The adapter's template fields, as it fills them in for one pod.
        adapter = {
            "<<.Series>>": series,
            "<<.LabelMatchers>>": 'namespace="keyserve",pod=~"keyserve-.*"',
            "<<.GroupBy>>": "pod",
        }
        expr = rule["metricsQuery"]
        for field, value in adapter.items():
            expr = expr.replace(field, value)
        assert "<<" not in expr, expr
        query(base, expr)


def test_promtool_accepts_the_compose_config():
    promtool = shutil.which("promtool")  # in the same Debian package
    if promtool is None:
        pytest.skip("promtool is not on PATH")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_YML)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
