"""The position confusion matrix: renders of each stated cell score 100% on both axes, mirrored renders
score 0% horizontally and 100% vertically, and images without exactly one object are "other". The
position-word test gives a model that follows the words 100% and one that ignores them 50%."""

from types import SimpleNamespace

import numpy as np
import torch

from unnoise.data.shapes import POSITIONS, render
from unnoise.eval.positions import (
    MIRRORED_WORDS,
    PROBE_SIGMAS,
    cell_prompt,
    evaluate_positions,
    mirrored,
    position_word_test,
    probe_samples,
)
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


# --- the position-word test ------------------------------------------------------------------------


class Captions(list):
    """A stand-in text encoder's output: the captions themselves."""

    def to(self, device):
        return self


class WordsPipe:
    """A stand-in model on the probe's own samples: `follows` answers the true caption with its image and a
    mirrored caption with the mirrored image (the object in the mirrored cell); otherwise it ignores the text
    and answers the same for both."""

    resolution, device = 32, torch.device("cpu")

    def __init__(self, follows: bool):
        self.follows = follows
        self.images = {}
        for axis, flip in (("horizontal", -1), ("vertical", -2)):
            for sample in probe_samples(32, axis, 8):
                self.images[sample.caption] = sample.tensor()
                self.images[mirrored(sample.caption, axis)] = sample.tensor().flip(flip)
        self.text = SimpleNamespace(encode=Captions)

    def denoiser(self, x, sigma, captions):
        if not self.follows:
            return x / (1 + sigma[:, None, None, None] ** 2)
        return torch.stack([self.images[c] for c in captions])


def test_mirrored_swaps_only_the_position_word_of_the_axis():
    assert mirrored("a red circle in the top left", "horizontal") == "a red circle in the top right"
    assert mirrored("a red circle in the top left", "vertical") == "a red circle in the bottom left"
    assert mirrored("a blue square at the bottom", "vertical") == "a blue square at the top"
    assert mirrored("a blue square at the bottom", "horizontal") == "a blue square at the bottom"


def test_probe_samples_name_a_position_off_the_middle_of_the_axis():
    for axis, words in MIRRORED_WORDS.items():
        for sample in probe_samples(32, axis, 12):
            assert sample.scene.kind == "single" and set(words) & set(sample.caption.split())
            assert mirrored(sample.caption, axis) != sample.caption


def test_a_model_that_follows_the_words_prefers_the_true_caption_every_time():
    result = position_word_test(WordsPipe(follows=True), samples=8)
    for by_sigma in result.values():
        assert set(by_sigma) == {str(s) for s in PROBE_SIGMAS}
        assert all(v["preferred"] == 1.0 and v["gap"] > 0 for v in by_sigma.values())


def test_a_model_that_ignores_the_words_is_at_chance():
    result = position_word_test(WordsPipe(follows=False), samples=8)
    assert all(v == {"preferred": 0.5, "gap": 0.0} for by in result.values() for v in by.values())
