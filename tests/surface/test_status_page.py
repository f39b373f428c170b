"""The status page: its model from the run's real files, hostile text rendered safely, and
the HTTP routes (page, fragment, JSON, assets, token) on a real server."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry
from state_factory import write_state_folder

from sidecar.config import Settings
from sidecar.decide.decision import Verdict, VerdictKind
from sidecar.run.ledger import Ledger, LedgerStore
from sidecar.run.paths import RunPaths, resolve_run_paths
from sidecar.simulator.fluxgym_tree import FluxgymTree, build_fluxgym_tree
from sidecar.surface.health import Health
from sidecar.surface.history import Mark, Sample
from sidecar.surface.http_server import SurfaceServer, start_http_surface
from sidecar.surface.incidents import IncidentRecorder, IncidentSources
from sidecar.surface.page.model import PageModel, PageSources, StatusPage, build_model
from sidecar.surface.page.render import render_live, render_page
from sidecar.surface.step_rate import Speed
from sidecar.trainers.sd_scripts.launch_script import rewrite_train_script
from sidecar.wiring import recovery_rules_of

NOW = time.time()
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
# Breaks out of a double-quoted attribute when quotes are not escaped.
IN_ATTRIBUTE = 'x" onmouseover="alert(1)" data-x="'


def snapshot(**changes: Any) -> dict[str, Any]:
    return {
        "phase": "running",
        "section": "training",
        "seconds_since_progress": 4.0,
        "stall_allowance": 61.0,
        "last_step": 120,
        "total_steps": 400,
        **changes,
    }


def sources(paths: RunPaths | None, **changes: Any) -> PageSources:
    settings = Settings(train_script=paths.train_script) if paths else Settings()
    return PageSources(
        snapshot=lambda: snapshot(**changes),
        paths=lambda: paths,
        speed=lambda: Speed(step=120, total=400, steps_per_second=0.5, eta_seconds=560.0),
        history=lambda: (
            [Sample(NOW - 60, 100, 400, 97.0, 280.0), Sample(NOW, 120, 400, 98.0, 290.0)],
            [
                Mark(NOW - 30, "stall", "stall detected; diagnosis: dataloader_wait"),
                Mark(NOW - 20, "restart", "trainer restarted"),
            ],
        ),
        mode="exec",
        rules=recovery_rules_of(settings),
        checkpoint_settle=settings.checkpoint_settle,
    )


def write_recovered_run(tree: FluxgymTree) -> RunPaths:
    """A run that stalled once, has a quarantined state, one being written and one broken,
    and whose train.sh the sidecar pointed at a complete state."""
    out = tree.output_dir
    write_state_folder(out / "my-lora-step00000100-state", step=100, mtime=NOW - 900)
    write_state_folder(out / "my-lora-step00000110-state", step=110, mtime=NOW - 600)
    write_state_folder(out / "my-lora-step00000118-state", step=118, mtime=NOW - 300)
    write_state_folder(
        out / "my-lora-step00000090-state", step=90, mtime=NOW - 1200, omit={"scheduler.bin"}
    )
    write_state_folder(out / "my-lora-step00000124-state", step=124, mtime=time.time())
    ledger = Ledger()
    ledger.record_recovery("stall", "no progress for 62 s", None, diagnosis="dataloader_wait")
    ledger.quarantined.append(str(out / "my-lora-step00000118-state"))
    LedgerStore(out / ".sidecar").save(ledger)
    rewrite_train_script(
        tree.train_script,
        resume_from=str(out / "my-lora-step00000110-state"),
        ensure_save_state=True,
    )
    log = out / "train.log"
    log.write_bytes(b"epoch 1/16\nbad byte \xff\xfe here\n" + HOSTILE.encode() + b"\n")
    source = IncidentSources(state_dir=out / ".sidecar", train_log=log, pids=[])
    IncidentRecorder(lambda: source, keep=5).save(
        Verdict(VerdictKind.STALL, "no progress for 62 s", {}), {"section": "training"}
    )
    return resolve_run_paths(Settings(train_script=tree.train_script))


@pytest.fixture
def run_paths(fluxgym: FluxgymTree) -> RunPaths:
    return write_recovered_run(fluxgym)


def test_the_model_tells_each_checkpoint_s_verdict_and_the_one_train_sh_resumes(
    run_paths: RunPaths,
) -> None:
    model = build_model(sources(run_paths), time.time())
    verdicts = {row.name: row.verdict for row in model.checkpoints}
    assert verdicts == {
        "my-lora-step00000124-state": "still written",
        "my-lora-step00000118-state": "quarantined",
        "my-lora-step00000110-state": "complete",
        "my-lora-step00000100-state": "complete",
        "my-lora-step00000090-state": "incomplete",
    }
    assert [row.name for row in model.checkpoints if row.resumed] == ["my-lora-step00000110-state"]
    broken = next(row for row in model.checkpoints if row.verdict == "incomplete")
    assert "scheduler.bin" in broken.why
    assert model.resumes_from == str(run_paths.output_dir / "my-lora-step00000110-state")
    added = [line for line in (model.script_diff or "").splitlines() if line.startswith("+")]
    assert any("--resume" in line and "step00000110-state" in line for line in added), added
    assert model.restarts == 1 and model.relaunches == 1
    assert model.incidents[0].kind == "stall" and model.incidents[0].diagnosis
    assert "bad byte \ufffd\ufffd here" in model.incidents[0].log_tail
    assert (model.section, model.allowance_seconds) == ("training", 61.0)


def test_a_broken_ledger_is_said_on_the_page_not_hidden(run_paths: RunPaths) -> None:
    (run_paths.state_dir / "state.json").write_text("{not json")
    model = build_model(sources(run_paths), time.time())
    assert model.problems and "state.json" in model.problems[0]
    assert 'id="problems"' in render_page(model)


class Page(HTMLParser):
    """The page as a browser's parser sees it: ids, scripts, and text inside elements."""

    def __init__(self, html: str):
        super().__init__()
        self.ids: dict[str, str] = {}
        self.scripts: list[dict[str, str | None]] = []
        self.handlers: list[str] = []
        self.attributes: list[dict[str, str | None]] = []
        self.text: list[str] = []
        self._open: list[tuple[str, str | None]] = []  # (tag, id) of the elements we are in
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        self.attributes.append(named)
        if tag == "script":
            self.scripts.append(named)
        self.handlers += [name for name, _ in attrs if name.startswith("on")]
        if "id" in named:
            self.ids[str(named["id"])] = ""
        if tag not in _VOID:
            self._open.append((tag, named.get("id")))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handlers += [name for name, _ in attrs if name.startswith("on")]
        self.attributes.append(dict(attrs))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for _, name in self._open:
            if name is not None:
                self.ids[name] += data


_VOID = {"meta", "link", "br", "img", "input", "hr"}


def test_hostile_names_logs_and_paths_are_shown_as_text(tmp_path: Path) -> None:
    paths = write_recovered_run(build_fluxgym_tree(tmp_path / "t"))
    long_line = "A" * 100_000
    (paths.output_dir / "train.log").write_text(f"{HOSTILE}\n{long_line}\n")
    model = build_model(sources(paths), time.time())
    hostile = PageModel(
        **{
            **model.__dict__,
            # FluxGym makes names slugs, a hand-written train.sh need not.
            "run": 'evil"><script>alert(1)</script>',
            "train_script": f"/outputs/{HOSTILE}/train.sh",
            "phase": IN_ATTRIBUTE,  # lands in a class attribute
            "marks": [Mark(NOW, IN_ATTRIBUTE, HOSTILE)],  # the kind: data-kind
            "problems": [HOSTILE],
            "checkpoints": [  # the name: data-checkpoint
                row.__class__(**{**row.__dict__, "name": IN_ATTRIBUTE, "why": HOSTILE})
                for row in model.checkpoints
            ],
            "incidents": [
                incident.__class__(
                    **{
                        **incident.__dict__,
                        "log_tail": f"{HOSTILE}\n{long_line}",
                        "stacks": HOSTILE,
                        "reason": HOSTILE,
                        "name": IN_ATTRIBUTE,  # data-key
                    }
                )
                for incident in model.incidents
            ],
        }
    )
    html = render_page(hostile)
    parsed = Page(html)
    assert parsed.scripts == [{"src": "/assets/page.js", "defer": None}], "only our own script"
    assert parsed.handlers == [], "no event handler attribute got through"
    assert "<script>alert" not in html and "<img src=x" not in html
    assert HOSTILE in "".join(parsed.text), "shown, as text"
    assert parsed.ids["run-name"] == 'evil"><script>alert(1)</script>'
    assert not any("data-x" in element for element in parsed.attributes), "no attribute broke out"
    assert {e["data-checkpoint"] for e in parsed.attributes if "data-checkpoint" in e} == {
        IN_ATTRIBUTE
    }
    assert [e["data-kind"] for e in parsed.attributes if e.get("class") == "marker"] == [
        IN_ATTRIBUTE
    ]
    assert len(html) < 200_000, "a 100 000-character line is cut"
    assert "more characters)" in html


def test_invalid_utf8_and_lone_surrogates_reach_the_browser_as_valid_utf8(
    run_paths: RunPaths,
) -> None:
    model = build_model(sources(run_paths), time.time())
    surrogate = PageModel(**{**model.__dict__, "problems": ["a \udcff byte kept as it was"]})
    with serving(StaticPage(surrogate)) as server:
        status, _, body = get(server, "/")
    assert status == 200
    assert "a ? byte kept" in body.decode("utf-8")  # strict decode: valid UTF-8


def test_without_javascript_the_first_html_is_the_whole_page(run_paths: RunPaths) -> None:
    model = build_model(sources(run_paths), time.time())
    html = render_page(model)
    parsed = Page(html)
    for element in (
        "run-name",
        "phase",
        "section",
        "step",
        "chart",
        "checkpoints",
        "train-script-diff",
        "budget",
        "incidents",
        "relaunch-notice",
    ):
        assert element in parsed.ids, element
    assert parsed.ids["step"] == "120 / 400"
    assert parsed.ids["budget"].startswith("1 of 10 restarts used")
    assert 'http-equiv="refresh"' in html.split("<noscript>")[1].split("</noscript>")[0]
    assert render_live(model) in html, "the fragment is the page's <main>"
    assert 'data-kind="restart"' in html and 'class="progress"' in html


def test_no_run_yet_is_a_page_too() -> None:
    html = render_page(build_model(sources(None), time.time()))
    assert Page(html).ids["run-name"] == "No run yet"


# -- HTTP -----------------------------------------------------------------------------------


class StaticPage(StatusPage):
    """A page over a model the test built itself."""

    def __init__(self, model: PageModel):
        self._model = model

    def model(self) -> PageModel:
        return self._model


class serving:
    def __init__(
        self, page: StatusPage | None, token: str | None = None, page_hosts: tuple[str, ...] = ()
    ):
        self.server = start_http_surface(
            port=0,
            host="127.0.0.1",
            registry=CollectorRegistry(),
            health=lambda: Health(True, "fine"),
            ready=lambda: True,
            log=structlog.get_logger(),
            page=page,
            token=token,
            page_hosts=page_hosts,
        )

    def __enter__(self) -> SurfaceServer:
        return self.server

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


def get(
    server: SurfaceServer, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture
def page(run_paths: RunPaths) -> Iterator[SurfaceServer]:
    with serving(StatusPage(sources(run_paths))) as server:
        yield server


def test_the_page_its_fragment_its_json_and_its_assets(page: SurfaceServer) -> None:
    status, headers, body = get(page, "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert b'<main id="live"' in body
    status, headers, fragment = get(page, "/?fragment=live")
    assert status == 200 and not fragment.startswith(b"<!doctype")
    assert b'id="run-name"' in fragment and headers["X-Rendered-At"].isdigit()
    status, _, data = get(page, "/status.json")
    model = json.loads(data)
    verdicts = {row["name"]: row["verdict"] for row in model["checkpoints"]}
    assert model["run"] == "my-lora" and verdicts["my-lora-step00000124-state"] == "still written"
    for asset, kind in (("page.js", "text/javascript"), ("page.css", "text/css")):
        status, headers, content = get(page, f"/assets/{asset}")
        assert status == 200 and headers["Content-Type"].startswith(kind) and content


@pytest.mark.parametrize(
    "path", ["/assets/", "/assets/../model.py", "/assets/%2e%2e/model.py", "/assets", "/x"]
)
def test_nothing_else_is_served(page: SurfaceServer, path: str) -> None:
    assert get(page, path)[0] == 404


def test_with_a_token_only_the_probes_are_open(run_paths: RunPaths) -> None:
    with serving(StatusPage(sources(run_paths)), token="s3cr3t-tok") as server:
        for path in ("/", "/status.json", "/metrics", "/?fragment=live", "/assets/page.js"):
            status, headers, _ = get(server, path)
            assert status == 401, path
            assert headers["WWW-Authenticate"].startswith("Basic realm=")
        assert get(server, "/healthz")[0] == 200 and get(server, "/readyz")[0] == 200
        basic = base64.b64encode(b"anyone:s3cr3t-tok").decode()
        assert get(server, "/", {"Authorization": f"Basic {basic}"})[0] == 200
        assert get(server, "/metrics", {"Authorization": "Bearer s3cr3t-tok"})[0] == 200
        wrong = base64.b64encode(b"anyone:s3cr3t").decode()
        assert get(server, "/", {"Authorization": f"Basic {wrong}"})[0] == 401
        assert get(server, "/", {"Authorization": "Bearer s3cr3t-tok-and-more"})[0] == 401
        assert get(server, "/", {"Authorization": "Basic %%%"})[0] == 401


def test_a_page_that_fails_to_build_answers_500_and_the_probes_go_on(run_paths: RunPaths) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("snapshot exploded")

    page = StatusPage(PageSources(**{**sources(run_paths).__dict__, "snapshot": broken}))
    with serving(page) as server:
        status, _, body = get(server, "/")
        assert status == 500 and b"snapshot exploded" in body
        assert get(server, "/healthz")[0] == 200


def test_ten_browsers_at_once_cost_one_build(run_paths: RunPaths) -> None:
    builds = []

    def counted() -> dict[str, Any]:
        builds.append(1)
        time.sleep(0.2)  # a slow build: the others arrive while it runs
        return snapshot()

    page = StatusPage(
        PageSources(**{**sources(run_paths).__dict__, "snapshot": counted}), max_age=60
    )
    with serving(page) as server, ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: get(server, "/")[0], range(10)))
    assert answers == [200] * 10
    assert len(builds) == 1


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("localhost:9477", 200),
        ("127.0.0.1:9477", 200),
        ("[::1]:9477", 200),
        ("10.0.0.7:9477", 200),
        ("gpu-box:9477", 200),  # SIDECAR_PAGE_URL's host
        ("attacker.example:9477", 403),  # a rebound name
        ("", 403),
    ],
)
def test_without_a_token_the_page_answers_only_to_names_no_other_site_controls(
    run_paths: RunPaths, host: str, status: int
) -> None:
    page = StatusPage(sources(run_paths))
    with serving(page, page_hosts=("gpu-box",)) as server:
        assert get(server, "/status.json", {"Host": host})[0] == status
        assert get(server, "/metrics", {"Host": host})[0] == 200, "scrapes by service name"
    with serving(page, token="t0k") as server:
        bearer = {"Host": host, "Authorization": "Bearer t0k"}
        assert get(server, "/status.json", bearer)[0] == 200, "a token is proof enough"


def test_the_state_folders_are_scanned_again_only_when_the_last_scan_is_stale(
    run_paths: RunPaths,
) -> None:
    clock = [1000.0]
    page = StatusPage(sources(run_paths), max_age=0, monotonic=lambda: clock[0])
    out = run_paths.output_dir
    shutil.rmtree(out / "my-lora-step00000124-state")  # one still written is rescanned anyway

    def verdicts() -> dict[str, str]:
        return {row.name: row.verdict for row in page.model().checkpoints}

    assert verdicts()["my-lora-step00000100-state"] == "complete"
    # Rewritten in place (the folder's name reused after a resume): nothing in the output
    # folder itself changed, so the scan is kept up to 60 s.
    (out / "my-lora-step00000100-state" / "scheduler.bin").unlink()
    os.utime(out, ns=(1, out.stat().st_mtime_ns))  # the unlink touched a subfolder only
    clock[0] += 59
    assert verdicts()["my-lora-step00000100-state"] == "complete"
    clock[0] += 1
    assert verdicts()["my-lora-step00000100-state"] == "incomplete"
    # A new folder changes the output folder: seen at once.
    write_state_folder(out / "my-lora-step00000200-state", step=200, mtime=NOW - 100)
    assert verdicts()["my-lora-step00000200-state"] == "complete"
    # train.sh pointed elsewhere (a recovery): at once, with the row it points at.
    rewrite_train_script(
        run_paths.train_script,
        resume_from=str(out / "my-lora-step00000200-state"),
        ensure_save_state=True,
    )
    rows = page.model().checkpoints
    assert [row.name for row in rows if row.resumed] == ["my-lora-step00000200-state"]


def test_a_state_still_being_written_is_looked_at_again_once_it_can_have_settled(
    run_paths: RunPaths,
) -> None:
    clock = [1000.0]
    page = StatusPage(sources(run_paths), max_age=0, monotonic=lambda: clock[0])
    name = "my-lora-step00000124-state"
    assert {r.name: r.verdict for r in page.model().checkpoints}[name] == "still written"
    os.utime(run_paths.output_dir / name, (NOW - 60, NOW - 60))
    for file in (run_paths.output_dir / name).iterdir():
        os.utime(file, (NOW - 60, NOW - 60))
    clock[0] += 10  # SIDECAR_CHECKPOINT_SETTLE's default
    assert {r.name: r.verdict for r in page.model().checkpoints}[name] == "complete"


def test_a_thousand_states_show_the_newest_and_the_one_train_sh_resumes(fluxgym) -> None:
    out = fluxgym.output_dir
    for step in range(1, 41):
        write_state_folder(
            out / f"my-lora-step{step:08d}-state", step=step, mtime=NOW - 9000 + step
        )
    rewrite_train_script(
        fluxgym.train_script,
        resume_from=str(out / "my-lora-step00000001-state"),
        ensure_save_state=True,
    )
    paths = resolve_run_paths(Settings(train_script=fluxgym.train_script))
    model = build_model(sources(paths), time.time())
    names = [row.name for row in model.checkpoints]
    assert names[0] == "my-lora-step00000040-state" and len(names) == 31
    assert names[-1] == "my-lora-step00000001-state" and model.checkpoints[-1].resumed
    assert model.checkpoints_total == 40
    assert "9 older state folders not shown" in render_live(model)


def test_an_earlier_run_s_states_are_told_apart(run_paths: RunPaths) -> None:
    ledger = LedgerStore(run_paths.state_dir).load()
    ledger.run_started_at = NOW - 700  # after step 100 was saved, before step 110
    LedgerStore(run_paths.state_dir).save(ledger)
    verdicts = {
        row.name: row.verdict for row in build_model(sources(run_paths), time.time()).checkpoints
    }
    assert verdicts["my-lora-step00000100-state"] == "earlier run"
    assert verdicts["my-lora-step00000110-state"] == "complete"


@pytest.mark.parametrize(
    ("mode", "checkpoint", "says", "never"),
    [
        ("exec", "/o/a-state", "Training Complete", "from the start"),
        ("exec", None, "from the start (no complete checkpoint was left)", "newest complete"),
        ("pod", "/o/a-state", "from its newest complete checkpoint", "FluxGym"),
    ],
)
def test_the_relaunch_notice_tells_how_the_run_went_on(
    run_paths: RunPaths, mode: str, checkpoint: str | None, says: str, never: str
) -> None:
    model = build_model(sources(run_paths), time.time())
    recovery = {**model.recoveries[0], "checkpoint": checkpoint}
    told = Page(
        render_live(PageModel(**{**model.__dict__, "mode": mode, "recoveries": [recovery]}))
    )
    assert says in told.ids["relaunch-notice"] and never not in told.ids["relaunch-notice"]


def test_the_chart_stops_its_lines_where_the_sidecar_was_away() -> None:
    from sidecar.surface.page.chart import render_chart

    every_2_s = [Sample(NOW + 2 * i, i, 100, 90.0, None) for i in range(10)]
    after_an_hour = [Sample(NOW + 3600 + 2 * i, 10 + i, 100, 90.0, None) for i in range(10)]
    svg = render_chart(every_2_s + after_an_hour, [], NOW + 3700)
    assert svg.count('class="progress"') == 2
    assert render_chart(every_2_s, [], NOW + 30).count('class="progress"') == 1
