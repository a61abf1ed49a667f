"""docker-compose.yml, the Dockerfile and .dockerignore, checked without a Docker engine.

Two paths, both visible in the test report: the structure is always checked from the YAML itself
(PyYAML, with ${VAR:-default} resolved like compose does); `docker compose config` runs in addition
where the docker CLI has the compose plugin (it needs no engine), and is skipped with the reason where
it has not. The end-to-end run on an engine is test_e2e_compose.py (marker docker)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_support import COMPOSE_DIR, ROOT

COMPOSE = ROOT / "docker-compose.yml"
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """${VAR:-default} -> the default (the tests ignore the caller's environment), recursively."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def parsed() -> dict[str, Any]:
    data: dict[str, Any] = interpolate(yaml.safe_load(COMPOSE.read_text()))  # PyYAML resolves the << merges
    return data


def env(service: dict[str, Any]) -> dict[str, str]:
    e = service.get("environment", {})
    return dict(e) if isinstance(e, dict) else dict(item.split("=", 1) for item in e)


def seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", str(text))
    assert m, f"unreadable duration {text!r}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m.group(2)]


def check_structure(c: dict[str, Any]) -> None:
    """What `docker compose up` needs to bring up a working stack, and the train profile."""
    services = c["services"]
    default = {name for name, s in services.items() if not s.get("profiles")}
    assert default == {"lcs", "prometheus", "grafana"}, "`docker compose up` alone must start these three"
    assert services["train"]["profiles"] == ["train"]

    lcs = services["lcs"]
    assert lcs["build"]["context"] in (".", str(ROOT))
    assert any(str(p).endswith(":8000") or (isinstance(p, dict) and p.get("target") == 8000) for p in lcs["ports"])
    e = env(lcs)
    assert e["LCS_HOST"] == "0.0.0.0" and e["LCS_PORT"] == "8000"
    assert e["LCS_PROMETHEUS_URL"] == "http://prometheus:9090"
    assert all(k.startswith("LCS_") for k in e)
    # the thread count is the service's own default (the CPUs granted, less one), as in deploy/k8s; a value
    # here would pin it on every machine (it was 1: one inference thread on an 8-core host)
    assert e.get("LCS_THREADS") is None, "leave LCS_THREADS to the service unless the shell sets it"
    drain = float(e["LCS_DRAIN_SECONDS"])  # then uvicorn waits up to drain + 1 s more (service/__main__.py)
    assert seconds(lcs["stop_grace_period"]) > 2 * drain + 1, "stop grace must outlast the drain and uvicorn's wait"
    assert lcs.get("read_only") is True

    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image version, not {image}"

    def mounts(s: dict[str, Any]) -> dict[str, str]:
        out = {}
        for v in s.get("volumes", []):
            if isinstance(v, dict):
                out[v["target"]] = str(v["source"])
            else:
                src, target = v.split(":")[:2]
                out[target] = src
        return out

    prom = mounts(services["prometheus"])
    assert Path(ROOT, prom["/etc/prometheus"]).resolve() == (COMPOSE_DIR / "prometheus").resolve()
    graf = mounts(services["grafana"])
    provisioning = Path(ROOT, graf["/etc/grafana/provisioning"]).resolve()
    assert provisioning == (COMPOSE_DIR / "grafana" / "provisioning").resolve()
    providers = yaml.safe_load((provisioning / "dashboards" / "lcs.yml").read_text())["providers"]
    dash_dir = providers[0]["options"]["path"]
    assert Path(ROOT, graf[dash_dir]).resolve() == (COMPOSE_DIR / "grafana" / "dashboards").resolve()
    (ds,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["url"] == "http://prometheus:9090" and ds["uid"] == "prometheus"

    # the train profile writes into the named volume the service reads
    train = services["train"]
    assert mounts(train)["/models"] == mounts(lcs)["/models"] == "models"
    assert "models" in c["volumes"]
    command = " ".join(train["command"])
    assert "configs/structured_line.yaml" in command and "out=/models/" in command
    assert train["entrypoint"][-3:] == ["-m", "training", "train"]


def test_compose_structure_from_yaml() -> None:
    check_structure(parsed())


def test_compose_config_with_docker_compose() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not found: docker-compose.yml was checked from its YAML only")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30, check=False)
    if version.returncode != 0:
        pytest.skip("docker compose plugin not found: docker-compose.yml was checked from its YAML only")
    # the file's own defaults: none of its variables from this shell (deploy/README.md's offline run exports
    # BASE_IMAGE, WHEELS and PROMETHEUS_IMAGE, which would replace the pinned images checked below)
    prefixes = ("LCS_", "COMPOSE_", "BASE_IMAGE", "WHEELS", "PROMETHEUS_", "GRAFANA_")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    for profile in ([], ["--profile", "train"]):
        run = subprocess.run(
            [docker, "compose", "-f", str(COMPOSE), *profile, "config", "--format", "json"],
            cwd=ROOT,
            env=clean,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        config = json.loads(run.stdout)
        if profile:
            check_structure(config)
        else:
            assert set(config["services"]) == {"lcs", "prometheus", "grafana"}


# -- Dockerfile and .dockerignore -------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_small_and_non_root() -> None:
    ins = dockerfile()
    ops = [op for op, _ in ins]
    args = dict(a.partition("=")[::2] for op, a in ins if op == "ARG")
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert "WHEELS" in args and "TORCH_INDEX" in args
    froms = [a for op, a in ins if op == "FROM"]
    assert len(froms) == 2 and all(f.startswith("${BASE_IMAGE}") for f in froms)
    run = " ".join(a for op, a in ins if op == "RUN")
    assert "--no-index --find-links /wheels" in run  # offline path
    assert "https://download.pytorch.org/whl/cpu" in args["TORCH_INDEX"] and "torch==${TORCH_VERSION}" in run
    user = next(a for op, a in reversed(ins) if op == "USER")
    assert user.split(":")[0] not in ("0", "root")
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "COPY")  # nothing after runs as root
    (health,) = [a for op, a in ins if op == "HEALTHCHECK"]
    assert "/readyz" in health and "urllib" in health and "curl" not in health
    assert ("STOPSIGNAL", "SIGTERM") in ins
    assert ("ENTRYPOINT", '["python3", "-m", "service"]') in ins
    env = " ".join(a for op, a in ins if op == "ENV")
    assert "LCS_HOST=0.0.0.0" in env and "LCS_CHECKPOINT=/app/models/structured_line.safetensors" in env
    assert any(op == "COPY" and a.startswith("models/structured_line.safetensors ") for op, a in ins)
    torch_pin = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines() if '"torch==' in line)
    assert f"torch=={args['TORCH_VERSION']}" in torch_pin  # the image and the project pin the same torch


def ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics, enough for this file: last match wins, '!' re-includes, a directory
    pattern also covers what is under it."""
    result = False
    for p in patterns:
        neg = p.startswith("!")
        pat = p[1:] if neg else p
        pat = pat.removeprefix("**/")
        parts = path.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1)) or any(
            fnmatch.fnmatch(part, pat) for part in parts if "/" not in pat
        )
        if hit:
            result = not neg
    return result


def test_dockerignore_keeps_what_the_image_needs_and_drops_the_rest() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for required in (".venv", "runs", ".git", "*.state.safetensors"):
        assert required in patterns
    for path in (
        ".venv/bin/python",
        "runs/x.safetensors",
        ".git/HEAD",
        "models/structured_line.state.safetensors",
        "models/quantized_line.safetensors",
        "service/__pycache__/app.cpython-311.pyc",
        ".mypy_cache/x",
    ):
        assert ignored(path, patterns), f"{path} would be sent to the Docker daemon"
    copied = [a.split()[:-1] for op, a in dockerfile() if op == "COPY" and not a.startswith("--from")]
    for src in (s for sources in copied for s in sources):
        name = "deploy/docker/wheels" if src == "${WHEELS}" else src  # the WHEELS default
        assert not ignored(name, patterns), f"the Dockerfile copies {name}, but .dockerignore drops it"
        assert (ROOT / name).exists() or name == "models/structured_line.safetensors", f"COPY {name}: no such path"
    assert not ignored("README.md", patterns) and not ignored("pyproject.toml", patterns)
    assert (ROOT / "deploy" / "docker" / "wheels").is_dir()


@pytest.mark.parametrize(
    ("host", "url"),
    [
        (None, "http://127.0.0.1:8000/readyz"),
        ("0.0.0.0", "http://127.0.0.1:8000/readyz"),
        ("::", "http://[::1]:8000/readyz"),  # IPv6-only sockets: 127.0.0.1 was refused (unhealthy for good)
        ("10.1.2.3", "http://10.1.2.3:8000/readyz"),  # was 127.0.0.1, where nothing listens: unhealthy for good
        ("fd00::5", "http://[fd00::5]:8000/readyz"),
    ],
)
def test_the_healthcheck_asks_the_address_the_service_binds(
    host: str | None, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import urllib.request

    (health,) = [a for op, a in dockerfile() if op == "HEALTHCHECK"]
    argv = json.loads(health[health.index("CMD") + 3 :])
    assert argv[:2] == ["python3", "-c"]
    asked: list[str] = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda u, timeout: asked.append(u))
    monkeypatch.delenv("LCS_PORT", raising=False)
    if host is None:
        monkeypatch.delenv("LCS_HOST", raising=False)
    else:
        monkeypatch.setenv("LCS_HOST", host)
    exec(argv[2], {})
    assert asked == [url]
