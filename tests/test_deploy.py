"""The files in deploy/: what can be checked without a container daemon, a live systemd or a
cluster. Example configs pass ``stunturn config check``; the systemd unit passes
``systemd-analyze verify`` and ``security``; compose.yaml validates against the compose spec
and the Kubernetes objects against the Kubernetes schemas; the objects refer to each other
consistently; the Dockerfile lints clean, runs as non-root and fetches nothing; and the health
check command the image and the probes use answers 0 against a live server and 1 without one.

Each external validator is skipped (with the reason) when it is not installed; tests/run
installs them all (the test extras, and systemd-analyze comes with Debian's systemd).
"""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner
from conftest import StartServer
from helpers import free_port

from stunturn.config import check_config
from stunturn.presets import PRESETS

cli: click.Group = importlib.import_module("stunturn_cli.main").cli
ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
EXAMPLES = sorted((DEPLOY / "examples").glob("*.toml"))
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """Path of an installed command (next to this Python first), or skip the test."""
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed")
    return str(found)


def run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=60, check=False, cwd=cwd
    )


def config_check(path: Path, *options: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["config", "check", *options, str(path)])
    return result.exit_code, result.output


# --- example configurations -----------------------------------------------------------------------


def test_one_example_per_preset() -> None:
    """deploy/examples has a file per preset, named after it, that uses it."""
    assert [p.stem for p in EXAMPLES] == sorted(PRESETS)
    for path in EXAMPLES:
        assert f'\npreset = "{path.stem}"\n' in path.read_text()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_pass_config_check(path: Path) -> None:
    """Every example passes `stunturn config check --strict` (no problems, no warnings)."""
    code, output = config_check(path, "--strict")
    assert code == 0, output
    assert output.startswith("ok: ") and f"(preset {path.stem})" in output


def test_example_check_through_the_installed_command() -> None:
    """The same through the console script, as the systemd unit's ExecStartPre runs it."""
    result = run(tool("stunturn"), "config", "check", str(DEPLOY / "examples" / "sfu.toml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "peers: only allow-peer 10.20.0.0/24 (everything else denied)" in result.stdout


def test_default_example_config_still_valid() -> None:
    """deploy/stunturn.toml (the older generic example) passes too."""
    code, output = config_check(DEPLOY / "stunturn.toml", "--strict")
    assert code == 0, output


# --- systemd --------------------------------------------------------------------------------------

UNIT = DEPLOY / "stunturn.service"


def unit_settings() -> dict[str, list[str]]:
    """Key -> values of the unit (keys repeat in systemd units)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.fixture
def runnable_unit(tmp_path: Path) -> Iterator[Path]:
    """The unit with /opt/stunturn/bin/stunturn pointing at this venv's console script, so
    systemd-analyze verify (which checks ExecStart exists) can judge it here."""
    stunturn = tool("stunturn")
    text = UNIT.read_text()
    assert "/opt/stunturn/bin/stunturn " in text
    path = tmp_path / "stunturn.service"
    path.write_text(text.replace("/opt/stunturn/bin/stunturn", stunturn))
    yield path


def test_unit_is_hardened() -> None:
    """The hardening the docs promise is in the unit."""
    s = unit_settings()
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "DynamicUser": "yes",
        "StateDirectory": "stunturn",
        "LimitNOFILE": "1048576",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "MemoryDenyWriteExecute": "yes",
        "ProtectProc": "invisible",
    }
    for key, value in expected.items():
        assert s.get(key) == [value], key
    # /proc/net must stay readable (IPv6 interface addresses); no user namespace (port 443).
    assert "ProcSubset" not in s and "PrivateUsers" not in s
    assert s["ExecStartPre"] == [
        "/opt/stunturn/bin/stunturn config check /etc/stunturn/stunturn.toml"
    ]
    assert s["ExecStart"] == [
        "/opt/stunturn/bin/stunturn serve --config /etc/stunturn/stunturn.toml"
    ]


def test_systemd_analyze_verify(runnable_unit: Path) -> None:
    """`systemd-analyze verify` accepts the unit without a single complaint about it."""
    result = run(tool("systemd-analyze"), "verify", str(runnable_unit), cwd=runnable_unit.parent)
    about_us = [line for line in result.stderr.splitlines() if "stunturn" in line]
    assert result.returncode == 0 and not about_us, result.stderr


def test_systemd_analyze_verify_catches_mistakes(runnable_unit: Path) -> None:
    """The check above can fail: a misspelt directive is reported."""
    broken = runnable_unit.read_text().replace("NoNewPrivileges=", "NoNewPrivilege=")
    runnable_unit.write_text(broken)
    result = run(tool("systemd-analyze"), "verify", str(runnable_unit), cwd=runnable_unit.parent)
    assert "Unknown key" in result.stderr


def test_systemd_analyze_security(runnable_unit: Path) -> None:
    """`systemd-analyze security --offline` rates the unit's exposure at most 2.0 ("OK")."""
    analyze = tool("systemd-analyze")
    result = run(analyze, "security", "--offline=yes", "--threshold=20", str(runnable_unit),
                 cwd=runnable_unit.parent)  # fmt: skip
    if "Unknown option" in result.stderr or "unrecognized option" in result.stderr:
        pytest.skip("this systemd-analyze has no offline security review (systemd < 250)")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert re.search(r"Overall exposure level for stunturn.service: [01]\.\d OK", result.stdout)


# --- the health check the image and the probes use ------------------------------------------------


def probe_commands() -> list[list[str]]:
    """The Dockerfile HEALTHCHECK and every Kubernetes probe command."""
    dockerfile = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .* CMD (\[.*\])$", dockerfile, re.M)
    assert match, "no exec-form HEALTHCHECK"
    commands = [yaml.safe_load(match.group(1))]
    container = deployment()["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        commands.append(container[probe]["exec"]["command"])
    return commands


def test_probes_are_one_stun_round_trip_on_3478() -> None:
    """Image and Kubernetes use the same command: natprobe against the local STUN port."""
    commands = probe_commands()
    assert all(c == commands[0] for c in commands), commands
    assert commands[0][0] == "natprobe" and commands[0][-1] == "127.0.0.1:3478"


def test_probe_command_answers_a_live_server_and_fails_without_one(
    stunturn_server: StartServer,
) -> None:
    """The probe command, pointed at a real server, exits 0; at a closed port, 1 (quickly)."""
    natprobe = tool("natprobe")
    command = probe_commands()[0]
    port = free_port("127.0.0.1")
    server = stunturn_server("--listen", f"127.0.0.1:{port}", "--workers", "1", "--no-turn")
    live = run(natprobe, *command[1:-1], f"127.0.0.1:{port}")
    assert live.returncode == 0, live.stdout + live.stderr
    assert server.stop() == 0
    dead = run(natprobe, *command[1:-1], f"127.0.0.1:{port}")
    assert dead.returncode == 1 and "no UDP answer" in dead.stderr


# --- Dockerfile -----------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_basics() -> None:
    """python:3.11-slim, a non-root USER before the entrypoint, no ADD (so no URL fetches),
    `stunturn serve` as the command, the default config copied where CMD reads it."""
    steps = dockerfile_instructions()
    froms = [args for word, args in steps if word == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms)
    assert not [args for word, args in steps if word == "ADD"]
    final = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM") :]
    users = [args for word, args in final if word == "USER"]
    assert users, "the final stage sets no USER"
    assert users[-1].split(":")[0] not in ("0", "root")
    assert dict(final)["ENTRYPOINT"] == '["stunturn"]'
    assert dict(final)["CMD"] == '["serve", "--config", "/etc/stunturn/stunturn.toml"]'
    assert "deploy/examples/public-p2p.toml /etc/stunturn/stunturn.toml" in dict(final)["COPY"]


def dockerignored(path: str) -> bool:
    """Whether deploy/Dockerfile.dockerignore leaves ``path`` out (last matching rule wins)."""
    excluded = False
    for raw in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if pattern in ("*", path) or path.startswith(pattern + "/"):
            excluded = not negate
    return excluded


def test_dockerfile_copies_only_what_exists_and_is_in_the_context() -> None:
    """Every COPY source (from the build context) exists in the repository and is not left
    out of the context by the dockerignore file."""
    sources = []
    for word, args in dockerfile_instructions():
        if word == "COPY" and "--from=" not in args:
            sources.extend(shlex.split(args)[:-1])
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source.rstrip("/")), source
    assert dockerignored("tests") and dockerignored(".venv")


def test_hadolint() -> None:
    """hadolint finds nothing to complain about."""
    result = run(tool("hadolint"), "--no-color", str(DEPLOY / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


# --- compose --------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_structure() -> None:
    """One server service on the host network, built from deploy/Dockerfile, with the example
    config mounted where the image reads it and the auth secret required from the
    environment. No Redis: the server does not use one yet."""
    data = compose()
    assert set(data["services"]) == {"stunturn"}
    server = data["services"]["stunturn"]
    assert server["network_mode"] == "host"
    assert (DEPLOY / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    mounts = {v.split(":")[1]: v.split(":")[0] for v in server["volumes"]}
    config = mounts["/etc/stunturn/stunturn.toml"]
    assert (DEPLOY / config).is_file() and config_check(DEPLOY / config, "--strict")[0] == 0
    command = server["command"]
    assert command[:3] == ["serve", "--config", "/etc/stunturn/stunturn.toml"]
    assert command[command.index("--auth-secret") + 1].startswith("${TURN_AUTH_SECRET:?")
    assert server["read_only"] is True and server["cap_drop"] == ["ALL"]


def test_compose_matches_the_compose_spec(tmp_path: Path) -> None:
    """compose.yaml validates against the Compose specification's JSON schema, and the check
    can fail (a misspelt key is caught)."""
    checker = tool("check-jsonschema")
    path = DEPLOY / "compose.yaml"
    result = run(checker, "--builtin-schema", "vendor.compose-spec", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(path.read_text().replace("network_mode:", "network_mod:"))
    result = run(checker, "--builtin-schema", "vendor.compose-spec", str(broken))
    assert result.returncode != 0


# --- Kubernetes -----------------------------------------------------------------------------------


def k8s_objects() -> list[dict[str, Any]]:
    objects = []
    for path in K8S:
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), path
            objects.append(doc)
    return objects


def k8s(kind: str) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def deployment() -> dict[str, Any]:
    return k8s("Deployment")


def test_k8s_objects_have_required_fields() -> None:
    """Every object has apiVersion, kind and a name; the kustomization lists every file."""
    kinds = set()
    for obj in k8s_objects():
        assert obj.get("apiVersion") and obj.get("kind")
        if obj["kind"] != "Kustomization":
            assert obj["metadata"]["name"], obj
        kinds.add(obj["kind"])
    assert kinds == {"Kustomization", "ConfigMap", "Secret", "Deployment", "Service"}
    resources = k8s("Kustomization")["resources"]
    assert sorted(resources) == sorted(p.name for p in K8S if p.name != "kustomization.yaml")


def test_k8s_references_agree() -> None:
    """The Deployment's selector matches its pods, the Service selects them, and the Secret
    key and ConfigMap it uses exist; hostNetwork; non-root; probes present."""
    dep = deployment()
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert k8s("Service")["spec"]["selector"].items() <= labels.items()
    spec = pod["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["securityContext"]["runAsNonRoot"] is True
    (container,) = spec["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"], probe
    (env,) = [e for e in container["env"] if e["name"] == "TURN_AUTH_SECRET"]
    ref = env["valueFrom"]["secretKeyRef"]
    secret = k8s("Secret")
    assert secret["metadata"]["name"] == ref["name"] and ref["key"] in secret["stringData"]
    assert "$(TURN_AUTH_SECRET)" in container["args"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_map = volumes[mounts["/etc/stunturn"]]["configMap"]["name"]
    assert config_map == k8s("ConfigMap")["metadata"]["name"]
    assert "/tmp" in mounts  # serve makes a temporary directory; the root is read-only
    assert container["args"][:3] == ["serve", "--config", "/etc/stunturn/stunturn.toml"]


def test_k8s_config_passes_check(tmp_path: Path) -> None:
    """The configuration in the ConfigMap passes `stunturn config check --strict`."""
    path = tmp_path / "stunturn.toml"
    path.write_text(k8s("ConfigMap")["data"]["stunturn.toml"])
    code, output = config_check(path, "--strict")
    assert code == 0, output


def test_k8s_empty_secret_stops_the_server() -> None:
    """The shipped Secret is empty, and an empty --auth-secret is refused naming the field;
    so is the literal $(TURN_AUTH_SECRET) should Kubernetes not expand it."""
    assert k8s("Secret")["stringData"]["auth-secret"] == ""
    for value in ("", "$(TURN_AUTH_SECRET)"):
        errors = check_config({"auth-secret": [value]}).errors
        assert [e.field for e in errors] == ["auth-secret"], value


def test_kubernetes_schemas(tmp_path: Path) -> None:
    """Every object validates strictly (no unknown fields) against the Kubernetes schemas, and
    the validator can fail (a misspelt field is caught)."""
    validate = tool("kubernetes-validate")
    files = [str(p) for p in K8S if p.name != "kustomization.yaml"]
    result = run(validate, "--strict", "--no-warn", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "deployment.yaml"
    broken.write_text((DEPLOY / "k8s" / "deployment.yaml").read_text()
                      .replace("hostNetwork:", "hostNetworking:"))  # fmt: skip
    assert run(validate, "--strict", "--no-warn", str(broken)).returncode != 0


def test_kubectl_kustomize_renders() -> None:
    """`kubectl kustomize deploy/k8s` renders every object (offline; no cluster needed)."""
    result = run(tool("kubectl"), "kustomize", str(DEPLOY / "k8s"))
    assert result.returncode == 0, result.stderr
    rendered = list(yaml.safe_load_all(result.stdout))
    assert sorted(o["kind"] for o in rendered) == ["ConfigMap", "Deployment", "Secret", "Service"]
    assert all(o["metadata"]["labels"]["app.kubernetes.io/name"] == "stunturn" for o in rendered)
