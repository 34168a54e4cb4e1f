"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_examples_in_the_readme_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    runnable = [b for b in blocks if not b.startswith("# needs a trained model")]
    assert runnable
    for block in runnable:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
        if "nll" in namespace:
            assert namespace["nll"].shape == (10,)
        if "images" in namespace:
            assert len(namespace["images"]) == 4 and namespace["images"][0].size == (32, 32)
