"""The README and docs/ hold the commands the project really uses, and their links lead somewhere."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Every Markdown page of the repo's documentation: the front page, docs/ and the benchmark's.
PAGES = [ROOT / "README.md", *DOCS, ROOT / "bench" / "README.md"]
# [text](target): the targets of inline Markdown links, images included.
LINK = re.compile(r"\]\(([^)\s]+)\)")


def quickstart_commands() -> list[str]:
    """The shell blocks of the Quickstart section."""
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)\n```", section, re.S)


def anchors(page: Path) -> set[str]:
    """The anchors GitHub makes for a page's headings: lower case, punctuation dropped, spaces as dashes."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


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
    table = README.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    for name in settings:
        assert f"| `{name}` |" in table, name


def test_deploy_page_links_the_tested_nginx_conf():
    """docs/deploy.md links deploy/nginx.conf, the file tests/test_nginx.py runs, rather than a copy of it."""
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    assert "](../deploy/nginx.conf)" in deploy
    assert "```nginx" not in deploy


def test_every_docs_page_is_in_the_readme_index():
    """Each docs/ page, and the benchmark's README, is linked from the README's documentation index."""
    assert DOCS
    index = README.split("\n## Documentation\n", 1)[1].split("\n## ", 1)[0]
    for page in [*DOCS, ROOT / "bench" / "README.md"]:
        assert f"]({page.relative_to(ROOT)})" in index, page.name


def test_every_relative_link_resolves():
    """Each relative link in the documentation names an existing file, and an existing heading where it has a #."""
    checked = 0
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
            assert file.exists(), f"{page.name}: {target}"
            if anchor and file.suffix == ".md":
                assert anchor in anchors(file), f"{page.name}: {target}"
            checked += 1
    assert checked > len(PAGES)


def test_nothing_points_outside_the_repository():
    """No page names a path above the repository's root."""
    for page in PAGES:
        assert "../shared" not in page.read_text(), page.name


def test_readme_stays_short():
    """The README is a front page, under 15 KB; the rest lives in docs/."""
    assert len(README.encode()) < 15_000


def test_code_map_names_every_module():
    """The README's map of the code has a line for each module of analytics/ and each top-level Python file."""
    code_map = README.split("\n## Map of the code\n", 1)[1].split("\n## ", 1)[0]
    modules = [*(ROOT / "analytics").glob("*.py"), *ROOT.glob("*.py")]
    for module in modules:
        if module.name != "__init__.py":
            assert f"`{module.relative_to(ROOT)}`" in code_map, module.name
