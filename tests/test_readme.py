"""The README's commands and samples are the ones the project really uses."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def quickstart_commands() -> list[str]:
    """The shell blocks of the Quickstart section."""
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)\n```", section, re.S)


def test_quickstart_has_two_commands():
    """One command runs the service, one runs the tests; each a single line."""
    run, test = quickstart_commands()
    assert "\n" not in run and "\n" not in test
    assert run.endswith("gunicorn wsgi:app")
    assert test.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    """.ci/run ends by running exactly the README's test command."""
    _, test = quickstart_commands()
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[-1] == test


def test_procfile():
    """The Procfile starts gunicorn on wsgi:app, as the README says."""
    assert (ROOT / "Procfile").read_text().strip() == "web: gunicorn wsgi:app"
    assert "`web: gunicorn wsgi:app`" in README


def test_every_setting_is_documented():
    """Each setting in config.py has a row in the README's settings table."""
    from config import Config

    settings = [name for name in vars(Config) if name.isupper()]
    assert settings
    for name in settings:
        assert f"| `{name}` |" in README, name


def test_nginx_sample_is_the_tested_file():
    """The server block the README shows is deploy/nginx.conf, which tests/test_nginx.py runs."""
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert f"```nginx\n{conf}```" in README
