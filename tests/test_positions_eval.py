"""The position confusion matrix: renders of each stated cell score 100% on both axes, mirrored renders
score 0% horizontally and 100% vertically, and images without exactly one object are "other"."""

import numpy as np

from unnoise.data.shapes import POSITIONS, render
from unnoise.eval.positions import cell_prompt, evaluate_positions
from unnoise.eval.shapes_eval import ExpectedObject, PromptSpec, prompt_set, reference_scene


def spec_of(prompt: str, cell: int, colour: str) -> PromptSpec:
    shape = prompt.split()[2]
    return PromptSpec(prompt, "single", (ExpectedObject(colour, shape, None, POSITIONS[cell]),))


def renders(flip: bool = False):
    def generate(prompt: str, seed: int, n: int):
        cell = next(c for c in range(9) if cell_prompt(c)[0] == prompt)
        spec = spec_of(prompt, cell, cell_prompt(cell)[1])
        images = [render(reference_scene(spec, 32, seed=seed + i)) for i in range(n)]
        return [image[:, ::-1] if flip else image for image in images]

    return generate


def test_renders_of_the_stated_cell_score_full_marks():
    report = evaluate_positions(renders(), samples_per_cell=3)
    assert report.images == 27 and report.horizontal == 1.0 and report.vertical == 1.0
    assert np.trace(report.columns[:, :3]) == 27


def test_mirrored_renders_get_the_columns_wrong_and_the_rows_right():
    report = evaluate_positions(renders(flip=True), samples_per_cell=2)
    assert report.vertical == 1.0
    assert report.horizontal == 6 / 18  # only the centre column survives a mirror
    assert report.columns[0, 2] == 6 and report.columns[2, 0] == 6


def test_blank_images_are_other():
    report = evaluate_positions(lambda p, s, n: [np.full((32, 32, 3), 128, np.uint8)] * n, 1)
    assert report.horizontal == 0.0 and report.columns[:, 3].sum() == 9 and "other" in report.table()


def test_cell_prompts_read_like_the_data_sets_captions():
    prompts = {s.prompt for s in prompt_set()}
    assert cell_prompt(0)[0] == "a red circle in the top left"
    assert len({cell_prompt(c)[0] for c in range(9)}) == 9
    assert prompts  # the prompt set exists; cell prompts use its grammar, not its exact list


def test_placement_reads_the_largest_object_of_the_colour_when_there_are_extras():
    def two_objects(prompt: str, seed: int, n: int):
        cell = next(c for c in range(9) if cell_prompt(c)[0] == prompt)
        colour = cell_prompt(cell)[1]
        extra_cell = (cell + 4) % 9
        spec = PromptSpec(
            prompt,
            "binding",
            (
                ExpectedObject(colour, prompt.split()[2], "large", POSITIONS[cell]),
                ExpectedObject(colour, prompt.split()[2], "small", POSITIONS[extra_cell]),
            ),
        )
        return [render(reference_scene(spec, 32, seed=seed + i)) for i in range(n)]

    report = evaluate_positions(two_objects, samples_per_cell=1)
    assert report.horizontal == 0.0  # never exactly one object
    assert report.placement == (1.0, 1.0)
