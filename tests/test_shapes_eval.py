"""ShapesEval is trusted in both directions: it passes what the data set draws for a prompt, and fails
noise, blank backgrounds and images drawn for another prompt.

Measured with the prompt set of version 1 (96 prompts), at 32 and 64 px:
- the data set's own renders of each prompt (`reference_scene`): 100% correct, every background; also
  with Gaussian pixel noise of sigma 20 added, 95/96 at 32 px and 96/96 at 64 px (not tested here);
  data set samples whose captions are in the prompt set: 409/409 in the first 3000 samples of seed 0;
- uniform noise, Gaussian noise and blank backgrounds: 0%;
- deliberately wrong prompts (binding colours swapped, count one off, relation mirrored, single with
  another colour, shape, stated size or stated position): 0%;
- a render of another prompt of the same category (3 other prompts each): single 1/72 (a render for
  "an orange circle in the center" that came out small is also right for "a small orange circle"),
  the other categories 0/72.
"""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from unnoise.data.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, ShapesDataset, render, sample_scene
from unnoise.errors import UnnoiseError
from unnoise.eval import shapes_eval
from unnoise.eval.shapes_eval import (
    CATEGORIES,
    PROMPTS_PER_CATEGORY,
    ExpectedObject,
    PromptSpec,
    check,
    evaluate,
    prompt_set,
    reference_scene,
)

RESOLUTIONS = [32, 64]
PROMPTS_V1_SHA256 = (
    "321633009ac1d53622c795d3e4fd7379d67bc5c69d43f1a7554acad1991fe0e9"  # of the 96 prompts, joined
)


@pytest.fixture(scope="module")
def specs():
    return prompt_set()


def render_for(spec, resolution, seed):
    return render(reference_scene(spec, resolution, seed=seed))


def accuracy(pairs):
    """Fraction of (image, spec) pairs the checker calls correct."""
    marks = [check(image, spec)[0] for image, spec in pairs]
    return sum(marks) / len(marks)


# --- the prompt set -----------------------------------------------------------------------------------------


def test_prompt_set_is_fixed_balanced_and_distinct(specs):
    assert prompt_set() == specs
    assert len({s.prompt for s in specs}) == len(specs) == PROMPTS_PER_CATEGORY * len(CATEGORIES)
    for category in CATEGORIES:
        assert sum(s.category == category for s in specs) == PROMPTS_PER_CATEGORY
    counts = [len(s.objects) for s in specs if s.category == "counting"]
    assert sorted(set(counts)) == [1, 2, 3, 4]
    relations = {s.relation for s in specs if s.category == "two_objects"}
    assert relations == {"left of", "right of", "above", "below"}
    stated = {(s.objects[0].size is not None, s.objects[0].position is not None) for s in specs[:24]}
    assert len(stated) == 4  # nothing, size, position, both
    # The set must never change within a version: a change to how prompts are built must bump it.
    digest = hashlib.sha256("\n".join(s.prompt for s in specs).encode()).hexdigest()
    assert digest == PROMPTS_V1_SHA256
    with pytest.raises(UnnoiseError):
        prompt_set(version=2)


def test_prompts_read_like_data_set_captions(specs):
    """Every prompt appears among the data set's own captions (same grammar) or is built from its words."""
    captions = {sample_scene(0, i, 32)[1] for i in range(3000)}
    assert sum(s.prompt in captions for s in specs) >= len(specs) // 2
    words = set(" ".join(captions).replace(",", "").split())
    assert all(set(s.prompt.replace(",", "").split()) <= words for s in specs)


# --- trust: renders of the prompt pass --------------------------------------------------------------------


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_renders_of_each_prompt_pass_on_every_background(specs, resolution):
    pairs = [
        (render(reference_scene(s, resolution, seed=k, background=bg)), s)
        for k, s in enumerate(specs)
        for bg in BACKGROUNDS
    ]
    assert accuracy(pairs) >= 0.99


def test_data_set_samples_with_captions_in_the_prompt_set_pass(specs):
    by_prompt = {s.prompt: s for s in specs}
    dataset = ShapesDataset(resolution=32, seed=0)
    pairs = [
        (dataset[i].image, by_prompt[caption])
        for i in range(1500)
        if (caption := sample_scene(0, i, 32)[1]) in by_prompt
    ]
    assert len(pairs) >= 100
    assert accuracy(pairs) >= 0.99


def test_the_judge_reads_colour_shape_size_and_position():
    spec = PromptSpec("x", "single", (ExpectedObject("orange", "triangle", "large", "bottom right"),))
    _, details = check(render_for(spec, 64, seed=3), spec)
    (found,) = details["found"]
    assert (found["colour"], found["shape"], found["size"], found["position"]) == (
        "orange",
        "triangle",
        "large",
        "bottom right",
    )


def test_check_takes_pil_images_and_float_arrays(specs):
    image = render_for(specs[30], 32, seed=0)
    assert check(Image.fromarray(image), specs[30])[0]
    assert check(image.astype(np.float32) / 255, specs[30])[0]
    with pytest.raises(UnnoiseError):
        check(image[..., 0], specs[30])


# --- trust: what is not the prompt fails -------------------------------------------------------------------


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_noise_and_blank_images_fail(specs, resolution):
    rng = np.random.default_rng(0)
    noise = [(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8), s) for s in specs]
    assert accuracy(noise) < 0.05
    blank = [
        (np.full((resolution, resolution, 3), rgb, np.uint8), s)
        for s in specs
        for rgb in BACKGROUNDS.values()
    ]
    assert accuracy(blank) < 0.05


def wrong(spec: PromptSpec) -> PromptSpec:
    """A prompt of the same category that the render of `spec` does not satisfy."""
    objects = spec.objects
    if spec.category == "binding":  # colours rotated among the shapes
        colours = [o.colour for o in objects]
        shifted = colours[1:] + colours[:1]
        objects = tuple(dataclasses.replace(o, colour=c) for o, c in zip(objects, shifted, strict=True))
        return dataclasses.replace(spec, objects=objects)
    if spec.category == "counting":  # one more, or one fewer where there are four
        n = len(objects) + (1 if len(objects) < 4 else -1)
        return dataclasses.replace(spec, objects=objects[:1] * n)
    if spec.category == "two_objects":  # the mirrored relation
        mirror = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        return dataclasses.replace(spec, relation=mirror[spec.relation])
    (obj,) = objects  # single: change what the prompt states last
    if obj.position is not None:
        changed = dataclasses.replace(obj, position=POSITIONS[(POSITIONS.index(obj.position) + 4) % 9])
    elif obj.size is not None:
        changed = dataclasses.replace(obj, size="small" if obj.size == "large" else "large")
    elif len(obj.colour) % 2:  # a fixed, arbitrary choice
        changed = dataclasses.replace(obj, shape=SHAPES[(SHAPES.index(obj.shape) + 1) % 3])
    else:
        names = list(COLOURS)
        changed = dataclasses.replace(obj, colour=names[(names.index(obj.colour) + 1) % len(names)])
    return dataclasses.replace(spec, objects=(changed,))


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_renders_of_a_wrong_prompt_fail(specs, resolution):
    for category in CATEGORIES:
        pairs = [
            (render_for(s, resolution, seed=k), wrong(s))
            for k, s in enumerate(specs)
            if s.category == category
        ]
        assert accuracy(pairs) < 0.05, category


def test_renders_of_another_prompt_of_the_same_category_mostly_fail(specs):
    for category in CATEGORIES:
        same = [s for s in specs if s.category == category]
        pairs = [(render_for(same[(i + 1) % len(same)], 32, seed=i), s) for i, s in enumerate(same)]
        assert accuracy(pairs) < 0.1, category


# --- running it -------------------------------------------------------------------------------------------


def rendering_generator(resolution):
    """A perfect 'model': image i of a request is a render of the prompt's scene from seed + i."""
    by_prompt = {s.prompt: s for s in prompt_set()}

    def generate(prompt, seed, n):
        return [Image.fromarray(render_for(by_prompt[prompt], resolution, seed + i)) for i in range(n)]

    return generate


def test_evaluate_reports_per_category_and_overall(specs):
    calls = []

    def generate(prompt, seed, n):
        calls.append((prompt, seed, n))
        return rendering_generator(32)(prompt, seed, n) if "circle" in prompt else [np.zeros((32, 32, 3))] * n

    report = evaluate(generate, specs, 2, seed=5)
    assert calls == [(s.prompt, 5, 2) for s in specs]
    categories = report.categories()
    assert list(categories) == list(CATEGORIES)
    for name, c in categories.items():
        with_circle = [s for s in specs if s.category == name and "circle" in s.prompt]
        assert c["total"] == 2 * PROMPTS_PER_CATEGORY
        assert c["correct"] == 2 * len(with_circle)
    assert report.overall == pytest.approx(np.mean([c["accuracy"] for c in categories.values()]))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["prompts_version"] == 1 and len(data["prompts"]) == len(specs)
    assert data["overall"] == pytest.approx(report.overall)
    table = report.table()
    assert all(name in table for name in CATEGORIES) and "overall" in table


def test_run_shapes_eval_generates_through_the_pipeline(monkeypatch):
    seen = []

    class FakePipeline:
        default_guidance = 2.5  # the model's own: what the eval uses when given none
        default_bind_attributes = False

        def generate(self, prompt, *, seed, num_images, steps, sampler, guidance, bind_attributes):
            seen.append((seed, num_images, steps, sampler, guidance, bind_attributes))
            return rendering_generator(32)(prompt, seed, num_images)

    monkeypatch.setattr("unnoise.pipeline.load", lambda path, device="auto": FakePipeline())
    report = shapes_eval.run_shapes_eval("some/model", samples_per_prompt=1, steps=7, seed=3)
    assert set(seen) == {(3, 1, 7, "dpmpp_2m", 2.5, False)} and report.settings["guidance"] == 2.5
    assert report.settings["bind_attributes"] is False
    seen.clear()
    bound = shapes_eval.run_shapes_eval("some/model", samples_per_prompt=1, steps=7, bind_attributes=True)
    assert {s[-1] for s in seen} == {True} and bound.settings["bind_attributes"] is True
    assert report.overall >= 0.99
    assert report.to_dict()["settings"]["model"] == "some/model"


def test_a_quick_look_takes_the_first_prompts_of_each_category(monkeypatch):
    class FakePipeline:
        default_guidance = 3.0
        default_bind_attributes = False

        def generate(self, prompt, *, seed, num_images, steps, sampler, guidance, bind_attributes):
            return rendering_generator(32)(prompt, seed, num_images)

    monkeypatch.setattr("unnoise.pipeline.load", lambda path, device="auto": FakePipeline())
    report = shapes_eval.run_shapes_eval("some/model", samples_per_prompt=1, prompts_per_category=2)
    chosen = [r.spec for r in report.results]
    assert chosen == [s for c in CATEGORIES for s in [t for t in prompt_set() if t.category == c][:2]]
    with pytest.raises(UnnoiseError, match="prompts per category"):
        shapes_eval.run_shapes_eval("some/model", prompts_per_category=0)


def test_a_torchrun_launch_shards_shapes_eval_and_gathers_the_single_process_report(tmp_path):
    """Issue 30 item 5: two processes judge half the prompts each and rank 0 writes one report, equal to
    the single process's."""
    from tests.conftest import reports_alone_and_under_torchrun

    args = ["eval", "shapes", "--model", "shapes-32", "--prompts-per-category", "1", "--samples", "2",
            "--steps", "4", "--device", "cpu"]  # fmt: skip
    alone, shared = reports_alone_and_under_torchrun(args, tmp_path)
    assert shared == alone
