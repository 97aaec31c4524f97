"""The deploy files match the CLI and the settings (nothing here builds images)."""

from __future__ import annotations

from pathlib import Path

import yaml

from jobs.settings import Settings
from service.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_compose_commands_and_settings_exist():
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    parser, fields = build_parser(), set(Settings.model_fields)
    commands = []
    for name, svc in doc["services"].items():
        cmd = svc.get("command")
        if cmd and cmd[0] == "alloy":
            args = parser.parse_args(cmd[1:])
            assert callable(args.func), name
            commands.append(cmd[1])
        for key in svc.get("environment") or {}:
            if key.startswith("ALLOY_"):
                assert key.removeprefix("ALLOY_").lower() in fields, (name, key)
    assert {"migrate", "worker", "reaper", "scheduler"} <= set(commands)
    assert "--appendonly" in doc["services"]["redis"]["command"]
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        for line in (DEPLOY / dockerfile).read_text().splitlines():
            if line.startswith("CMD"):
                argv = yaml.safe_load(line.removeprefix("CMD"))
                assert argv[0] == "alloy" and callable(parser.parse_args(argv[1:]).func)


def test_images_copy_every_package():
    """A package missing from an image fails only at import time inside the container."""
    import tomllib

    pyproject = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {"merge_ops", "jobs", "service", "workers"} <= packages
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        text = (DEPLOY / dockerfile).read_text()
        ignore = (DEPLOY / f"{dockerfile}.dockerignore").read_text().splitlines()
        for pkg in packages:
            assert f"COPY {pkg} {pkg}" in text, (dockerfile, pkg)
            assert f"!{pkg}/**" in ignore, (dockerfile, pkg)
