"""Experiments through the HTTP API and the live timeline, against a real connector under a
real circusd, served by the real app (no Dynamo here; the run with the real frontend, mocker
and aiperf is in ``tests/test_api_experiments_real.py``).

The API graph's ``Frontend`` is a frontend (componentType) whose replica has no HTTP port,
so an experiment started against it waits for a frontend to send load to (90 s at most):
long enough to see it running, refuse a second one, and cancel it, without aiperf.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from connector.api.experiments import EXPERIMENTS, HISTORY
from connector.api.timeline import TIMELINE
from tests.api_helpers import Served, error_of, serve
from tests.core_helpers import make_graph, svc, wait_until

pytestmark = [pytest.mark.integration]

TOKEN = "exp-token"
PLAN: dict[str, Any] = {
    "name": "burst",
    "seed": 3,
    "tokenizer": "some-org/some-tokenizer",
    "cooldown": 5,
    "phases": [
        {"name": "up", "concurrency": 4, "inputTokens": 100, "outputTokens": 20, "duration": 10},
        {
            "name": "calm",
            "requestRate": 0.5,
            "arrival": "constant",
            "inputTokens": {"mean": 100, "stddev": 10},
            "outputTokens": 20,
            "duration": 20,
        },
    ],
}


@pytest.fixture
async def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    # aiperf itself is never reached here (no frontend serves); any executable will do.
    monkeypatch.setenv("AIPERF", "/bin/true")
    async with serve(tmp_path, token=TOKEN) as served:
        yield served


async def _post(api: Served, plan: Any = PLAN, **kw: Any) -> tuple[int, Any, Any]:
    return await api.call("POST", "/v1/experiments", body=plan, token=TOKEN, **kw)


async def _until_state(api: Served, run_id: str, state: str, limit_s: float = 20.0) -> Any:
    deadline = time.monotonic() + limit_s
    while True:
        status, body, _ = await api.call("GET", f"/v1/experiments/{run_id}")
        assert status == 200, body
        if body["state"] == state or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.05)


async def test_start_follow_refuse_a_second_and_cancel(api: Served, tmp_path: Path) -> None:
    status, body, resp = await _post(api)
    assert status == 202, body
    run_id = body["id"]
    assert run_id.startswith("burst-")
    assert resp.headers["Location"] == f"/v1/experiments/{run_id}"
    assert body["state"] == "running"
    assert body["phase"] == "waiting for the frontend"
    assert body["name"] == "burst"
    assert body["progress"] == {"done_s": 0.0, "total_s": 35.0, "fraction": 0.0}
    assert body["folder"] == str(tmp_path / "experiments" / run_id)
    assert [p["name"] for p in body["phases"]] == ["up", "calm"]
    assert body["phases"][1]["description"] == "calm: 0.5 req/s for 20 s"
    assert body["phases"][0]["start"] is None
    assert body["latest_sample"] is None and body["summary"] is None
    assert body["error"] is None and body["report"] is None

    status, listing, _ = await api.call("GET", "/v1/experiments")
    assert status == 200
    assert listing["running"] == run_id and listing["kept"] == HISTORY
    assert [r["id"] for r in listing["experiments"]] == [run_id]
    assert "latest_sample" not in listing["experiments"][0]

    status, again, _ = await _post(api)
    assert status == 409
    error = error_of(again)
    assert error["code"] == "experiment_running"
    assert error["details"] == {"running": run_id, "name": "burst"}
    assert run_id in error["message"]

    status, report, _ = await api.call("GET", f"/v1/experiments/{run_id}/report")
    assert status == 409
    assert error_of(report)["code"] == "experiment_running"
    assert error_of(report)["details"] == {
        "experiment": run_id,
        "phase": "waiting for the frontend",
    }

    status, cancelled, _ = await api.call("DELETE", f"/v1/experiments/{run_id}", token=TOKEN)
    assert status == 200, cancelled
    assert cancelled["state"] == "cancelled"
    assert cancelled["phase"] is None and cancelled["finished_at"] is not None
    # Cancelled before anything was sampled: the folder holds the plan, there is no report.
    folder = Path(cancelled["folder"])
    assert sorted(p.name for p in folder.iterdir()) == ["plan.yaml"]
    assert yaml.safe_load((folder / "plan.yaml").read_text()) == PLAN

    status, listing, _ = await api.call("GET", "/v1/experiments")
    assert listing["running"] is None
    assert listing["experiments"][0]["state"] == "cancelled"

    status, gone, _ = await api.call("DELETE", f"/v1/experiments/{run_id}", token=TOKEN)
    assert status == 409
    assert error_of(gone)["code"] == "experiment_finished"
    assert error_of(gone)["details"] == {"experiment": run_id, "state": "cancelled"}
    status, report, _ = await api.call("GET", f"/v1/experiments/{run_id}/report")
    assert status == 404
    assert error_of(report)["code"] == "no_report"
    assert error_of(report)["details"] == {"experiment": run_id, "state": "cancelled"}

    # One at a time, not one ever: the next one starts, in a folder of its own.
    status, second, _ = await _post(api)
    assert status == 202
    assert second["id"] != run_id and second["id"].startswith("burst-")
    status, _, _ = await api.call("DELETE", f"/v1/experiments/{second['id']}", token=TOKEN)
    assert status == 200


async def test_a_yaml_plan_is_kept_as_written(api: Served) -> None:
    text = "# as a file would say it\n" + yaml.safe_dump(PLAN, sort_keys=False)
    status, body, _ = await api.call(
        "POST",
        "/v1/experiments",
        raw=text.encode(),
        headers={"Content-Type": "application/yaml"},
        token=TOKEN,
    )
    assert status == 202, body
    status, _, _ = await api.call("DELETE", f"/v1/experiments/{body['id']}", token=TOKEN)
    assert status == 200
    assert (Path(body["folder"]) / "plan.yaml").read_text() == text


@pytest.mark.parametrize(
    ("plan", "field", "message"),
    [
        (
            {**PLAN, "phases": [{**PLAN["phases"][0], "concurrency": 0}]},
            "phases[0].concurrency",
            "plan: phases[0].concurrency: must be >= 1, got 0",
        ),
        (
            {**PLAN, "requestrate": 2},
            "requestrate",
            "plan: requestrate: unknown key; known: name, seed, tokenizer, model, "
            "prometheus, interval, window, gracePeriod, cooldown, slo, phases",
        ),
        (
            {k: v for k, v in PLAN.items() if k != "tokenizer"},
            "tokenizer",
            "plan: tokenizer: required: the model's tokenizer, as a local folder (relative "
            "to the plan) or a Hugging Face id (fetched from the hub); aiperf counts tokens "
            "with it",
        ),
        (
            {**PLAN, "phases": [PLAN["phases"][0], PLAN["phases"][0]]},
            "phases[1].name",
            "plan: phases[1].name: 'up' is already phases[0]",
        ),
        (
            {**PLAN, "phases": [{**PLAN["phases"][0], "duration": 100000}]},
            "phases[0].duration",
            "plan: phases[0].duration: must be <= 86400 seconds, got 100000",
        ),
        ({**PLAN, "phases": []}, "phases", "plan: phases: must list at least one phase"),
    ],
)
async def test_a_bad_plan_is_422_naming_the_field(
    api: Served, plan: dict[str, Any], field: str, message: str
) -> None:
    status, body, _ = await _post(api, plan)
    assert status == 422, body
    error = error_of(body)
    assert error == {"code": "invalid_plan", "message": message, "details": {"field": field}}
    status, listing, _ = await api.call("GET", "/v1/experiments")
    assert listing["experiments"] == []


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "code", "message"),
    [
        (b"[1, 2]", "application/json", 400, "bad_request", "must be a JSON object"),
        (b"{nope", "application/json", 400, "bad_request", "request body is not valid JSON"),
        (b"", "application/json", 400, "bad_request", "needs a JSON body"),
        (
            b"phases: [",
            "application/yaml",
            400,
            "bad_request",
            "request body:1:10: not valid YAML",
        ),
        (
            b"a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
            + b"".join(
                f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n".encode()
                for p, c in zip("abcdefgh", "bcdefghi", strict=True)
            ),
            "application/yaml",
            400,
            "bad_request",
            "request body expands to more than 20000 YAML values",
        ),
        (b"name: x", "text/plain", 415, "unsupported_media_type", "application/yaml"),
    ],
)
async def test_malformed_bodies(
    api: Served, raw: bytes, content_type: str, status: int, code: str, message: str
) -> None:
    got, body, _ = await api.call(
        "POST", "/v1/experiments", raw=raw, headers={"Content-Type": content_type}, token=TOKEN
    )
    assert got == status, body
    error = error_of(body)
    assert error["code"] == code
    assert message in error["message"], error


async def test_mutating_routes_need_the_token_and_unknown_ids(api: Served) -> None:
    status, body, _ = await api.call("POST", "/v1/experiments", body=PLAN)
    assert status == 401 and error_of(body)["code"] == "unauthorized"
    status, body, _ = await api.call("DELETE", "/v1/experiments/burst-1")
    assert status == 401 and error_of(body)["code"] == "unauthorized"
    for method, path in (
        ("GET", "/v1/experiments/burst-1"),
        ("DELETE", "/v1/experiments/burst-1"),
        ("GET", "/v1/experiments/burst-1/report"),
    ):
        status, body, _ = await api.call(method, path, token=TOKEN)
        assert status == 404, (method, body)
        error = error_of(body)
        assert error["code"] == "experiment_not_found"
        assert error["details"] == {"experiment": "burst-1"}
    status, body, _ = await api.call("GET", "/v1/experiments/no%20spaces")
    assert status == 400 and error_of(body)["code"] == "bad_request"


async def test_without_aiperf_it_is_503(api: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIPERF", "/nonexistent/aiperf")
    status, body, _ = await _post(api)
    assert status == 503
    error = error_of(body)
    assert error["code"] == "aiperf_missing"
    assert error["message"] == "$AIPERF names /nonexistent/aiperf, which is not an executable file"
    assert error["details"] == {"feature": "aiperf"}


async def test_a_graph_without_frontend_fails_and_history_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIPERF", "/bin/true")
    graph = make_graph(svc("Worker", replicas=0), name="nofe")
    async with serve(tmp_path, graph, token=TOKEN) as api:
        ids = []
        for _ in range(HISTORY + 1):
            status, body, _ = await _post(api)
            assert status == 202, body
            failed = await _until_state(api, body["id"], "failed")
            assert failed["error"] == (
                "the graph has no frontend component (componentType: frontend) to send load to"
            )
            ids.append(body["id"])
        assert len(set(ids)) == HISTORY + 1
        status, listing, _ = await api.call("GET", "/v1/experiments")
        assert [r["id"] for r in listing["experiments"]] == ids[::-1][:HISTORY]
        status, body, _ = await api.call("GET", f"/v1/experiments/{ids[0]}")
        assert status == 404 and error_of(body)["code"] == "experiment_not_found"
        # Forgotten by the API, not deleted: its folder is still there.
        assert (tmp_path / "experiments" / ids[0] / "plan.yaml").is_file()


async def test_the_live_timeline_samples_once_read_and_marks_scales(api: Served) -> None:
    timeline = api.server.runner.app[TIMELINE]
    view = api.connector.view
    await wait_until(lambda: all(c.ready == c.desired for c in view().components))
    assert timeline.task is None  # nobody read it: nothing runs

    status, first, _ = await api.call("GET", "/v1/timeline")
    assert status == 200
    assert first["sampling"] is True
    assert (first["interval_s"], first["window_s"], first["capacity"]) == (1.0, 10.0, 900)
    assert first["components"] == [
        {"name": "Frontend", "role": "frontend"},
        {"name": "Prefill", "role": "worker"},
        {"name": "Decode", "role": "worker"},
        {"name": "Talker", "role": "worker"},
        {"name": "Slow", "role": "worker"},
        {"name": "Crashy", "role": "worker"},
    ]
    assert first["frontends"] == ["Frontend"]
    assert first["experiment"] is None

    await wait_until(lambda: timeline.seq >= 1, limit_s=10)
    status, body, _ = await api.call(
        "PUT", "/v1/components/Decode/replicas", body={"replicas": 2, "wait": True}, token=TOKEN
    )
    assert status == 200, body
    mark = None
    deadline = time.monotonic() + 10
    since = 0
    rows: list[dict[str, Any]] = []
    while mark is None and time.monotonic() < deadline:
        status, page, _ = await api.call("GET", f"/v1/timeline?since={since}")
        assert status == 200
        assert all(r["seq"] > since for r in page["samples"])
        rows += page["samples"]
        since = page["last_seq"]
        marks = [m for r in rows for m in r["marks"] if m["kind"] == "scale"]
        mark = marks[0] if marks else None
        await asyncio.sleep(0.3)
    assert mark is not None, rows
    assert mark["component"] == "Decode"
    assert (mark["from_replicas"], mark["to_replicas"], mark["source"]) == (1, 2, "api")
    assert mark["text"].startswith("scale Decode 1→2 (api) ok in ")
    assert [r["seq"] for r in rows] == list(range(rows[0]["seq"], rows[-1]["seq"] + 1))
    last = rows[-1]
    assert last["components"]["Decode"]["desired"] == 2
    assert last["components"]["Talker"] == {
        **last["components"]["Talker"],
        "desired": 1,
        "ready": 1,
        "running": 1,
    }
    assert last["phase"] == "" and last["target_concurrency"] is None
    # The frontend has no HTTP port to scrape here: no load or latency, not zeros.
    assert last["request_rate"] is None and last["ttft_p99_s"] is None

    # A cursor from before a restart (above last_seq) gets everything there is.
    status, page, _ = await api.call("GET", "/v1/timeline?since=999999")
    assert page["samples"][0]["seq"] == 1


async def test_the_live_timeline_stops_when_nobody_reads(
    api: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    import connector.api.timeline as live

    monkeypatch.setattr(live, "IDLE_STOP_S", 0.5)
    timeline = api.server.runner.app[TIMELINE]
    status, _, _ = await api.call("GET", "/v1/timeline")
    assert status == 200
    await wait_until(lambda: not timeline.sampling, limit_s=10)
    kept = timeline.seq
    assert kept >= 1
    await asyncio.sleep(1.5)
    assert timeline.seq == kept  # stopped: no work while nobody looks
    status, page, _ = await api.call("GET", "/v1/timeline")
    assert page["sampling"] is True and page["last_seq"] == kept


async def test_a_running_experiment_shows_on_the_timeline_and_stops_with_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIPERF", "/bin/true")
    async with serve(tmp_path, token=TOKEN) as api:
        status, body, _ = await _post(api)
        assert status == 202
        status, page, _ = await api.call("GET", "/v1/timeline")
        assert page["experiment"] == {
            "id": body["id"],
            "name": "burst",
            "state": "running",
            "phase": "waiting for the frontend",
            "progress": {"done_s": 0.0, "total_s": 35.0, "fraction": 0.0},
            "phases": body["phases"],
            "report": None,
            "error": None,
        }
        experiments = api.server.runner.app[EXPERIMENTS]
        run = experiments.current
        assert run is not None
    # The server stopped with the experiment running: it was cancelled, not left behind.
    assert run.state == "cancelled"
    assert run.task is not None and run.task.done()


async def test_the_cli_runs_it_remotely_and_reports_how_it_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse
    import io

    from rich.console import Console

    from connector.client import Client
    from connector.experiment.command import add_arguments, run_command

    monkeypatch.setenv("AIPERF", "/bin/true")
    (tmp_path / "tok").mkdir()
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump({**PLAN, "tokenizer": "tok"}, sort_keys=False))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(plan_file), "--remote"])
    graph = make_graph(svc("Worker", replicas=0), name="nofe")
    async with serve(tmp_path / "wd", graph, token=TOKEN) as api:
        out, err = io.StringIO(), io.StringIO()
        async with Client(api.url, token=TOKEN) as client:
            code = await run_command(
                client, args, Console(file=out, width=500), Console(file=err, width=500)
            )
        status, listing, _ = await api.call("GET", "/v1/experiments")
    assert status == 200
    run = listing["experiments"][0]
    assert code == 1
    assert out.getvalue().splitlines()[0] == f"run folder: {run['folder']} (failed)"
    assert err.getvalue().splitlines()[-1] == (
        "dynamo-local: error: the graph has no frontend component (componentType: frontend) "
        "to send load to"
    )
    # The tokenizer folder was resolved next to the plan file, where the CLI runs.
    sent = yaml.safe_load((Path(run["folder"]) / "plan.yaml").read_text())
    assert sent["tokenizer"] == str(tmp_path / "tok")
