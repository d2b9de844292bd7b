"""Metrics that answer "how far behind": promtool on a live scrape, the lag moving as a destination stops and
resumes, persisted values after a restart, the alert rules (checked and unit-tested by promtool), and the
Grafana dashboard referring only to metrics the relay exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

import relay
from relay.metrics import _ProcessCollector
from tests import scripted
from tests.helpers import ROOT, config_dict, entry, free_port, make_config, metric_value, running_relay

ALERTS = ROOT / "docs" / "alerts.yml"
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
NAME = re.compile(r"\b((?:audit_relay|process)_[a-z0-9_]+)\b")

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool is not installed (.ci/run installs prometheus)")


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _exposed(text: str) -> set[str]:
    """Every metric name a scrape declares (families with no sample yet included), with their sample suffixes."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in ("_total", "_bucket", "_sum", "_count", "_info"))
        names.update(sample.name for sample in family.samples)
    return names


@needs_promtool
async def test_live_scrape_passes_promtool_and_covers_dashboard_and_alerts(tmp_path: Path,
                                                                           script: scripted.Script) -> None:
    port = free_port()
    script.answers = [relay.RetryLater("HTTP 503"), relay.Rejected({0: "HTTP 400: field too long"})]
    config = make_config(config_dict(tmp_path, {"in": {"type": "manual"}},
                                     {"out": {"type": "scripted", "script": "main",
                                              "retry": {"initial_backoff": "10ms"}}},
                                     metrics={"listen": f"127.0.0.1:{port}"}), extra=[scripted])
    async with running_relay(config) as service, httpx.AsyncClient() as client:
        await service.sources["in"].intake.submit([entry(), entry("user.created")])
        with trio.fail_after(10):
            await service.destinations["out"].loop.wait_offset(2)
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    lint = await trio.run_process(["promtool", "check", "metrics"], stdin=response.content, capture_stdout=True,
                                  capture_stderr=True, check=False)
    assert (lint.returncode, lint.stdout, lint.stderr) == (0, b"", b"")

    text = response.text
    for sample in ('audit_relay_destination_lag_seconds{destination="out"}',
                   'audit_relay_destination_last_success_timestamp_seconds{destination="out"}',
                   'audit_relay_destination_oldest_undelivered_age_seconds{destination="out"} 0.0',
                   'audit_relay_destination_dead_letters{destination="out"} 1.0',
                   'audit_relay_destination_retries_total{destination="out",outcome="retry"} ',
                   'audit_relay_source_last_success_timestamp_seconds{source="in"}',
                   f'audit_relay_build_info{{python="{__import__("platform").python_version()}",'
                   f'version="{relay.__version__}"}} 1.0',
                   'audit_relay_config_last_reload_successful 1.0'):
        assert sample in text, sample
    exposed = _exposed(text)
    dashboard = {n for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel.get("targets", [])
                 for n in NAME.findall(t["expr"])}
    alerts = {n for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
              for n in NAME.findall(rule["expr"])}
    assert len(dashboard) > 15 and len(alerts) > 8
    assert dashboard - exposed == set(), "the dashboard refers to metrics the relay does not expose"
    assert alerts - exposed == set(), "an alert refers to a metric the relay does not expose"


async def test_lag_moves_when_a_destination_stops_and_resumes(tmp_path: Path, script: scripted.Script) -> None:
    """Entries that occurred 2 h and 10 min ago: while the destination is stopped only the first is delivered,
    so the lag stays over 2 h and the second one waits; once resumed the lag drops to about 10 min."""
    now = time.time()
    old, recent = now - 7200, now - 600
    config = make_config(config_dict(tmp_path, {"in": {"type": "manual"}},
                                     {"out": {"type": "scripted", "script": "main"}}), extra=[scripted])

    def gauge(name: str) -> float:
        return metric_value(f"audit_relay_destination_{name}", destination="out")

    async with running_relay(config) as service:
        loop = service.destinations["out"].loop
        assert relay_absent("audit_relay_destination_lag_seconds"), "no lag before anything was delivered"
        await service.sources["in"].intake.submit([entry(id="1", occurred_at=_rfc3339(old))])
        with trio.fail_after(5):
            await loop.wait_offset(1)
        assert 7200 <= gauge("lag_seconds") < 7200 + 600
        assert (gauge("backlog_entries"), gauge("oldest_undelivered_age_seconds")) == (0, 0)
        first_success = gauge("last_success_timestamp_seconds")
        assert first_success >= now

        script.gate = trio.Event()  # the destination stops answering
        await service.sources["in"].intake.submit([entry(id="2", occurred_at=_rfc3339(recent))])
        with trio.fail_after(5):
            await script.wait(lambda s: s.attempts == 2)
        assert gauge("lag_seconds") >= 7200, "still the freshness of the first entry"
        assert gauge("backlog_entries") == 1
        assert 600 <= gauge("oldest_undelivered_age_seconds") < 7200
        assert gauge("last_success_timestamp_seconds") == first_success

        script.gate.set()  # and resumes
        with trio.fail_after(5):
            await loop.wait_offset(2)
        assert 600 <= gauge("lag_seconds") < 7200
        assert (gauge("backlog_entries"), gauge("oldest_undelivered_age_seconds")) == (0, 0)
        assert gauge("last_success_timestamp_seconds") >= first_success
        last_success = gauge("last_success_timestamp_seconds")

    async with running_relay(config):  # restarted: right from the start, before any delivery
        assert 600 <= gauge("lag_seconds") < 7200, "the newest delivered occurred_at is persisted"
        assert gauge("last_success_timestamp_seconds") == pytest.approx(last_success)
        assert metric_value("audit_relay_source_last_success_timestamp_seconds", source="in") >= now


def relay_absent(name: str) -> bool:
    from relay.metrics import REGISTRY

    return all(sample.name != name for family in REGISTRY.collect() for sample in family.samples)


async def test_dead_letter_gauge_survives_a_restart(tmp_path: Path, script: scripted.Script) -> None:
    script.answers = [relay.Rejected({0: "HTTP 413"})]
    config = make_config(config_dict(tmp_path, {"in": {"type": "manual"}},
                                     {"out": {"type": "scripted", "script": "main"}}), extra=[scripted])
    async with running_relay(config) as service:
        await service.sources["in"].intake.submit([entry()])
        with trio.fail_after(5):
            await service.destinations["out"].loop.wait_offset(1)
        assert metric_value("audit_relay_destination_dead_letters", destination="out") == 1
    async with running_relay(config):
        assert metric_value("audit_relay_destination_dead_letters", destination="out") == 1


def test_process_metrics_without_proc_stat(tmp_path: Path) -> None:
    """systemd's ProcSubset=pid hides /proc/stat: the process metrics must not vanish with it."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    real = Path("/proc/self/stat").read_text()
    (proc / "self" / "stat").write_text(real)
    collector = _ProcessCollector(proc=str(proc), pid=lambda: "self", registry=None)
    names = {m.name for m in collector.collect()}
    assert {"process_resident_memory_bytes", "process_start_time_seconds", "process_cpu_seconds"} <= names
    start = next(m for m in collector.collect() if m.name == "process_start_time_seconds").samples[0].value
    assert abs(start - time.time()) < 24 * 3600


@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


L = 'job="audit-relay",instance="h:9464"'


def _case(alert: str, series: dict[str, str], at: str, firing: list[dict[str, str]], quiet_at: str | None = None
          ) -> dict[str, Any]:
    checks = [{"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": labels} for labels in firing]}]
    if quiet_at:
        checks.append({"eval_time": quiet_at, "alertname": alert, "exp_alerts": []})
    return {"interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": checks}


def _labels(severity: str, **labels: str) -> dict[str, str]:
    return {"job": "audit-relay", "instance": "h:9464", "severity": severity, **labels}


@needs_promtool
def test_alert_rules_fire_when_they_should_and_only_then(tmp_path: Path) -> None:
    """promtool's rule unit tests against synthetic series; annotations are left out of the comparison
    (their templates are checked by `promtool check rules`)."""
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    cases = [
        _case("AuditRelayDown", {f"up{{{L}}}": "1 1 0x10"}, "10m", [_labels("critical")], quiet_at="5m"),
        _case("AuditRelayDestinationHalted",
              {f'audit_relay_destination_state{{{L},destination="splunk",state="halted"}}': "0 0 1x10",
               f'audit_relay_destination_state{{{L},destination="s3",state="halted"}}': "0x12"},
              "10m", [_labels("critical", destination="splunk", state="halted")], quiet_at="5m"),
        _case("AuditRelayDestinationRetrying",
              {f'audit_relay_destination_state{{{L},destination="splunk",state="retrying"}}': "1x40"},
              "40m", [_labels("warning", destination="splunk", state="retrying")], quiet_at="20m"),
        _case("AuditRelayDestinationLagging",
              {f'audit_relay_destination_lag_seconds{{{L},destination="splunk"}}': "1000x30",
               f'audit_relay_destination_backlog_entries{{{L},destination="splunk"}}': "5x30",
               f'audit_relay_destination_lag_seconds{{{L},destination="idle"}}': "5000x30",
               f'audit_relay_destination_backlog_entries{{{L},destination="idle"}}': "0x30"},
              "20m", [_labels("warning", destination="splunk")], quiet_at="5m"),
        _case("AuditRelayDestinationStuck",
              {f'audit_relay_destination_oldest_undelivered_age_seconds{{{L},destination="splunk"}}': "4000x30",
               f'audit_relay_destination_oldest_undelivered_age_seconds{{{L},destination="s3"}}': "0x30"},
              "20m", [_labels("critical", destination="splunk")], quiet_at="5m"),
        _case("AuditRelaySourceDown", {f'audit_relay_source_up{{{L},source="poll"}}': "1 0x20"}, "15m",
              [_labels("critical", source="poll")], quiet_at="5m"),
        _case("AuditRelaySourceSilent",  # promtool's time() starts at 0: a timestamp of 0 ages with the clock
              {f'audit_relay_source_last_success_timestamp_seconds{{{L},source="quiet"}}': "0x300",
               f'audit_relay_source_last_success_timestamp_seconds{{{L},source="busy"}}': "0+60x300"},
              "4h", [_labels("warning", source="quiet")], quiet_at="3h"),
        _case("AuditRelayJournalNearlyFull",
              {f"audit_relay_journal_used_bytes{{{L}}}": "500 900x20",
               f"audit_relay_journal_max_bytes{{{L}}}": "1000x21"},
              "15m", [_labels("warning")], quiet_at="5m"),
        _case("AuditRelayJournalFull", {f"audit_relay_journal_full{{{L}}}": "0 1x5"}, "5m", [_labels("critical")],
              quiet_at="1m"),
        _case("AuditRelayDeadLettersGrowing",
              {f'audit_relay_destination_entries_dead_lettered_total{{{L},destination="splunk"}}': "0 0 0 3x40"},
              "10m", [_labels("warning", destination="splunk")], quiet_at="40m"),
        _case("AuditRelayConfigReloadFailed", {f"audit_relay_config_last_reload_successful{{{L}}}": "1 1 0x10"},
              "10m", [_labels("warning")], quiet_at="4m"),
    ]
    assert {c["alert_rule_test"][0]["alertname"] for c in cases} == {
        r["alert"] for g in rules["groups"] for r in g["rules"]}, "every alert has a test"
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": cases}))
    result = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        assert {"type", "title", "gridPos"} <= set(panel)
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "job", "instance", "destination", "source"}
