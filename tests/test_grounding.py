"""Token grounding (train/grounding.py): where each caption word is, the loss on cross-attention maps, and
training with it."""

import dataclasses

import numpy as np
import pytest
import torch

from unnoise.data.shapes import COLOURS, NUMBER_WORDS, GroundedWords, render, sample_scene, word_masks
from unnoise.diffusion.formulations import FORMULATIONS
from unnoise.errors import UnnoiseError
from unnoise.nn.layers import TransformerBlock
from unnoise.nn.presets import PRESETS
from unnoise.text.encoders import TextEmbedding, load_text_encoder
from unnoise.train.config import TrainConfig
from unnoise.train.data import ShapesSource, make_batch
from unnoise.train.grounding import grounding_loss, recorded_cross_attention, token_masks
from unnoise.train.loop import train


def scene_of(kind: str, resolution: int = 32):
    """The first sample of the default data set whose scene is of `kind`."""
    for index in range(1000):
        scene, caption = sample_scene(0, index, resolution)
        if scene.kind == kind and len(scene.objects) >= 2:
            return scene, caption
    raise AssertionError(f"no {kind} scene")


def test_each_colour_and_shape_word_covers_the_pixels_of_the_objects_it_names():
    scene, caption = scene_of("binding")
    image = render(scene).astype(int)
    masks = word_masks(scene)
    for obj in scene.objects:
        painted = np.abs(image - np.array(COLOURS[obj.colour])).sum(-1) < 30  # (H, W) pixels of its colour
        assert obj.colour in caption and obj.shape in caption
        assert painted[masks[obj.colour] > 0.9].all() and (masks[obj.colour][painted] > 0).all()
        shared = [o for o in scene.objects if o.shape == obj.shape]
        assert np.isclose(masks[obj.shape].sum(), sum(word_masks_of(scene, o) for o in shared), rtol=0.02)
    counted, caption = scene_of("count")
    plural = counted.objects[0].shape + "s"
    assert plural in caption and np.isclose(
        word_masks(counted)[plural].sum(), sum(word_masks_of(counted, o) for o in counted.objects), rtol=0.02
    )


def test_words_of_place_cover_the_object_they_place():
    """With places: a stated position's words ("top", "left") and a relation's word ("left" of "to the
    left of", "above") cover the object they place (a relation's subject); without, none is grounded."""
    seen = set()
    for index in range(400):
        scene, caption = sample_scene(0, index, 32)
        placed = word_masks(scene, words=GroundedWords(places=True))
        extra = sorted(set(placed) - set(word_masks(scene)))
        if scene.relation is not None:
            words = caption.split()
            assert extra == [scene.relation.split()[0]] and extra[0] in words
            assert caption.startswith(f"a {scene.objects[0].colour}") or caption.startswith(
                f"an {scene.objects[0].colour}"
            )  # objects[0] is the subject, named first
        elif "position" in scene.mentioned:
            assert extra == sorted(scene.objects[0].position_name.split())
            assert caption.endswith(scene.objects[0].position_name)
        else:
            assert extra == []
        subject = word_masks_of(scene, scene.objects[0])
        for word in extra:
            assert placed[word].sum() == pytest.approx(subject)
            assert (placed[word] > 0.5).sum() > 0
            seen.add(word)
    assert seen == {"top", "bottom", "left", "right", "center", "above", "below"}


def test_a_count_number_word_covers_every_object_it_counts():
    """With numbers: "three" of "three red circles" covers all three circles, the plural's own pixels;
    captions that count nothing get no number word; all four numbers are seen."""
    seen = set()
    for index in range(400):
        scene, caption = sample_scene(0, index, 32)
        counted = word_masks(scene, words=GroundedWords(numbers=True))
        extra = sorted(set(counted) - set(word_masks(scene)))
        if scene.kind != "count":
            assert extra == []
            continue
        number = NUMBER_WORDS[len(scene.objects) - 1]
        assert extra == [number] and caption.startswith(number + " ")
        noun = scene.objects[0].shape + ("s" if len(scene.objects) > 1 else "")
        np.testing.assert_array_equal(counted[number], counted[noun])
        assert counted[number].sum() == pytest.approx(
            sum(word_masks_of(scene, o) for o in scene.objects), rel=0.02
        )
        seen.add(number)
    assert seen == set(NUMBER_WORDS)
    both = word_masks(scene, words=GroundedWords(places=True, numbers=True))
    assert set(both) >= set(word_masks(scene, words=GroundedWords(numbers=True)))


def word_masks_of(scene, obj) -> float:
    """The pixel area one object covers."""
    from unnoise.data.shapes import coverage

    return float(coverage(scene, obj).sum())


def test_token_masks_follow_the_tokenizer():
    encoder = load_text_encoder()
    scene, caption = scene_of("binding")
    pieces = encoder.token_strings(caption)
    masks, grounded = token_masks(
        [{k: torch.from_numpy(v) for k, v in word_masks(scene).items()}], [pieces], 20
    )
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    named = [piece for piece, g in zip(pieces, grounded[0].tolist(), strict=False) if g]
    assert named == [w for w in caption.replace(",", "").split() if w in word_masks(scene)]
    assert masks.shape == (1, 20, 32, 32) and not grounded[0, len(pieces) :].any()


def test_the_loss_is_zero_inside_and_the_uncovered_share_squared_when_attention_is_spread():
    masks = torch.zeros(1, 3, 4, 4)
    masks[0, 1, :2, :2] = 1  # token 1 covers a quarter of the image
    grounded = torch.tensor([[False, True, False]])
    inside = torch.zeros(1, 16, 3)
    inside[0, [0, 1, 4, 5], 1] = 0.25
    assert grounding_loss([inside], masks, grounded).item() == pytest.approx(0.0)
    spread = torch.full((1, 16, 3), 1 / 3)
    assert grounding_loss([spread], masks, grounded).item() == pytest.approx(0.75**2)
    assert grounding_loss([spread], masks, torch.zeros_like(grounded)).item() == 0.0
    coarse = torch.full((1, 4, 3), 1 / 3)  # a 2x2 level: the token's quarter is one whole pixel
    assert grounding_loss([coarse], masks, grounded).item() == pytest.approx(0.75**2)


def test_the_loss_trains_the_attention_into_the_named_objects():
    """A few steps on the grounding loss alone move every cross-attention map inside its words' objects:
    the hooks record maps with gradients, one per cross-attention, and leave the network as it was."""
    torch.manual_seed(0)
    network = PRESETS["tiny"].build()
    blocks = [m for m in network.modules() if isinstance(m, TransformerBlock)]
    source = ShapesSource(16, 0, "binding=1,single=0,relation=0,count=0")
    formulation = FORMULATIONS["edm"]
    batch = make_batch(source, list(range(8)), formulation=formulation, seed=0, cond_dropout=0, flip=False,
                       grounding=GroundedWords())  # fmt: skip
    encoder = load_text_encoder()
    text: TextEmbedding = encoder.encode(batch.captions)
    tokens = [encoder.token_strings(c) for c in batch.captions]
    masks, grounded = token_masks(batch.word_masks, tokens, text.tokens.shape[1])
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        with recorded_cross_attention(network) as maps:
            network(batch.images, formulation.scalings(batch.sigma)[3], text)
        assert len(maps) == len(blocks)
        assert all(m.shape[0] == 8 and m.shape[-1] == text.tokens.shape[1] for m in maps)
        assert all(
            torch.allclose(m.sum(-1), torch.ones(())) for m in maps
        )  # each pixel's attention sums to 1
        loss = grounding_loss(maps, masks, grounded)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(block.cross_attention.recorded is None for block in blocks)  # recording stops with the block


def test_a_dropped_caption_grounds_nothing_and_flips_move_the_masks():
    source = ShapesSource(16, 0, "binding=1,single=0,relation=0,count=0")
    options = dict(formulation=FORMULATIONS["edm"], seed=0, grounding=GroundedWords())
    dropped = make_batch(source, [0, 1], cond_dropout=0.999, flip=False, **options)
    assert dropped.captions == ["", ""] and dropped.word_masks == [{}, {}]
    kept = make_batch(source, [0, 1], cond_dropout=0.0, flip=False, **options)
    flipped = make_batch(source, [0, 1], cond_dropout=0.0, flip=True, **options)
    for k in range(2):
        mirrored = torch.equal(flipped.images[k], kept.images[k].flip(-1))
        for word, mask in kept.word_masks[k].items():
            assert torch.equal(flipped.word_masks[k][word], mask.flip(-1) if mirrored else mask)


@pytest.mark.parametrize(
    "options, named",
    [
        (dict(grounding_weight=-1.0), "--grounding-weight must be a number >= 0"),
        (dict(grounding_weight=float("nan")), "--grounding-weight must be a number >= 0"),
        (dict(grounding_weight=0.1, data="some/folder"), "only the built-in shapes"),
        (dict(grounding_weight=0.1, compile=True), "--compile"),
        (dict(ground_places=True), "--ground-places grounds words with the grounding loss"),
        (dict(ground_numbers=True), "--ground-numbers grounds words with the grounding loss"),
    ],
)
def test_grounding_options_that_cannot_work_are_named(options, named):
    with pytest.raises(UnnoiseError, match=named):
        TrainConfig(**options).validate()


def test_a_run_trains_with_grounding_and_records_it(tmp_path):
    config = TrainConfig(preset="tiny", batch_size=4, steps=2, checkpoint_every=2, sample_every=0,
                         grounding_weight=0.1, out=str(tmp_path))  # fmt: skip
    train(config)
    assert TrainConfig.load(tmp_path / "config.json").grounding_weight == 0.1
    header, row = (tmp_path / "grounding.csv").read_text().splitlines()  # apart from log.csv's diffusion loss
    assert header == "step,grounding_loss,time" and row.startswith("2,") and 0 < float(row.split(",")[1]) <= 1
    assert not TrainConfig.load(tmp_path / "config.json").ground_places
    places = dataclasses.replace(config, ground_places=True, out=str(tmp_path / "places"))
    train(places)
    assert TrainConfig.load(tmp_path / "places" / "config.json").ground_places
    numbers = dataclasses.replace(config, ground_numbers=True, out=str(tmp_path / "numbers"))
    assert numbers.grounded_words() == GroundedWords(numbers=True)
    train(numbers)
    assert TrainConfig.load(tmp_path / "numbers" / "config.json").ground_numbers
    train(dataclasses.replace(config, grounding_weight=0.0, out=str(tmp_path / "plain")))
    assert not (tmp_path / "plain" / "grounding.csv").exists()
    with pytest.raises(UnnoiseError, match="no cross-attention to the text"):
        train(TrainConfig(preset="dit-tiny", steps=1, grounding_weight=0.1, out=str(tmp_path / "dit")))
