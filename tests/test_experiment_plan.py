"""An experiment plan is read with the graph loader's reader: a wrong one names the file, the
field and the reason, word for word; an unknown key is an error (a misspelt ``requestrate``
would run another experiment than the one written down)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from connector.experiment.plan import Plan, PlanError, Prometheus, Tokens, load_plan, parse_plan
from tests.servers import free_port

PHASE = {"concurrency": 8, "inputTokens": 100, "outputTokens": 20, "duration": 10}


def _plan(**top: Any) -> dict[str, Any]:
    return {"tokenizer": "org/model", "phases": [dict(PHASE)], **top}


def _with_phase(**changes: Any) -> dict[str, Any]:
    phase = {**PHASE, **changes}
    return {"tokenizer": "org/model", "phases": [{k: v for k, v in phase.items() if v != ...}]}


def test_a_full_plan_reads_as_written(tmp_path: Path) -> None:
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    path = tmp_path / "plan.yaml"
    path.write_text(
        """
name: burst-then-calm
seed: 42
tokenizer: models/tiny
model: tiny-llama
prometheus: {url: "http://127.0.0.1:9090/", selector: 'job="frontend"'}
interval: 0.5
window: 5
gracePeriod: 12
cooldown: 30
slo: {ttftP99Seconds: 0.5, itlP99Seconds: 0.05}
phases:
  - {name: burst, concurrency: 8, inputTokens: {mean: 400, stddev: 40}, outputTokens: 200,
     duration: 60}
  - {requestRate: 0.5, arrival: constant, concurrency: 2, inputTokens: 400,
     outputTokens: {mean: 200}, duration: 30}
"""
    )
    plan = load_plan(path, display="plan.yaml")
    assert plan.name == "burst-then-calm"
    assert plan.seed == 42
    assert plan.tokenizer == str(tmp_path / "models" / "tiny")  # a folder next to the plan
    assert plan.model == "tiny-llama"
    assert plan.prometheus == Prometheus("http://127.0.0.1:9090", 'job="frontend"')
    assert (plan.interval_s, plan.window_s, plan.grace_period_s, plan.cooldown_s) == (
        0.5,
        5.0,
        12.0,
        30.0,
    )
    assert plan.slo == {"ttftP99Seconds": 0.5, "itlP99Seconds": 0.05}
    burst, second = plan.phases
    assert (burst.name, burst.concurrency, burst.request_rate, burst.duration_s) == (
        "burst",
        8,
        None,
        60.0,
    )
    assert burst.input_tokens == Tokens(400, 40.0)
    assert burst.output_tokens == Tokens(200)
    assert (second.name, second.request_rate, second.concurrency, second.arrival) == (
        "phase2",
        0.5,
        2,
        "constant",
    )
    assert second.level == 0.5 and burst.level == 8.0
    assert plan.load_seconds == 90.0
    assert plan.source == "plan.yaml"


def test_defaults_and_a_hub_tokenizer() -> None:
    plan = parse_plan(_plan())
    assert plan == Plan(
        phases=plan.phases, tokenizer="org/model", source="plan", slo={}, prometheus=None
    )
    assert (plan.name, plan.seed, plan.interval_s, plan.window_s) == ("experiment", 0, 1.0, 10.0)
    assert (plan.grace_period_s, plan.cooldown_s) == (30.0, 0.0)
    assert parse_plan(_plan(prometheus="http://h:9090")).prometheus == Prometheus("http://h:9090")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "plan.yaml: must be a mapping, got a list"),
        ({"tokenizer": "t"}, "plan.yaml: phases: must list at least one phase"),
        ({"tokenizer": "t", "phases": {}}, "plan.yaml: phases: must be a list, got a mapping"),
        (
            {"phases": [PHASE]},
            "plan.yaml: tokenizer: required: the model's tokenizer, as a local folder "
            "(relative to the plan) or a Hugging Face id (fetched from the hub); aiperf counts "
            "tokens with it",
        ),
        (
            _plan(phase=[]),
            "plan.yaml: phase: unknown key; known: name, seed, tokenizer, model, prometheus, "
            "interval, window, gracePeriod, cooldown, slo, phases",
        ),
        (
            _with_phase(requestrate=2),
            "plan.yaml: phases[0].requestrate: unknown key; known: name, concurrency, "
            "requestRate, arrival, inputTokens, outputTokens, duration",
        ),
        (_with_phase(concurrency=0), "plan.yaml: phases[0].concurrency: must be >= 1, got 0"),
        (
            _with_phase(concurrency=2.5),
            "plan.yaml: phases[0].concurrency: must be an integer, got float 2.5",
        ),
        (
            _with_phase(concurrency=...),
            "plan.yaml: phases[0]: needs concurrency (requests in flight) or requestRate "
            "(requests/s)",
        ),
        (_with_phase(requestRate=0), "plan.yaml: phases[0].requestRate: must be > 0, got 0"),
        (
            _with_phase(requestRate="fast"),
            "plan.yaml: phases[0].requestRate: must be a number, got str 'fast'",
        ),
        (
            _with_phase(arrival="poisson"),
            "plan.yaml: phases[0].arrival: applies only to a requestRate phase",
        ),
        (
            _with_phase(requestRate=1, arrival="burst"),
            "plan.yaml: phases[0].arrival: must be one of poisson, constant, gamma, "
            "got str 'burst'",
        ),
        (
            _with_phase(duration=...),
            "plan.yaml: phases[0].duration: required: the phase's length in seconds",
        ),
        (_with_phase(duration=-1), "plan.yaml: phases[0].duration: must be > 0, got -1"),
        (
            _with_phase(inputTokens=...),
            "plan.yaml: phases[0].inputTokens: required: a mean number of tokens, or "
            "{mean, stddev}",
        ),
        (
            _with_phase(outputTokens={"stddev": 3}),
            "plan.yaml: phases[0].outputTokens.mean: required: the mean number of tokens",
        ),
        (
            _with_phase(inputTokens={"mean": 10, "stddev": -1}),
            "plan.yaml: phases[0].inputTokens.stddev: must be >= 0, got -1",
        ),
        (
            _with_phase(inputTokens={"mean": 10, "sd": 1}),
            "plan.yaml: phases[0].inputTokens.sd: unknown key; known: mean, stddev",
        ),
        (
            _with_phase(name="two words"),
            "plan.yaml: phases[0].name: invalid name 'two words': must start with a letter or "
            "'_' and hold only letters, digits, '_' and '-'",
        ),
        (
            {"tokenizer": "t", "phases": [{**PHASE, "name": "a"}, {**PHASE, "name": "a"}]},
            "plan.yaml: phases[1].name: 'a' is already phases[0]",
        ),
        (
            _plan(slo={"ttftP95Seconds": 1}),
            "plan.yaml: slo.ttftP95Seconds: unknown key; known: ttftP50Seconds, "
            "ttftP99Seconds, itlP50Seconds, itlP99Seconds",
        ),
        (_plan(slo={"ttftP99Seconds": 0}), "plan.yaml: slo.ttftP99Seconds: must be > 0, got 0"),
        (
            _plan(prometheus="127.0.0.1:9090"),
            "plan.yaml: prometheus: must be an http:// or https:// URL, got '127.0.0.1:9090'",
        ),
        (
            _plan(prometheus={"selector": 'a="b"'}),
            "plan.yaml: prometheus.url: required: the Prometheus server's URL",
        ),
        (
            _plan(prometheus={"url": "http://p", "selector": '{a="b"}'}),
            "plan.yaml: prometheus.selector: label matchers without braces, got '{a=\"b\"}'",
        ),
        (_plan(seed=-1), "plan.yaml: seed: must be >= 0, got -1"),
        (_plan(interval=0), "plan.yaml: interval: must be > 0, got 0"),
        (_plan(window=0.5), "plan.yaml: window: must be >= interval (1), got 0.5"),
        (_plan(cooldown=-5), "plan.yaml: cooldown: must be >= 0, got -5"),
    ],
)
def test_a_wrong_plan_names_the_field(raw: object, message: str) -> None:
    with pytest.raises(PlanError) as caught:
        parse_plan(raw, origin="plan.yaml")
    assert str(caught.value) == message


def test_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(PlanError) as caught:
        load_plan(tmp_path / "missing.yaml", display="missing.yaml")
    assert str(caught.value) == "missing.yaml: cannot read: No such file or directory"
    bad = tmp_path / "bad.yaml"
    bad.write_text("phases: [\n")
    with pytest.raises(PlanError) as caught:
        load_plan(bad, display="bad.yaml")
    assert str(caught.value).startswith("bad.yaml:2:1: invalid YAML: ")
    twice = tmp_path / "twice.yaml"
    twice.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(PlanError) as caught:
        load_plan(twice, display="twice.yaml")
    assert "duplicate key 'seed'" in str(caught.value)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    from tests.test_cli import cli_env

    return subprocess.run(
        [sys.executable, "-m", "connector", "experiment", *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=cwd,
        timeout=60,
        check=False,
    )


def test_the_command_says_what_is_wrong_before_it_starts_anything(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("tokenizer: t\nphases: [{concurrency: 0}]\n")
    done = _cli("bad.yaml", "--url", "http://127.0.0.1:9", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        "dynamo-local: error: bad.yaml: phases[0].concurrency: must be >= 1, got 0\n"
    )

    (tmp_path / "good.yaml").write_text(f"tokenizer: t\nphases: [{PHASE}]\n")
    done = _cli("good.yaml", "--aiperf", str(tmp_path / "none"), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == (
        f"dynamo-local: error: --aiperf names {tmp_path / 'none'}, which is not an "
        "executable file\n"
    )

    aiperf = tmp_path / "aiperf"
    aiperf.write_text("#!/bin/sh\nexit 1\n")
    aiperf.chmod(0o755)
    port = free_port()  # nothing listens there
    done = _cli("good.yaml", "--aiperf", str(aiperf), "--url", f"http://127.0.0.1:{port}",
                cwd=tmp_path)  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert f"no dynamo-local server answers at http://127.0.0.1:{port}" in done.stderr
    assert not (tmp_path / "experiments").exists()  # no run folder for a run that never was
