"""The procedural shapes data set: every caption is true of its image, and sample i depends only on (seed, i).

Checked: determinism (same seed and index give the same pixels and caption, in any order; another seed
gives other images); captions parse back to the ground truth (colour and shape words, count, size,
position and relation phrases); relations hold by the object centroids, with the stated margin;
positions name the grid cell of the centre; objects do not overlap and are at least 6 px across;
counting scenes show as many separate objects as they say; the pixels agree with the ground truth
(each object's colour at its centre, measured centroids within a fraction of a pixel); images have
the right shape, dtype and range at 32 and 64 pixels; the ground truth survives a JSON round trip; a
caption mix changes what is drawn, and the default draws what the data set always drew.
"""

import json
import re

import numpy as np
import pytest
import torch
from scipy import ndimage

from unnoise.data.shapes import (
    COLOURS,
    RELATION_MARGIN,
    SHAPES,
    CaptionMix,
    Scene,
    ShapesDataset,
    position_name,
    relation_holds,
)
from unnoise.errors import UnnoiseError

N_SAMPLES = 300

# The caption grammar, written out again here so the test does not read it back from the module.
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}
POSITION_PHRASES = {
    "in the top left": "top left",
    "at the top": "top",
    "in the top right": "top right",
    "on the left": "left",
    "in the center": "center",
    "on the right": "right",
    "in the bottom left": "bottom left",
    "at the bottom": "bottom",
    "in the bottom right": "bottom right",
}
RELATION_PHRASES = {
    "to the left of": "left of",
    "to the right of": "right of",
    "above": "above",
    "below": "below",
}
NOUN = re.compile(rf"\b(?:(small|large) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})s?\b")


@pytest.fixture(scope="module")
def samples():
    dataset = ShapesDataset(resolution=32, seed=0)
    return [dataset[i] for i in range(N_SAMPLES)]


def parse(caption: str) -> dict:
    """What a caption claims: its (size, colour, shape) nouns, count, position and relation."""
    first = caption.split()[0]
    position = [name for phrase, name in POSITION_PHRASES.items() if caption.endswith(" " + phrase)]
    between = NOUN.split(caption)[4] if len(NOUN.findall(caption)) == 2 else ""  # "above a", "and an"
    between = re.sub(r"\s+an?\s*$", "", between).strip()
    return {
        "nouns": NOUN.findall(caption),
        "count": NUMBERS.get(first),
        "articles": re.findall(r"\b(an?) (\w+)", caption),
        "position": position[0] if position else None,
        "relation": RELATION_PHRASES.get(between),
    }


def test_same_seed_and_index_give_the_same_sample_in_any_order():
    forward = ShapesDataset(seed=3)
    first = [forward[i] for i in range(8)]
    backward = ShapesDataset(seed=3)
    for i in reversed(range(8)):
        again = backward[i]
        assert np.array_equal(again.image, first[i].image) and again.caption == first[i].caption
        assert again.scene == first[i].scene
    assert backward[10**12].caption == ShapesDataset(seed=3)[10**12].caption  # any index, however large


def test_another_seed_gives_other_images():
    a, b = ShapesDataset(seed=0), ShapesDataset(seed=1)
    assert all(not np.array_equal(a[i].image, b[i].image) for i in range(20))
    assert sum(a[i].caption != b[i].caption for i in range(20)) >= 15


def test_captions_parse_back_to_the_ground_truth(samples):
    for sample in samples:
        scene, claim = sample.scene, parse(sample.caption)
        stated = [(colour, shape) for _, colour, shape in claim["nouns"]]
        if scene.kind == "count":
            assert claim["count"] == len(scene.objects), sample.caption
            assert sample.caption.endswith("s") == (claim["count"] > 1), sample.caption
            assert {(o.colour, o.shape) for o in scene.objects} == set(stated) and len(stated) == 1
            continue
        assert stated == [(o.colour, o.shape) for o in scene.objects], sample.caption
        assert all(article == ("an" if word[0] in "aeiou" else "a") for article, word in claim["articles"])
        sizes = [size for size, _, _ in claim["nouns"] if size]
        assert sizes == ([scene.objects[0].size] if "size" in scene.mentioned else []), sample.caption
        expected_position = scene.objects[0].position_name if "position" in scene.mentioned else None
        assert claim["position"] == expected_position, sample.caption
        assert claim["relation"] == scene.relation, sample.caption
        assert scene.kind != "binding" or len({o.colour for o in scene.objects}) == len(scene.objects)


def test_relations_hold_by_the_centroids(samples):
    relations = [s.scene for s in samples if s.scene.kind == "relation"]
    assert len(relations) > 30
    for scene in relations:
        (sx, sy), (rx, ry) = scene.objects[0].center, scene.objects[1].center
        margin = RELATION_MARGIN * scene.resolution
        along = {"left of": rx - sx, "right of": sx - rx, "above": ry - sy, "below": sy - ry}[scene.relation]
        across = abs(ry - sy) if scene.relation in ("left of", "right of") else abs(rx - sx)
        assert along >= margin and along > across
        assert relation_holds(scene.relation, (sx, sy), (rx, ry), margin=margin)


def test_positions_objects_apart_and_visible(samples):
    for scene in (s.scene for s in samples):
        assert 1 <= len(scene.objects) <= 4
        boxes = [o.bounding_box() for o in scene.objects]
        for obj, (left, top, right, bottom) in zip(scene.objects, boxes, strict=True):
            col, row = int(3 * obj.center[0] / 32), int(3 * obj.center[1] / 32)
            assert obj.position_name == position_name(obj.center, 32)
            assert obj.position_name.replace("center", "").split() == [
                *(["top"] if row == 0 else ["bottom"] if row == 2 else []),
                *(["left"] if col == 0 else ["right"] if col == 2 else []),
            ]
            assert 0 < left < right < 32 and 0 < top < bottom < 32
            assert right - left >= 6 and bottom - top >= 6
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], scene


def test_counting_scenes_show_that_many_separate_objects(samples):
    counts = [s for s in samples if s.scene.kind == "count"]
    assert {len(s.scene.objects) for s in counts} == {1, 2, 3, 4}
    for sample in samples:  # any scene: objects are saturated, backgrounds grey
        pixels = sample.image.astype(int)
        saturated = pixels.max(-1) - pixels.min(-1) > 65  # (H, W)
        _, components = ndimage.label(saturated)
        assert components == len(sample.scene.objects), sample.caption


def measured_centroid(image: np.ndarray, scene: Scene, index: int) -> tuple[float, float]:
    """Coverage-weighted centroid of one object, from its pixels inside its bounding box."""
    obj, background = scene.objects[index], np.array(scene.background_rgb)
    direction = np.array(obj.rgb) - background
    coverage = ((image.astype(float) - background) @ direction / (direction @ direction)).clip(0, 1)  # (H, W)
    ys, xs = np.mgrid[0 : image.shape[0], 0 : image.shape[1]] + 0.5  # pixel centres
    left, top, right, bottom = obj.bounding_box()
    coverage *= (xs > left - 0.5) & (xs < right + 0.5) & (ys > top - 0.5) & (ys < bottom + 0.5)
    return float((coverage * xs).sum() / coverage.sum()), float((coverage * ys).sum() / coverage.sum())


@pytest.mark.parametrize("resolution", [32, 64])
def test_pixels_agree_with_the_ground_truth(resolution):
    dataset = ShapesDataset(resolution=resolution, seed=1)
    for i in range(60):
        sample = dataset[i]
        for k, obj in enumerate(sample.scene.objects):
            x, y = obj.center
            assert tuple(sample.image[int(y), int(x)]) == obj.rgb, sample.caption  # fully covered
            mx, my = measured_centroid(sample.image, sample.scene, k)
            assert abs(mx - x) < 0.25 and abs(my - y) < 0.25, (sample.caption, obj, (mx, my))
        corner = tuple(sample.image[0, 0])
        assert corner == sample.scene.background_rgb


@pytest.mark.parametrize("resolution", [32, 64])
def test_image_shapes_dtypes_and_ranges(resolution):
    dataset = ShapesDataset(resolution=resolution)
    sample = dataset[5]
    assert sample.image.shape == (resolution, resolution, 3) and sample.image.dtype == np.uint8
    x = sample.tensor()
    assert x.shape == (3, resolution, resolution) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close((x + 1) * 127.5, torch.tensor(sample.image).permute(2, 0, 1).float())
    images, captions = dataset.batch([5, 0, 9])
    assert images.shape == (3, 3, resolution, resolution) and captions[0] == sample.caption
    torch.testing.assert_close(images[0], x)
    images, captions = next(dataset.batches(4, start=8))
    assert images.shape == (4, 3, resolution, resolution) and captions[1] == dataset[9].caption


def test_a_scene_is_the_same_at_every_resolution():
    small, large = ShapesDataset(resolution=32, seed=2), ShapesDataset(resolution=64, seed=2)
    for i in range(10):
        a, b = small[i], large[i]
        assert a.caption == b.caption
        for p, q in zip(a.scene.objects, b.scene.objects, strict=True):
            assert q.center == pytest.approx((2 * p.center[0], 2 * p.center[1]))
            assert q.radius == pytest.approx(2 * p.radius)


def test_ground_truth_survives_json(samples):
    for sample in samples[:50]:
        text = json.dumps(sample.scene.to_dict())
        assert Scene.from_dict(json.loads(text)) == sample.scene


def test_the_vocabulary_is_covered(samples):
    scenes = [s.scene for s in samples]
    objects = [o for scene in scenes for o in scene.objects]
    assert {scene.kind for scene in scenes} == {"single", "relation", "count", "binding"}
    assert {o.colour for o in objects} == set(COLOURS) and {o.shape for o in objects} == set(SHAPES)
    assert len({o.position_name for o in objects}) == 9 and {o.size for o in objects} == {"small", "large"}
    assert {scene.relation for scene in scenes} == {None, "left of", "right of", "above", "below"}


def test_bad_input():
    with pytest.raises(UnnoiseError, match="at least 16 pixels"):
        ShapesDataset(resolution=8)
    with pytest.raises(IndexError, match="unbounded"):
        ShapesDataset()[-1]


def test_the_default_caption_mix_draws_what_the_data_set_always_drew():
    default, explicit = ShapesDataset(seed=4), ShapesDataset(seed=4, mix=CaptionMix.parse(""))
    assert [default[i].caption for i in range(50)] == [explicit[i].caption for i in range(50)]
    assert CaptionMix().describe() == "" and CaptionMix.parse("") == CaptionMix()


def test_a_caption_mix_changes_what_is_drawn():
    mix = CaptionMix.parse("single=1,relation=0,count=0,binding=0,position=1")
    scenes = [ShapesDataset(seed=5, mix=mix)[i].scene for i in range(60)]
    assert all(s.kind == "single" and "position" in s.mentioned for s in scenes)
    assert mix.describe() == "single=1,relation=0,count=0,binding=0,position=1"
    assert CaptionMix.parse(mix.describe()) == mix
    counted = CaptionMix.parse("count=3")  # weights are relative: count is 3 / 3.75 of the scenes
    kinds = [ShapesDataset(seed=5, mix=counted)[i].scene.kind for i in range(400)]
    assert 0.72 < kinds.count("count") / 400 < 0.88


def test_a_bad_caption_mix_is_named():
    with pytest.raises(UnnoiseError, match="'sngle' is not one of single"):
        CaptionMix.parse("sngle=1")
    with pytest.raises(UnnoiseError, match="is not name=number"):
        CaptionMix.parse("single=lots")
    with pytest.raises(UnnoiseError, match="at most 1"):
        CaptionMix.parse("position=1.5")
    with pytest.raises(UnnoiseError, match="weight > 0"):
        CaptionMix.parse("single=0,relation=0,count=0,binding=0")
    with pytest.raises(UnnoiseError, match="finite numbers >= 0"):
        CaptionMix.parse("count=-1")
