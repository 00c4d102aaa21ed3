"""The README stays a newcomer's page: short, and every relative link in it (and in the pages it handed
its reference material to) points to a file, and a heading, that exist."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250
# Markdown links and images, [text](target) / ![alt](target); a target may carry a "title".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)
# Pages that took over the README's reference material.
MOVED_TO = ["docs/pipeline.md", "docs/usage.md", "docs/benchmarks.md", "docs/cli.md"]


def relative_links(text: str) -> list[tuple[str, str]]:
    """(file, anchor) of each relative link of Markdown ``text`` outside fenced code; file "" is this page."""
    links = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("/"):
            continue  # a URL (http:, mailto:, …) or a site-absolute path
        file, _, anchor = target.partition("#")
        links.append((file, anchor))
    return links


def anchors(text: str) -> set[str]:
    """The ids GitHub gives the headings of Markdown ``text`` (lower case, punctuation dropped, spaces to
    dashes, -1, -2, … for repeats)."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", FENCE.sub("", text), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move reference material into docs/")


@pytest.mark.parametrize("page", ["README.md", *MOVED_TO])
def test_relative_links_resolve(page):
    path = ROOT / page
    links = relative_links(path.read_text(encoding="utf-8"))
    if page == "README.md":
        assert links, "no relative links found in README.md: the link pattern is wrong"
    broken = []
    for file, anchor in links:
        target = (path.parent / file) if file else path
        if not target.exists():
            broken.append(f"{file}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target.read_text(encoding="utf-8")):
            broken.append(f"{file}#{anchor}: no such heading")
    assert not broken, f"{page} has broken links: {broken}"


def test_link_and_anchor_patterns():
    text = ("see [a](docs/a.md), ![b](docs/img/b.png \"t\"), [c](https://x.org/c.md), [d](#d), "
            "[e](docs/e.md#part)\n```\n[f](nowhere.md)\n# not a heading\n```\n")
    assert relative_links(text) == [("docs/a.md", ""), ("docs/img/b.png", ""), ("", "d"), ("docs/e.md", "part")]
    headings = "# The `ctrl-data` stages\n## The main job (tiny recipe)\n## Results\n## Results\n```\n# x\n```\n"
    assert anchors(headings) == {"the-ctrl-data-stages", "the-main-job-tiny-recipe", "results", "results-1"}


def test_the_main_jobs_printout_is_what_its_script_renders():
    """README's main-job block is benchmarks/main_job.py's rendering of the run it recorded: a format change
    that was not rerun (python benchmarks/main_job.py) fails here."""
    import json

    from benchmark_modules import load_benchmark

    main_job = load_benchmark("main_job")
    record = json.loads(main_job.RECORD.read_text())
    assert main_job.readme_block(README.read_text()) == main_job.render(record), (
        "the README's main-job printout is not what benchmarks/main_job.py renders from docs/main_job_report.json: "
        "run python benchmarks/main_job.py")
