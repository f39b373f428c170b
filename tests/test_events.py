"""Event names: one constant each in sidecar/events.py, the README's contract, and the
events metrics and webhooks react to.

A misspelt event name fails nowhere on its own: the log line just carries another name, a
counter stays at 0 and a webhook never fires. These tests make the names checkable.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from repo_paths import REPO_ROOT

from sidecar import events
from sidecar.surface import metrics, notifications

PACKAGE = REPO_ROOT / "sidecar"
# The simulator stands in for the trainer and prints the trainer's output, not our events.
NOT_SCANNED = (PACKAGE / "simulator",)
LOG_METHODS = frozenset({"debug", "info", "warning", "error", "exception", "critical"})
# The restarters get ``log.info`` itself as a callable named log or _log.
LOG_CALLABLES = frozenset({"log", "_log"})
REACTING_MODULES = (metrics, notifications)
CONSTANTS = {
    name: value for name, value in vars(events).items() if name.isupper() and isinstance(value, str)
}


@dataclass(frozen=True)
class LogCall:
    path: Path
    line: int
    call: str  # the called expression, as written
    event: ast.expr  # what is passed as the event name

    def __str__(self) -> str:
        literal = self.event.value if isinstance(self.event, ast.Constant) else None
        constant = next((n for n, v in CONSTANTS.items() if v == literal), None)
        hint = f"events.{constant}" if constant else "a new constant in sidecar/events.py"
        where = self.path.relative_to(REPO_ROOT)
        return f"{where}:{self.line}: {self.call}({ast.unparse(self.event)}, ...): use {hint}"


def package_modules() -> list[Path]:
    return sorted(
        path
        for path in PACKAGE.rglob("*.py")
        if not any(path.is_relative_to(folder) for folder in NOT_SCANNED)
    )


def is_logger(expression: ast.expr) -> bool:
    """``log``, ``self.log``, ``self._log``, ``self.server.log``, ``logger``,
    ``structlog.get_logger()``: the last name in it mentions a log."""
    if isinstance(expression, ast.Call):
        expression = expression.func
    if isinstance(expression, ast.Attribute):
        return "log" in expression.attr.lower()
    return isinstance(expression, ast.Name) and "log" in expression.id.lower()


def log_calls(path: Path, source: str | None = None) -> Iterator[LogCall]:
    """The logging calls in a module (``source``: its text instead of the file's)."""
    text = path.read_text(encoding="utf-8") if source is None else source
    for node in ast.walk(ast.parse(text, str(path))):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        if isinstance(function, ast.Attribute):
            logging = (function.attr in LOG_METHODS and is_logger(function.value)) or (
                function.attr in LOG_CALLABLES
            )
        else:
            logging = isinstance(function, ast.Name) and function.id in LOG_CALLABLES
        if not logging:
            continue
        event = node.args[0] if node.args else None
        event = event or next((k.value for k in node.keywords if k.arg == "event"), None)
        if event is not None:
            yield LogCall(path, node.lineno, ast.unparse(function), event)


def is_literal(expression: ast.expr) -> bool:
    return isinstance(expression, ast.JoinedStr) or (
        isinstance(expression, ast.Constant) and isinstance(expression.value, str)
    )


def event_constant(expression: ast.expr) -> str | None:
    """``X`` for ``events.X``."""
    if (
        isinstance(expression, ast.Attribute)
        and isinstance(expression.value, ast.Name)
        and expression.value.id == "events"
    ):
        return expression.attr
    return None


# -- the constants themselves ------------------------------------------------------------------


def test_each_constant_is_its_name_in_capitals():
    """``STALL_DETECTED = "stall_detcted"`` would pass every other check here."""
    assert {name: value.upper() for name, value in CONSTANTS.items()} == {
        name: name for name in CONSTANTS
    }
    assert frozenset(CONSTANTS.values()) == events.ALL
    assert set(events.CONTRACT) <= events.ALL
    assert len(set(events.CONTRACT)) == len(events.CONTRACT)


# -- (a) every logging call names its event by constant ----------------------------------------


def test_the_scan_sees_the_logging_calls_it_must_judge():
    """Guards the scan itself: a pattern change must not make it find nothing."""
    calls = [call for path in package_modules() for call in log_calls(path)]
    callers = {call.path.relative_to(PACKAGE).as_posix() for call in calls}
    assert {"surface/notifications.py", "observe/gpu.py", "restarters/process.py"} <= callers
    found = list(
        log_calls(
            PACKAGE / "sample.py",
            'log.info("a")\nself._log.warning("b", x=1)\nself._log("c")\n'
            'structlog.get_logger().error(event="d")\nlog.info(events.E)\n'
            'values.info("not a log")\n',
        )
    )
    assert [ast.unparse(call.event) for call in found] == [
        "'a'",
        "'b'",
        "'c'",
        "'d'",
        "events.E",
    ]


def test_logging_calls_name_their_event_by_a_constant():
    """``log.info(events.STALL_DETECTED, ...)``, never ``log.info("stall_detected", ...)``."""
    calls = [call for path in package_modules() for call in log_calls(path)]
    literal = [
        str(call)
        for call in sorted(calls, key=lambda call: (call.path, call.line))
        if is_literal(call.event)
    ]
    assert not literal, f"{len(literal)} event names written as literals:\n" + "\n".join(literal)


def test_logged_constants_exist():
    unknown = [
        str(call)
        for path in package_modules()
        for call in log_calls(path)
        if (name := event_constant(call.event)) is not None and name not in CONSTANTS
    ]
    assert not unknown, "no such constant in sidecar/events.py:\n" + "\n".join(unknown)


# -- (b) the README promises exactly the contract ----------------------------------------------


def readme_events_section() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"^## Events\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert found, "README.md has no '## Events' section"
    return found.group(1)


def names_in(text: str) -> list[str]:
    return re.findall(r"`([a-z_]+)`", text)


def test_the_readme_lists_exactly_the_contract():
    section = readme_events_section()
    contract = re.search(r"contract to alert on:(.*?)\.(?:\s|$)", section, re.DOTALL)
    assert contract, "the Events section no longer says which names are the contract"
    assert names_in(contract.group(1)) == list(events.CONTRACT)


def test_the_trail_events_the_readme_names_exist():
    section = readme_events_section()
    trail = re.search(r"The trail below adds(.*?)\.(?:\s|$)", section, re.DOTALL)
    assert trail, "the Events section no longer lists the trail's events"
    assert set(names_in(trail.group(1))) <= events.ALL


# -- (c) what metrics and webhooks react to exists ---------------------------------------------


def is_event_name(expression: ast.expr) -> bool:
    """``event``, ``name`` or ``<dict>.get("event")``: what holds an event's name there."""
    if isinstance(expression, ast.Name):
        return expression.id in ("event", "name")
    return (
        isinstance(expression, ast.Call)
        and isinstance(expression.func, ast.Attribute)
        and expression.func.attr == "get"
        and bool(expression.args)
        and isinstance(expression.args[0], ast.Constant)
        and expression.args[0].value == "event"
    )


def compared_literals(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """String literals an event name is compared with (``event == "x"``,
    ``name in ("x", "y")``): event names written by hand."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        if not any(is_event_name(side) for side in sides):
            continue
        for side in sides:
            members = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
            for member in members:
                if isinstance(member, ast.Constant) and isinstance(member.value, str):
                    yield node.lineno, member.value


def test_metrics_and_webhooks_react_only_to_known_events():
    problems = []
    for module in REACTING_MODULES:
        path = Path(str(module.__file__))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            name = event_constant(node) if isinstance(node, ast.expr) else None
            if name is not None and name not in CONSTANTS:
                problems.append(f"{path.name}:{node.lineno}: events.{name} does not exist")
        for line, literal in compared_literals(tree):
            problems.append(f"{path.name}:{line}: compares with the literal {literal!r}")
    assert not problems, "\n".join(problems)


def test_the_notified_and_counted_events_are_events():
    assert notifications.NOTIFIED_EVENTS <= events.ALL
    # The notifications counter is labelled with the outcome its event name ends in.
    assert {f"notification_{outcome}" for outcome in metrics.NOTIFICATION_OUTCOMES} <= events.ALL
