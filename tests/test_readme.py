"""The README says what is true: its settings table is the settings class, default for default;
docker-compose.yml passes every setting; the by-hand steps run as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from moonq.settings import Settings
from tests.procs import real_env, start, wait_http, wait_log

README = Path(__file__).parent.parent / "README.md"
ROW = re.compile(r"^\| `([A-Z_]+)` \| (.+?) \|", re.M)
COMPOSE = README.parent / "docker-compose.yml"
FAKE_LISTENING = r"listening on http://127\.0\.0\.1:(\d+)/v1"
API_LISTENING = r"Uvicorn running on http://127\.0\.0\.1:(\d+)"


def _documented() -> dict[str, str]:
    return dict(ROW.findall(README.read_text()))


def _shown(default: object) -> str:
    if default is None:
        return "*(none)*"
    if isinstance(default, SecretStr):
        return f"`{default.get_secret_value()}`" if default.get_secret_value() else "*(empty)*"
    return f"`{default}`"


# Defaults made of another setting (tests/test_settings.py checks each).
DERIVED = {"MOONQ_QUEUE_NAME": "`{MOONQ_KEY_PREFIX}:queue`"}


def test_every_setting_is_documented_with_its_default() -> None:
    documented = _documented()
    fields = {f.alias: f.default for f in Settings.model_fields.values()}
    assert set(documented) == set(fields)
    for name, default in fields.items():
        assert documented[name].startswith(DERIVED.get(name, _shown(default))), name


def test_the_set_up_commands_are_there() -> None:
    text = README.read_text()
    assert "make dev" in text and "make test" in text and "docker compose up" in text


def _compose_environment() -> set[str]:
    """The names under the moonq services' `environment:` list (`- NAME` or `- NAME=value`)."""
    block = COMPOSE.read_text().split("  environment:\n", 1)[1].split("\n  depends_on:", 1)[0]
    return set(re.findall(r"^    - ([A-Z_]+)", block, re.M))


def test_compose_passes_every_setting_to_the_containers() -> None:
    assert _compose_environment() == {f.alias for f in Settings.model_fields.values()}


def test_compose_and_readme_agree_on_scaling() -> None:
    scale = re.compile(r"--scale worker=(\d+)")
    in_compose = set(scale.findall(COMPOSE.read_text()))
    assert in_compose and in_compose == set(scale.findall(README.read_text()))


def _block(name: str) -> str:
    text = README.read_text()
    return text.split(f"<!-- {name}:start -->", 1)[1].split(f"<!-- {name}:end -->", 1)[0]


def _by_hand() -> list[tuple[dict[str, str], list[str]]]:
    """(environment, arguments) of each `moonq` command of the by-hand steps."""
    commands = []
    for line in _block("by-hand").splitlines():
        words = shlex.split(line, comments=True)
        if "moonq" in words:
            at = words.index("moonq")
            commands.append((dict(w.split("=", 1) for w in words[:at]), words[at + 1 :]))
    return commands


@pytest.mark.e2e
def test_the_processes_by_hand_work_as_written(
    tmp_path: Path, real_redis_url: str, prefix: str
) -> None:
    """The README's commands, only with ports of their own and the test's Redis."""
    (fake_env, fake_args), (api_env, api_args), (worker_env, worker_args) = _by_hand()
    assert fake_args == ["fake-moonshot"] and api_args == ["api"] and worker_args == ["worker"]
    base = real_env(real_redis_url, prefix)
    procs = [start("fake", [*fake_args, "--port", "0"], {**base, **fake_env}, tmp_path)]
    try:
        fake_port = wait_log(procs[0], FAKE_LISTENING).group(1)
        upstream = worker_env["MOONSHOT_BASE_URL"].replace(":8001/", f":{fake_port}/")
        api_env = {**api_env, "MOONSHOT_BASE_URL": upstream}
        procs.append(start("api", [*api_args, "--port", "0"], {**base, **api_env}, tmp_path))
        procs.append(
            start(
                "worker",
                worker_args,
                {**base, **worker_env, "MOONSHOT_BASE_URL": upstream},
                tmp_path,
            )
        )
        api = f"http://127.0.0.1:{wait_log(procs[1], API_LISTENING).group(1)}"
        wait_http(f"{api}/readyz", procs[1])
        job_json = _block("job-json").split("<<'EOF'\n", 1)[1].split("\nEOF", 1)[0]
        headers = {"Authorization": "Bearer key1", "Content-Type": "application/json"}
        job = httpx.post(f"{api}/v1/jobs", content=job_json, headers=headers).json()
        done = httpx.get(
            f"{api}/v1/jobs/{job['id']}", params={"wait": 15}, headers=headers, timeout=20
        ).json()
        assert done["status"] == "completed", done
        assert done["custom_id"] == "doc-42" and done["batch_id"] is None
        models = httpx.get(f"{api}/v1/models", headers=headers, timeout=10)  # the API's upstream
        assert models.status_code == 200 and models.json()["data"], models.text
    finally:
        for proc in procs:
            proc.stop()
