"""The Grafana dashboard and the Prometheus alert rules, checked with the real tools.

- The rules (deploy/prometheus) pass `promtool check rules`, and their unit tests pass
  `promtool test rules`: every alert fires on its series and stays quiet on its quiet case. A
  wrong expectation fails, and so does each rule with the clause that keeps a quiet case quiet
  removed: the unit tests can fail.
- The PrometheusRule of the kustomize component (k8s/components/prometheus-rule) holds the rules
  file's groups exactly, and `kubectl kustomize` renders it into an overlay that uses it.
- Every query of the dashboard (deploy/grafana) is valid PromQL for promtool, once Grafana's
  variables are replaced by what Grafana would put there; the dashboard picks its data source
  from a variable, so it imports into any Grafana.
- Every `training_sidecar_*` name the dashboard and the rules query is exported by a real
  sidecar: one runs on the simulator with a stand-in NVML and is scraped while it trains, so a
  metric renamed in sidecar/surface/metrics.py fails here. Names are compared as PromQL sees
  them: counters with `_total`, histograms as `_bucket`, `_sum` and `_count`.

promtool comes from PATH or from .ci/tools/bin (`bash .ci/install-promtool.sh` puts it there);
kubectl from PATH. Without them the tests skip on a laptop and fail under CI (env CI set).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml
from conftest import run_sidecar
from nvml_stub.build import STATE_FILE_VARIABLE, CompilerMissing, build_fake_nvml
from prometheus_client.parser import text_string_to_metric_families
from repo_paths import REPO_ROOT
from sidecar_process import free_port

from sidecar.simulator.fluxgym_tree import build_fluxgym_tree

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "training-sidecar.json"
RULES = REPO_ROOT / "deploy" / "prometheus" / "training-sidecar.rules.yaml"
RULE_TESTS = REPO_ROOT / "deploy" / "prometheus" / "training-sidecar.rules.test.yaml"
COMPONENT = REPO_ROOT / "k8s" / "components" / "prometheus-rule"
JOB_OVERLAY = REPO_ROOT / "k8s" / "overlays" / "job"
# Where .ci/install-promtool.sh extracts promtool when none is on PATH.
EXTRACTED_PROMTOOL = REPO_ROOT / ".ci" / "tools" / "bin" / "promtool"
METRIC_NAME = re.compile(r"\btraining_sidecar_[a-z0-9_]*[a-z0-9]")
ALERTS = (
    "TrainingSidecarStalled",
    "TrainingSidecarRestartBudgetLow",
    "TrainingSidecarGaveUp",
    "TrainingSidecarNoRecentCheckpoint",
    "TrainingSidecarDown",
)


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but the dashboard and alert checks cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None and os.access(EXTRACTED_PROMTOOL, os.X_OK):
        found = str(EXTRACTED_PROMTOOL)
    if found is None:
        _unavailable("promtool is not installed (bash .ci/install-promtool.sh)")
    return found


def run_promtool(promtool: str, *arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *arguments], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["groups"]
    return groups


def rules_by_alert() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in rule_groups() for rule in group["rules"]}


# --- the alert rules ---------------------------------------------------------------------


def test_the_rules_are_the_five_alerts_with_severity_and_annotations():
    """Each alert the issue names exists once, with a severity and annotations that name the
    instance the alert is about."""
    rules = [rule for group in rule_groups() for rule in group["rules"]]
    assert [rule["alert"] for rule in rules] == list(ALERTS)
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
        assert "$labels.instance" in rule["annotations"]["summary"], rule["alert"]


def test_the_rules_pass_promtool_check(promtool: str):
    """`promtool check rules` accepts the file: valid PromQL, durations, templates, names."""
    result = run_promtool(promtool, "check", "rules", RULES.name, cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_the_rule_unit_tests_pass(promtool: str):
    """`promtool test rules`: every alert fires on series shaped like a sidecar's, at the
    minute its `for:` allows, with its labels and annotations, and the quiet cases stay quiet."""
    result = run_promtool(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_case():
    """The unit tests expect each alert firing somewhere and quiet somewhere else."""
    checks = [
        check
        for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for check in case["alert_rule_test"]
    ]
    for alert in ALERTS:
        expected = [check["exp_alerts"] for check in checks if check["alertname"] == alert]
        assert any(expected), f"no test expects {alert} to fire"
        assert [] in expected, f"no test expects {alert} to stay quiet"


def _run_rule_tests(
    promtool: str, folder: Path, rules: dict[str, Any], tests: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    """The unit tests on copies (in ``folder``) of the rules and of the tests."""
    (folder / RULES.name).write_text(yaml.safe_dump(rules, sort_keys=False))
    (folder / RULE_TESTS.name).write_text(yaml.safe_dump(tests, sort_keys=False))
    return run_promtool(promtool, "test", "rules", RULE_TESTS.name, cwd=folder)


def test_a_wrong_expectation_fails(promtool: str, tmp_path: Path):
    """The unit tests can fail: expecting the wrong severity makes promtool say FAILED."""
    tests = yaml.safe_load(RULE_TESTS.read_text())
    rules = yaml.safe_load(RULES.read_text())
    assert _run_rule_tests(promtool, tmp_path, rules, tests).returncode == 0, "the copies pass"
    firing = next(
        check for case in tests["tests"] for check in case["alert_rule_test"] if check["exp_alerts"]
    )
    firing["exp_alerts"][0]["exp_labels"]["severity"] = "page-everyone"
    result = _run_rule_tests(promtool, tmp_path, rules, tests)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr
    assert "page-everyone" in result.stdout + result.stderr


def _replace(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(rule: dict[str, Any]) -> None:
        assert old in rule["expr"], f"the rule no longer has {old!r}"
        rule["expr"] = rule["expr"].replace(old, new)

    return mutate


def _set_for(duration: str) -> Callable[[dict[str, Any]], None]:
    def mutate(rule: dict[str, Any]) -> None:
        rule["for"] = duration

    return mutate


@pytest.mark.parametrize(
    ("alert", "mutate"),
    [
        # A stall the sidecar recovers within minutes must not page anyone.
        ("TrainingSidecarStalled", _set_for("2m")),
        # A budget nothing was spent from yet is not low, however small.
        (
            "TrainingSidecarRestartBudgetLow",
            _replace("and training_sidecar_run_recoveries > 0", ""),
        ),
        # Nor is the budget of a run that is over.
        (
            "TrainingSidecarRestartBudgetLow",
            _replace('phase=~"starting|running|stalled|crashed"', 'phase=~".+"'),
        ),
        # A stalled run's old checkpoint is the stall's business.
        (
            "TrainingSidecarNoRecentCheckpoint",
            _replace('and ignoring (phase) training_sidecar_phase{phase="running"} == 1', ""),
        ),
        # A process-mode sidecar that exits with its completed run is not down...
        (
            "TrainingSidecarDown",
            _replace(
                '  last_over_time(training_sidecar_phase{phase="completed"}[1d]) == 1\n  or\n',
                "",
            ),
        ),
        # ... nor one that exits after its last step, before a scrape saw it completed.
        (
            "TrainingSidecarDown",
            _replace(
                "  or\n  last_over_time(training_sidecar_last_step[1d])\n"
                "    >= last_over_time(training_sidecar_max_steps[1d])\n",
                "",
            ),
        ),
        # A sidecar scraped under another job name (the Operator's) is still watched.
        (
            "TrainingSidecarDown",
            _replace(
                "  or\n"
                "  (up == 0 and on (job, instance) max_over_time(training_sidecar_info[1d]))\n",
                "",
            ),
        ),
    ],
    ids=[
        "stalled-for",
        "budget-untouched",
        "budget-run-over",
        "checkpoint-while-stalled",
        "down-after-completing",
        "down-after-the-last-step",
        "down-any-job",
    ],
)
def test_each_quiet_case_guards_a_clause(
    promtool: str, tmp_path: Path, alert: str, mutate: Callable[[dict[str, Any]], None]
):
    """Without the clause (or the `for:`) that keeps a quiet case quiet, or the branch that
    makes a case fire, the rules are still valid but their unit tests fail."""
    rules = yaml.safe_load(RULES.read_text())
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert _run_rule_tests(promtool, tmp_path, rules, tests).returncode == 0, "the copies pass"
    (rule,) = [r for group in rules["groups"] for r in group["rules"] if r.get("alert") == alert]
    mutate(rule)
    result = _run_rule_tests(promtool, tmp_path, rules, tests)
    check = run_promtool(promtool, "check", "rules", RULES.name, cwd=tmp_path)
    assert check.returncode == 0, f"the changed rule is not valid:\n{check.stdout}{check.stderr}"
    assert result.returncode != 0, f"the unit tests still pass with {alert} changed to {rule}"


# --- the PrometheusRule and its kustomize component -------------------------------------------


def test_the_prometheus_rule_holds_the_rules_files_groups():
    """The PrometheusRule is the rules file, not a second version of it."""
    manifest = yaml.safe_load((COMPONENT / "prometheus-rule.yaml").read_text())
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["spec"]["groups"] == rule_groups(), (
        "k8s/components/prometheus-rule/prometheus-rule.yaml must carry "
        "deploy/prometheus/training-sidecar.rules.yaml's groups unchanged"
    )
    component = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    assert component["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    assert component["kind"] == "Component"


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        _unavailable("kubectl is not installed (`kubectl kustomize` renders the component)")
    return found


def test_the_component_renders_into_an_overlay(tmp_path: Path):
    """An overlay of the default Job that adds the component renders the Job as before and
    the PrometheusRule, in the overlay's namespace, with the rules file's groups."""
    overlay = tmp_path / "my-training"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "lora-training",
                "resources": [os.path.relpath(JOB_OVERLAY, overlay)],
                "components": [os.path.relpath(COMPONENT, overlay)],
            }
        )
    )
    result = subprocess.run(
        [_kubectl(), "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    objects = [obj for obj in yaml.safe_load_all(result.stdout) if obj]
    kinds = sorted(obj["kind"] for obj in objects)
    assert kinds == ["ConfigMap", "ConfigMap", "Job", "PersistentVolumeClaim", "PrometheusRule"]
    (rule,) = [obj for obj in objects if obj["kind"] == "PrometheusRule"]
    assert rule["metadata"]["namespace"] == "lora-training"
    assert rule["spec"]["groups"] == rule_groups()


# --- the dashboard ---------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


@dataclass(frozen=True)
class Query:
    where: str
    expr: str


def dashboard_queries(board: dict[str, Any]) -> list[Query]:
    """Every PromQL expression in the dashboard: panel targets, annotation queries, and the
    series selector of each `label_values(SELECTOR, LABEL)` variable query."""
    queries = [
        Query(f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]
    queries += [
        Query(f"annotation {annotation['name']!r}", annotation["expr"])
        for annotation in board["annotations"]["list"]
        if "expr" in annotation
    ]
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text)
        assert match, f"variable {variable['name']}: expected label_values(SELECTOR, LABEL)"
        queries.append(Query(f"variable {variable['name']!r}", match[1]))
    return queries


# Grafana's own interval variables; 5m is what a 6 h dashboard would get for them.
GRAFANA_INTERVALS = re.compile(r"\$\{?__(?:rate_interval|interval|range)\}?")


def as_prometheus_sees_it(expr: str, variables: Iterable[str]) -> str:
    """The query Grafana sends: its intervals filled in, and each dashboard variable (all of
    them used in regex matchers) as the "All" value .*."""
    expr = GRAFANA_INTERVALS.sub("5m", expr)
    for name in variables:
        expr = re.sub(rf"\$\{{{name}\}}|\${name}\b|\[\[{name}\]\]", ".*", expr)
    assert "$" not in expr, f"a variable the test does not know is left in {expr!r}"
    return expr


def test_the_dashboard_imports_anywhere():
    """A fixed uid, a recent schema, and the data source chosen with a `datasource` variable
    of Prometheus data sources: no `${DS_…}` input that only the import dialog can fill in."""
    board = dashboard()
    text = DASHBOARD.read_text()
    assert board["uid"] == "training-sidecar"
    assert board["schemaVersion"] >= 39  # Grafana 11.0
    assert "__inputs" not in board and "${DS_" not in text
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    chosen = {"type": "prometheus", "uid": "${datasource}"}
    ids = []
    for panel in panels(board):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == chosen, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == chosen, panel["title"]
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == chosen, variable["name"]


def test_the_dashboard_shows_what_the_issue_asks_for():
    """Progress, speed, silence against the allowance, verdicts by kind and class, restarts
    and the budget left, checkpoint age against the bound, and the GPU."""
    queries = dashboard_queries(dashboard())
    used = queried_names(query.expr for query in queries)
    wanted = {
        "training_sidecar_last_step",
        "training_sidecar_max_steps",
        "training_sidecar_steps_per_second",
        "training_sidecar_last_progress_age_seconds",
        "training_sidecar_stall_allowance_seconds",
        "training_sidecar_stalls_total",
        "training_sidecar_crashes_total",
        "training_sidecar_restarts_total",
        "training_sidecar_run_recoveries",
        "training_sidecar_max_restarts",
        "training_sidecar_last_checkpoint_age_seconds",
        "training_sidecar_max_lost_work_seconds",
        "training_sidecar_gpu_utilization_ratio",
        "training_sidecar_gpu_memory_used_bytes",
        "training_sidecar_gpu_power_watts",
    }
    assert wanted - used == set()
    budget_left = "training_sidecar_max_restarts{{{0}}} - training_sidecar_run_recoveries{{{0}}}"
    selector = 'job=~"$job",instance=~"$instance"'
    assert budget_left.format(selector) in [query.expr for query in queries]


def _check_as_recording_rules(
    promtool: str, folder: Path, queries: list[Query]
) -> subprocess.CompletedProcess[str]:
    rules = [
        {"record": f"dashboard:query_{number}", "expr": query.expr}
        for number, query in enumerate(queries)
    ]
    (folder / "dashboard.rules.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False)
    )
    return run_promtool(promtool, "check", "rules", "dashboard.rules.yaml", cwd=folder)


def test_every_dashboard_query_is_valid_promql(promtool: str, tmp_path: Path):
    """Each query, as Grafana sends it, passes promtool as the expression of a recording
    rule; and a query with a syntax error would not."""
    board = dashboard()
    names = [variable["name"] for variable in board["templating"]["list"]]
    queries = [
        Query(query.where, as_prometheus_sees_it(query.expr, names))
        for query in dashboard_queries(board)
    ]
    result = _check_as_recording_rules(promtool, tmp_path, queries)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout

    broken = [Query("broken", "sum by (le (rate(training_sidecar_crashes_total[5m]))")]
    assert _check_as_recording_rules(promtool, tmp_path, broken).returncode != 0


# --- the names against a real sidecar's /metrics ----------------------------------------------


@dataclass
class Exposition:
    """What a sidecar exported over a whole run: each sample name with its label sets, and
    the type of each family (a sample name maps to the family it belongs to)."""

    labels: dict[str, set[tuple[tuple[str, str], ...]]] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)

    def add(self, body: str) -> None:
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                self.labels.setdefault(sample.name, set()).add(tuple(sorted(sample.labels.items())))
                self.types[sample.name] = family.type


def queried_names(expressions: Iterable[str]) -> set[str]:
    return {name for expr in expressions for name in METRIC_NAME.findall(expr)}


def problems(expressions: Iterable[str], exposition: Exposition) -> list[str]:
    """What a query asks for that the sidecar does not export: a name, a label value matched
    with = (or a plain alternation with =~), or a gauge given to rate() or increase()."""
    found = []
    expressions = list(expressions)
    for name in sorted(queried_names(expressions) - set(exposition.labels)):
        found.append(f"{name} is not exported")
    for expr in expressions:
        for name, matchers in re.findall(r"(training_sidecar_\w+)\{([^}]*)\}", expr):
            exported = {pair for labels in exposition.labels.get(name, ()) for pair in labels}
            for label, operator, value in re.findall(r'(\w+)\s*(=~|!~|=|!=)\s*"([^"]*)"', matchers):
                if label in ("job", "instance") or operator not in ("=", "=~"):
                    continue
                if operator == "=~" and not re.fullmatch(r"[\w|]+", value):
                    continue  # a real regex, or a dashboard variable
                for one in value.split("|"):
                    if (label, one) not in exported:
                        found.append(f'{name} has no series with {label}="{one}"')
        for name in re.findall(r"\b(?:rate|increase|irate)\(\s*(training_sidecar_\w+)", expr):
            kind = exposition.types.get(name)
            if kind is not None and kind not in ("counter", "histogram"):
                found.append(f"{name} is a {kind}: rate() and increase() need a counter")
    return found


class Scraper(threading.Thread):
    """Scrapes /metrics every 0.1 s while the sidecar runs, keeping everything it saw."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.exposition = Exposition()
        self.scrapes = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    body = response.read().decode()
            except (urllib.error.URLError, OSError):
                continue  # not listening yet, or already gone
            self.exposition.add(body)
            self.scrapes += 1


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exposition:
    """A real sidecar on the simulator, with a stand-in NVML reporting one busy GPU that
    draws 250 W, training a run that saves state every 6 steps; scraped all along."""
    folder = tmp_path_factory.mktemp("exposition")
    try:
        library = build_fake_nvml(folder / "nvml")
    except CompilerMissing as error:
        _unavailable(f"the GPU series need the fake NVML library: {error}")
    gpu_state = folder / "gpu.state"
    gpu_state.write_text(f"util=97\nmem_used={20 << 30}\npower_mw=250000\n")
    tree = build_fluxgym_tree(folder / "fluxgym", extra_trainer_args="--save_every_n_steps 6")
    port = free_port()
    scraper = Scraper(port)
    scraper.start()
    try:
        run = run_sidecar(
            tree,
            settings={
                "SIDECAR_HTTP_PORT": str(port),
                "LD_LIBRARY_PATH": str(library.parent),
                STATE_FILE_VARIABLE: str(gpu_state),
            },
            # 64 steps of 0.15 s: long enough for a state to settle and be seen by the
            # checkpoint age (rescanned every 5 s) while the run goes on.
            simulation={"SIM_STEP_SECONDS": "0.15"},
        )
    finally:
        scraper.done.set()
        scraper.join()
    assert run.exit_code == 0, run.stderr[-2000:]
    assert scraper.scrapes > 10, "the sidecar was hardly scraped"
    return scraper.exposition


def rule_expressions() -> list[str]:
    return [rule["expr"] for rule in rules_by_alert().values()]


def dashboard_expressions() -> list[str]:
    return [query.expr for query in dashboard_queries(dashboard())]


@pytest.mark.slow
def test_the_dashboard_queries_only_what_the_sidecar_exports(exported: Exposition):
    """A renamed metric, label or label value in metrics.py fails here."""
    assert problems(dashboard_expressions(), exported) == []


@pytest.mark.slow
def test_the_rules_query_only_what_the_sidecar_exports(exported: Exposition):
    """The same for the alert rules (`up` is Prometheus's own, not the sidecar's)."""
    assert problems(rule_expressions(), exported) == []


@pytest.mark.slow
def test_the_run_exported_every_series_the_checks_rely_on(exported: Exposition):
    """The run was rich enough for the two checks above to mean something: the optional
    gauges (GPU, checkpoint age, allowance, lost-work bound) were all seen."""
    used = queried_names(dashboard_expressions() + rule_expressions())
    assert len(used) >= 20
    for name in (
        "training_sidecar_gpu_power_watts",
        "training_sidecar_last_checkpoint_age_seconds",
        "training_sidecar_stall_allowance_seconds",
        "training_sidecar_max_lost_work_seconds",
        "training_sidecar_remaining_seconds",
    ):
        assert name in exported.labels, name


def test_the_name_check_can_fail():
    """A query of a name the sidecar lacks, a counter without `_total`, a histogram without
    its suffix, an unknown label value and a rate() of a gauge are each reported."""
    exposition = Exposition()
    exposition.add(
        "# TYPE training_sidecar_stalls_total counter\n"
        'training_sidecar_stalls_total{diagnosis="unknown"} 0.0\n'
        "# TYPE training_sidecar_poll_duration_seconds histogram\n"
        'training_sidecar_poll_duration_seconds_bucket{le="+Inf"} 3.0\n'
        "training_sidecar_poll_duration_seconds_count 3.0\n"
        "training_sidecar_poll_duration_seconds_sum 0.01\n"
        "# TYPE training_sidecar_last_step gauge\n"
        "training_sidecar_last_step 12.0\n"
    )
    fine = [
        'increase(training_sidecar_stalls_total{diagnosis="unknown"}[5m])',
        "rate(training_sidecar_poll_duration_seconds_count[5m])",
        "training_sidecar_last_step",
    ]
    assert problems(fine, exposition) == []
    assert problems(
        [
            "training_sidecar_stall_total",
            "increase(training_sidecar_stalls[5m])",
            "rate(training_sidecar_poll_duration_seconds[5m])",
            'training_sidecar_stalls_total{diagnosis="dataloader"}',
            "rate(training_sidecar_last_step[5m])",
        ],
        exposition,
    ) == [
        "training_sidecar_poll_duration_seconds is not exported",
        "training_sidecar_stall_total is not exported",
        "training_sidecar_stalls is not exported",
        'training_sidecar_stalls_total has no series with diagnosis="dataloader"',
        "training_sidecar_last_step is a gauge: rate() and increase() need a counter",
    ]
