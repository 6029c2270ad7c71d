"""The deploy/ examples: a GitHub Actions workflow and a Databricks Asset Bundle job that run the update on
a schedule. Parsed here, their cptkit command lines are checked against the real CLI (commands and
flags, parsed by the CLI's own parser), the config they run must load, and their credentials must come
from the platform's secret store."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from cptkit.cli import app

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def parse_cli(args: list[str]) -> tuple[str, dict[str, Any]]:
    """The subcommand and its parsed options, as the CLI's own parser reads `args`; an unknown command
    or flag raises."""
    group: Any = typer.main.get_command(app)  # typer's own click: its Group, by what it does
    with group.make_context("cptkit", list(args), resilient_parsing=False) as ctx:
        rest = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        name, sub_args = rest[0], rest[1:]
        command = group.get_command(ctx, name)
        assert command is not None, f"cptkit has no command {name!r}"
        with command.make_context(name, sub_args, parent=ctx) as sub:
            return name, dict(sub.params)


def check_config(path: str) -> None:
    from cptkit.config import load_config

    config_path = REPO / re.sub(r"^.*\$\{workspace\.file_path\}/", "", path)
    assert config_path.is_file(), path
    config = load_config(config_path)
    assert config.training.init_from is not None and config.training.init_from.endswith("@champion")
    assert getattr(config.source, "mode", "full") in ("watermark", "cdf")


def test_github_workflow_runs_the_update_on_a_schedule_with_secrets() -> None:
    workflow = yaml.safe_load((DEPLOY / "github/cptkit-update.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers["schedule"][0]["cron"].split().__len__() == 5
    commands = []
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            if "cptkit " not in step.get("run", ""):
                continue
            tokens = shlex.split(step["run"])
            assert tokens[0].endswith("cptkit"), step["run"]
            commands.append(parse_cli(tokens[1:]))
            for name, value in step.get("env", {}).items():
                if name.endswith(("TOKEN", "SECRET", "HOST")):
                    assert re.fullmatch(r"\$\{\{ secrets\.[A-Z_]+ \}\}", value), f"{name} is not from secrets"
    names = [name for name, _ in commands]
    assert names == ["run", "history"]
    for _, params in commands:
        check_config(str(params["config"]))


def test_databricks_bundle_job_runs_the_update_on_a_schedule_with_secrets() -> None:
    bundle = yaml.safe_load((DEPLOY / "databricks/databricks.yml").read_text())
    job = bundle["resources"]["jobs"]["cptkit_update"]
    assert job["schedule"]["quartz_cron_expression"] and job["max_concurrent_runs"] == 1
    names = []
    for task in job["tasks"]:
        wheel = task["python_wheel_task"]
        assert (wheel["package_name"], wheel["entry_point"]) == ("cptkit", "cptkit")
        name, params = parse_cli([str(p) for p in wheel["parameters"]])
        names.append(name)
        check_config(str(params["config"]))
    assert names == ["run", "history"]
    for cluster in job["job_clusters"]:
        env = cluster["new_cluster"]["spark_env_vars"]
        assert env and all(re.fullmatch(r"\{\{secrets/[a-z]+/[a-z-]+\}\}", v) for v in env.values())
    # The entry point the job calls is the package's console script.
    assert 'cptkit = "cptkit.cli:main"' in (REPO / "pyproject.toml").read_text()


def test_a_wrong_flag_in_a_deploy_command_would_be_caught() -> None:
    with pytest.raises(Exception, match="No such option"):
        parse_cli(["run", "--configs", "deploy/update.yaml"])
    with pytest.raises(AssertionError):
        parse_cli(["runn", "--config", "deploy/update.yaml"])
