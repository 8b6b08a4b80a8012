"""The Grafana dashboard (compose/grafana) against the metrics the code exports.

Every PromQL expression names only metrics that `metrics.names.names()` lists, parses as
PromQL (promtool, Grafana's $__ variables replaced), and the panels the issue asks for are
there; the provisioning files point Grafana at the dashboard folder compose mounts and at
the datasource uid the dashboard uses. Each check is a function returning its problems,
shown to fail on a mutated dashboard too.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import yaml
from helpers import system_tool

from metrics.names import names

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose"
GRAFANA = COMPOSE / "grafana"
METRIC = re.compile(r"\bfleetscribe_[A-Za-z0-9_:]*")
# Grafana's variables in an expression, and what they stand for when promtool parses it.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def _quantile(q: str, metric: str, by: str) -> str:
    """histogram_quantile(q, sum by (BY) (rate(METRIC[...]))), as a pattern."""
    return rf"histogram_quantile\({q}, sum by \({by}\) \(rate\({metric}\["


# (what the issue asks for, a pattern one panel's expressions must match)
REQUIRED = {
    "videos described per hour": (
        r"rate\(fleetscribe_videos_described_total\[[^]]+\]\)\)?\s*\*\s*3600"
    ),
    "queue depth by queue": r"by \(queue\) \(fleetscribe_queue_depth\)",
    "failures by reason": r"by \(reason\) \((rate|increase)\(fleetscribe_videos_failed_total\[",
    "rejected videos": r"(rate|increase)\(fleetscribe_videos_rejected_total\[",
    "GPU memory by kind": r"by \([^)]*\bkind\b[^)]*\) \(fleetscribe_gpu_memory_bytes\)",
    "training loss by run": r"by \(run\) \(fleetscribe_training_loss\)",
    "stage latency p50": _quantile(r"0\.5", "fleetscribe_stage_seconds_bucket", "le, stage"),
    "stage latency p95": _quantile(r"0\.95", "fleetscribe_stage_seconds_bucket", "le, stage"),
    "queue wait p95": _quantile(r"0\.95", "fleetscribe_queue_wait_seconds_bucket", "le"),
    "batch size": r"fleetscribe_batch_size_(bucket|sum)",
    "answer tokens per second": r"rate\(fleetscribe_answer_tokens_total\[",
    "training step and total": (
        r"fleetscribe_training_step\b(?s:.*)fleetscribe_training_total_steps"
    ),
    "store videos by state": r"by \(state\) \(fleetscribe_videos\)",
    "sources up": r"fleetscribe_source_up",
}


def _tool(name: str, package: str) -> str:
    return system_tool(name, package)


def _dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards" / "fleetscribe.json").read_text())


def _panels(dashboard: dict) -> list[dict]:
    """Every panel that shows data (rows' nested panels included, rows themselves not)."""
    found = []
    for panel in dashboard["panels"]:
        found += [panel] if panel["type"] != "row" else []
        found += panel.get("panels", []) if panel["type"] == "row" else []
    return found


def _exprs(panel: dict) -> list[str]:
    return [t["expr"] for t in panel.get("targets", []) if t.get("expr")]


def metric_problems(dashboard: dict) -> list[str]:
    exported = names()
    problems = []
    for panel in _panels(dashboard):
        if not _exprs(panel):
            problems.append(f"{panel['title']}: no PromQL expression")
        for expr in _exprs(panel):
            for metric in METRIC.findall(expr):
                if metric not in exported:
                    problems.append(f"{panel['title']}: {metric} is not a metric the code exports")
    return problems


def required_problems(dashboard: dict) -> list[str]:
    panels = ["\n".join(_exprs(p)) for p in _panels(dashboard)]
    return [
        f"no panel for {what} ({pattern})"
        for what, pattern in REQUIRED.items()
        if not any(re.search(pattern, text) for text in panels)
    ]


def layout_problems(dashboard: dict) -> list[str]:
    problems, cells = [], {}
    ids = [p["id"] for p in dashboard["panels"]] + [
        n["id"] for p in dashboard["panels"] for n in p.get("panels", [])
    ]
    if len(ids) != len(set(ids)):
        problems.append("panel ids repeat")
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        if g["x"] < 0 or g["x"] + g["w"] > 24:
            problems.append(f"{panel['title']}: wider than the 24 columns")
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    problems.append(f"{panel['title']} overlaps {cells[x, y]}")
                    break
                cells[x, y] = panel["title"]
            else:
                continue
            break
    return problems


def _datasource_uids(dashboard: dict) -> set[str]:
    found = set()
    for panel in _panels(dashboard):
        for holder in [panel, *panel.get("targets", [])]:
            source = holder.get("datasource")
            found.add(source.get("uid") if isinstance(source, dict) else source)
    return found


def _promtool_rules(dashboard: dict, folder: Path) -> subprocess.CompletedProcess:
    """Every expression as a recording rule, checked (parsed) by `promtool check rules`."""
    rules = []
    for i, panel in enumerate(_panels(dashboard)):
        for j, expr in enumerate(_exprs(panel)):
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: a Grafana variable promtool can't read"
            rules.append({"record": f"dashboard:panel{i}:expr{j}", "expr": expr})
    path = folder / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool = _tool("promtool", "prometheus")
    return subprocess.run(
        [promtool, "check", "rules", path], capture_output=True, text=True, timeout=60
    )


def test_every_expression_names_only_metrics_the_code_exports():
    dashboard = _dashboard()
    assert metric_problems(dashboard) == []
    # the check sees a name the code does not export (a typo, a renamed metric)
    broken = copy.deepcopy(dashboard)
    target = _panels(broken)[0]["targets"][0]
    target["expr"] = target["expr"].replace(
        "fleetscribe_videos_described_total", "fleetscribe_videos_describd_total"
    )
    assert any("fleetscribe_videos_describd_total" in p for p in metric_problems(broken))


def test_the_panels_the_issue_asks_for_are_there():
    dashboard = _dashboard()
    assert required_problems(dashboard) == []
    titles = {p["title"] for p in _panels(dashboard)}
    assert {"Videos described / hour", "Queue depth", "GPU memory", "Training loss"} <= titles
    gpu = next(p for p in _panels(dashboard) if p["title"] == "GPU memory")
    assert gpu["fieldConfig"]["defaults"]["unit"] == "bytes"
    # without the GPU memory panel, the check says so
    broken = copy.deepcopy(dashboard)
    broken["panels"] = [p for p in broken["panels"] if p.get("title") != "GPU memory"]
    assert required_problems(broken) == [
        f"no panel for GPU memory by kind ({REQUIRED['GPU memory by kind']})"
    ]


def test_panels_are_laid_out_without_overlap():
    dashboard = _dashboard()
    assert dashboard["uid"] == "fleetscribe" and dashboard["title"] == "fleetscribe"
    assert layout_problems(dashboard) == []
    broken = copy.deepcopy(dashboard)
    _panels(broken)[1]["gridPos"] = dict(_panels(broken)[0]["gridPos"])
    assert any("overlaps" in p for p in layout_problems(broken))


def test_promtool_parses_every_expression(tmp_path):
    dashboard = _dashboard()
    done = _promtool_rules(dashboard, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    # a broken expression fails the same check
    broken = copy.deepcopy(dashboard)
    target = _panels(broken)[0]["targets"][0]
    target["expr"] = target["expr"].replace("sum by (valid) (", "sum by (valid (")
    (tmp_path / "broken").mkdir()
    assert _promtool_rules(broken, tmp_path / "broken").returncode != 0


def test_provisioning_points_at_the_mounted_dashboards_and_the_datasource_uid():
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[source] = target
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"

    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "fleetscribe.yml").read_text()
    )
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == mounts["./grafana/dashboards"]
    assert (GRAFANA / "dashboards" / "fleetscribe.json").exists()

    sources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    prometheus = compose["services"]["prometheus"]
    assert any(str(p).endswith(":9090:9090") for p in prometheus["ports"])
    assert _datasource_uids(_dashboard()) == {source["uid"]}
    # Grafana's shortest rate window follows the scrape interval Prometheus uses
    scrape = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    assert source["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]
