"""The command line and the package's layering."""

import ast
import subprocess
import sys
from pathlib import Path

from unnoise.cli import main

from .conftest import run_cli

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "unnoise"


def test_samplers_command_lists_every_sampler(capsys):
    from unnoise import SAMPLERS

    assert main(["samplers"]) == 0
    out = capsys.readouterr().out
    assert all(line.split()[0] in SAMPLERS for line in out.splitlines())
    assert len(out.splitlines()) == len(SAMPLERS)


def test_demo_draws_every_sampler(tmp_path, capsys):
    assert main(["demo", "--samples", "200", "--steps", "8", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert "dpmpp_2m" in capsys.readouterr().out


def test_bad_input_gives_a_message_not_a_traceback(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "unnoise", "demo", "--steps", "0", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "unnoise: error: the number of steps must be a positive integer" in run.stderr
    assert "Traceback" not in run.stderr


def test_import_is_lazy():
    run = subprocess.run(
        [sys.executable, "-c", "import sys, unnoise; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert run.stdout.strip() == "False"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names.add(module)
            # `from .. import pipeline` names the module in the alias; so may `from unnoise import cli`
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def forbidden_imports(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return [n for n in imported_modules(path) if any(p in forbidden for p in n.lstrip(".").split("."))]


EDGES = ("train", "pipeline", "cli", "server", "demo", "eval")


def test_the_math_knows_nothing_of_the_edges():
    """diffusion/, nn/, text/, data/ and the top-level modules they share never import training, pipeline,
    CLI, server or evaluation code; the pipeline imports no edge either."""
    core = [p for folder in ("diffusion", "nn", "text", "data") for p in (PACKAGE / folder).glob("*.py")]
    core += [p for p in PACKAGE.glob("*.py") if p.stem not in (*EDGES, "__init__", "__main__")]
    assert {"settings", "images", "release", "errors", "threads"} <= {p.stem for p in core}
    for path in core:
        assert not forbidden_imports(path, EDGES), f"{path.name} imports {forbidden_imports(path, EDGES)}"
    edges = ("train", "cli", "server", "demo", "eval")
    assert not forbidden_imports(PACKAGE / "pipeline.py", edges)


def test_the_edges_do_not_import_each_other():
    """The server, training and evaluation stand on the pipeline and the core; only the CLI ties edges."""
    for edge, forbidden in [
        ("server", ("cli", "train", "eval", "demo")),
        ("train", ("cli", "server", "eval", "demo")),
        ("eval", ("cli", "server", "train", "demo")),
    ]:
        for path in (PACKAGE / edge).glob("*.py"):
            assert not forbidden_imports(path, forbidden), (
                f"{path} imports {forbidden_imports(path, forbidden)}"
            )


def test_the_layering_check_sees_every_form_of_import(tmp_path):
    for line in ("from .. import pipeline", "from ..train.loop import train", "import unnoise.cli"):
        (tmp_path / "m.py").write_text(line + "\n")
        assert forbidden_imports(tmp_path / "m.py", EDGES), line
    (tmp_path / "m.py").write_text("from ..diffusion import samplers\nimport torch\n")
    assert not forbidden_imports(tmp_path / "m.py", EDGES)


def test_train_reports_bad_input_without_a_traceback(tmp_path):
    cases = [
        (["--data", str(tmp_path / "nowhere")], "no such folder"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--text-encoder", str(tmp_path)], str(tmp_path)),
        (["--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),  # issue 12
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--resolution", "100000"], "--resolution must be in 16..1024"),
        (["--resolution", "30"], "not a multiple of the UNet's stride 4"),
        (["--sigma-p-mean", "nan"], "--sigma-p-mean must be a finite number"),
    ]
    for args, message in cases:
        run = run_cli("train", "--out", str(tmp_path / "run"), *args)
        assert run.returncode == 2, (args, run.stderr)
        assert message in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)


def test_resume_names_a_damaged_run_config(tmp_path):
    """Issue 12: a truncated config.json, or one that holds a list, was a traceback."""
    for text, message in (('{"steps": 1', "is not valid JSON"), ("[1, 2]", "holds a list")):
        (tmp_path / "config.json").write_text(text)
        run = run_cli("train", "--out", str(tmp_path), "--resume")
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_every_train_flag_says_what_it_does_and_names_the_choices():
    """Issue 13: `unnoise train --help` was 32 flags whose only help was the default."""
    import dataclasses

    from unnoise.diffusion.formulations import FORMULATIONS
    from unnoise.nn.presets import PRESETS
    from unnoise.train.config import TrainConfig

    for field in dataclasses.fields(TrainConfig):
        assert len(field.metadata.get("help", "")) > 10, field.name
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}
    assert all(name in helps["preset"] for name in PRESETS)
    assert all(name in helps["formulation"] for name in FORMULATIONS)
    run = subprocess.run([sys.executable, "-m", "unnoise", "train", "--help"], capture_output=True, text=True)
    assert "EMA half-life in training images" in run.stdout and "(default: 50000.0)" in run.stdout
