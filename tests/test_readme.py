"""The Python examples of the README and the guides in docs/ run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_python_examples_run(page):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    for block in [b for b in blocks if not b.startswith("# needs a trained model")]:
        namespace: dict = {}
        exec(compile(block, str(page), "exec"), namespace)
        if "nll" in namespace:
            assert namespace["nll"].shape == (10,)
        if "images" in namespace:
            assert len(namespace["images"]) == 4 and namespace["images"][0].size == (32, 32)


def test_every_guide_the_readme_names_exists_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
    assert all(f"docs/{p.name}" in readme for p in PAGES[1:])
