"""InpaintEval's trials and judge, checked with an oracle editor (draws exactly the asked-for object) and
a do-nothing editor, so the benchmark itself is known to tell right from wrong."""

import dataclasses

import numpy as np
from PIL import Image

from unnoise.data.shapes import object_in_cell, render
from unnoise.eval.inpaint_eval import changed_outside, evaluate_inpainting, inpaint_trials

TRIALS = inpaint_trials(32)


def oracle(trial):
    """The trial's scene with its object recoloured or reshaped in place: what a perfect inpainter draws."""
    obj, want = trial.scene.objects[0], trial.target.objects[0]
    new = object_in_cell(want.shape, want.colour, obj.size, 0, (0, 0)).scaled(32)
    new = dataclasses.replace(new, center=obj.center, position_name=obj.position_name)
    return Image.fromarray(render(dataclasses.replace(trial.scene, objects=(new,))))


def test_every_colour_and_shape_is_edited_both_ways():
    assert len(TRIALS) == 36
    assert {t.change for t in TRIALS} == {"colour", "shape"}
    originals = {(t.scene.objects[0].colour, t.scene.objects[0].shape) for t in TRIALS}
    assert len(originals) == 18
    for t in TRIALS:
        before, after = t.scene.objects[0], t.target.objects[0]
        assert (before.colour != after.colour) == (t.change == "colour")
        assert (before.shape != after.shape) == (t.change == "shape")
        mask = np.asarray(t.mask()) > 0
        left, top, right, bottom = before.bounding_box()
        assert mask[int(top) : int(bottom) + 1, int(left) : int(right) + 1].all()  # the object is inside


def test_an_oracle_scores_every_trial_and_doing_nothing_scores_none():
    by_prompt = {t.target.prompt: t for t in TRIALS}
    perfect = evaluate_inpainting(
        lambda image, mask, prompt, seed, n: [oracle(by_prompt[prompt])] * n, TRIALS, 1
    )
    nothing = evaluate_inpainting(lambda image, mask, prompt, seed, n: [image] * n, TRIALS, 1)
    assert perfect["success"] == 1.0, [r for r in perfect["results"] if not r["correct"]][:3]
    assert nothing["success"] == 0.0
    assert nothing["pixels_changed_outside_masks"] == 0


def test_pixels_changed_outside_the_mask_are_counted():
    trial = TRIALS[0]
    image, mask = trial.image(), trial.mask()
    edited = np.asarray(image).copy()
    edited[0, 0] = 255 - edited[0, 0]  # the corner is outside every mask
    edited[np.asarray(mask) > 0] = 0  # inside: free to change
    assert changed_outside(Image.fromarray(edited), image, mask) == 1
