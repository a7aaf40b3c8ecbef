"""Offline checks of deploy/observability: the Grafana dashboards' structure, the Prometheus rule file's schema,
every PromQL expression parsed, every metric they name exported by the mesh, and both shipped by the k8s base."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY

from .test_deploy_files import _kubectl_binary

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "deploy" / "observability"
DASHBOARDS = sorted((OBSERVABILITY / "dashboards").glob("*.json"))
ALERTS = OBSERVABILITY / "alerts.yaml"
# Every module of the mesh that defines Prometheus metrics: imported, they register them in the default registry.
METRIC_MODULES = (
    "agentvault.common.metrics",
    "agentvault.common.batching",
    "agentvault.common.policy.enforcer",
    "agentvault_edge.app",
    "agentvault_registry.access",
    "agentvault_registry.cache",
    "agentvault_registry.federation_store",
    "agentvault_registry.metrics",
    "agentvault_discovery.answers",
    "agentvault_discovery.federator",
    "agentvault_discovery.grpc_peers",
    "agentvault_discovery.revalidation",
    "agentvault_discovery.servicer",
    "agentvault_healthmonitor.monitor",
    "agentvault_messaging.metrics",
)
# What each area's dashboard and the alerts must cover (the list).
EXPECTED_DASHBOARDS = {"federation", "messaging", "policy", "auth"}
EXPECTED_ALERT_METRICS = {
    "federation_peer_health",  # a peer down
    "messages_dead_lettered_total",  # dead letters growing
    "policy_approvals_pending",  # approvals waiting
    "oauth_tokens_total",  # token errors
}
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}


def exported_names() -> set[str]:
    """The names of every series the mesh's processes can export (from the metric objects themselves)."""
    for module in METRIC_MODULES:
        importlib.import_module(module)
    names: set[str] = set()
    for family in REGISTRY.collect():
        suffixes = SUFFIXES.get(family.type)
        # A counter's or histogram's own name is no series: only its suffixed ones are.
        names.update(family.name + s for s in suffixes) if suffixes else names.add(family.name)
    return names


def metric_names(expr: str) -> set[str]:
    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr!r}"
            found.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


def load_rules() -> dict[str, Any]:
    document = yaml.safe_load(ALERTS.read_text())
    assert isinstance(document, dict)
    return document


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    board = json.loads(path.read_text())
    assert isinstance(board["uid"], str) and 0 < len(board["uid"]) <= 40
    assert board["title"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = board["panels"]
    assert panels, "a dashboard without panels"
    assert len({p["id"] for p in panels}) == len(panels), "panel ids repeat"
    for p in panels:
        assert p["type"] in {"timeseries", "stat", "gauge", "table", "bargraph"}, p["type"]
        assert p["title"]
        grid = p["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")) and grid["x"] + grid["w"] <= 24
        assert p["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs)


def test_the_dashboards_cover_each_area_with_unique_uids() -> None:
    assert {p.stem for p in DASHBOARDS} == EXPECTED_DASHBOARDS
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)


def test_every_expression_parses_and_names_only_exported_metrics() -> None:
    exported = exported_names()
    exprs = [e for p in DASHBOARDS for e in dashboard_exprs(json.loads(p.read_text()))]
    exprs += [r["expr"] for g in load_rules()["groups"] for r in g["rules"]]
    assert len(exprs) > 20
    unknown = {name: e for e in exprs for name in metric_names(e) if name not in exported}
    assert not unknown, f"metrics no process exports: {unknown}"


def test_the_checks_catch_a_bad_expression_and_an_unknown_metric() -> None:
    with pytest.raises(ValueError, match="parenthesis"):
        metric_names("sum(rate(messages_sent_total[5m])")
    assert "messages_sent" not in exported_names()  # a counter is exported with its _total suffix
    assert "messages_sent_total" in exported_names()


def test_alert_rules_follow_the_rule_file_schema() -> None:
    document = load_rules()
    assert set(document) == {"groups"}
    names = [g["name"] for g in document["groups"]]
    assert len(set(names)) == len(names)
    alerts: list[str] = []
    covered: set[str] = set()
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"}
        assert group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", rule["alert"])
            assert isinstance(rule["expr"], str)
            assert DURATION.match(rule["for"]), rule["for"]
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in rule["labels"].items())
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert {"summary", "description"} <= set(rule["annotations"])
            alerts.append(rule["alert"])
            covered |= metric_names(rule["expr"])
    assert len(set(alerts)) == len(alerts)
    assert covered >= EXPECTED_ALERT_METRICS


def test_the_k8s_base_ships_dashboards_and_rules_as_configmaps() -> None:
    result = subprocess.run(
        [_kubectl_binary(), "kustomize", ROOT / "deploy" / "k8s" / "base"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    maps = {o["metadata"]["name"]: o for o in yaml.safe_load_all(result.stdout) if o and o["kind"] == "ConfigMap"}
    dashboards = maps["agentvault-grafana-dashboards"]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboards["data"] == {p.name: p.read_text() for p in DASHBOARDS}
    assert maps["agentvault-prometheus-rules"]["data"] == {"alerts.yaml": ALERTS.read_text()}
