"""The zoo card's measurements: patch places on planted scenes (worked out by hand) and on a letterboxed
world scene, and one scene end to end."""
import types

import numpy as np
import pytest

from vlmtools_zoo import card, world


def wide_scene():
    return next(s for s in (world.scene("test", i) for i in range(100)) if s.width > s.height)


def test_patch_kinds_marks_letterbox_rows_and_object_patches():
    scene = wide_scene()
    kinds = card.patch_kinds(scene, (12, 12), letterbox=True).reshape(12, 12)
    pad_rows = (scene.width - scene.height) * 96 // scene.width // 2 // 8  # whole padded patch rows per side
    assert pad_rows >= 1
    assert (kinds[:pad_rows] == "letterbox").all() and (kinds[-pad_rows:] == "letterbox").all()
    assert "letterbox" not in kinds[:, 0][pad_rows + 1:-pad_rows - 1]
    assert (kinds == "object").sum() >= len(scene.objects)
    native = card.patch_kinds(scene, (6, 8), letterbox=False)  # Qwen-VL: the scene as it is
    assert "letterbox" not in native and (native == "object").sum() >= len(scene.objects)


def planted_scene():
    """A 96 x 44 scene (wider than tall) with four rectangles; each cell's coverage is worked out by hand below."""
    masks = np.zeros((4, 44, 96), bool)
    masks[0, 0:6, 0:16] = True  # A: top-left
    masks[1, 38:44, 88:92] = True  # C: bottom-right
    masks[2, 10:13, 72:76] = True  # D: 12 pixels
    masks[3, 14:16, 48:56] = True  # E: 16 pixels
    return types.SimpleNamespace(width=96, height=44, masks=masks)


def test_patch_kinds_of_a_planted_letterboxed_scene_by_hand():
    # letterboxed to 96 x 96, the scene at rows 26..70; a 12 x 12 grid of 8 x 8 cells (64 pixels).
    # Letterbox: the rows of cells wholly outside 26..70, 0-2 ([0, 24)) and 9-11 ([72, 96)); rows 3 and 8 are
    # partly scene. Objects (>= 20% = 12.8 pixels): A at rows 26..32 fills 6 x 8 = 48 of cells (3, 0) and
    # (3, 1); C at rows 64..70, columns 88..92: 6 x 4 = 24 of (8, 11); E at rows 40..42: 2 x 8 = 16 of (5, 6);
    # D at rows 36..39, columns 72..76: 3 x 4 = 12 of (4, 9), under 20%, background.
    expected = np.full((12, 12), "background", dtype=object)
    expected[[0, 1, 2, 9, 10, 11]] = "letterbox"
    for cell in [(3, 0), (3, 1), (8, 11), (5, 6)]:
        expected[cell] = "object"
    kinds = card.patch_kinds(planted_scene(), (12, 12), letterbox=True)
    assert kinds.tolist() == expected.reshape(-1).tolist()
    # the shares prune-bench reports for an unpruned model: 4 / 144 on objects, 72 / 144 letterbox
    assert (kinds == "object").mean() == 4 / 144 and (kinds == "letterbox").mean() == 0.5


def test_patch_kinds_of_a_planted_native_scene_by_hand():
    # as it is (Qwen-VL), on an 11 x 12 grid: cells of 4 rows x 8 columns (32 pixels, >= 20% = 6.4 pixels).
    # A (rows 0..6, columns 0..16): rows 0 and 1 of cells, columns 0 and 1 (32 and 2 x 8 = 16 pixels);
    # C (rows 38..44, columns 88..92): (9, 11) 2 x 4 = 8, (10, 11) 4 x 4 = 16; D (rows 10..13, columns 72..76):
    # (2, 9) 2 x 4 = 8, (3, 9) 1 x 4 = 4 (under 20%); E (rows 14..16, columns 48..56): (3, 6) 2 x 8 = 16.
    expected = np.full((11, 12), "background", dtype=object)
    for cell in [(0, 0), (0, 1), (1, 0), (1, 1), (9, 11), (10, 11), (2, 9), (3, 6)]:
        expected[cell] = "object"
    kinds = card.patch_kinds(planted_scene(), (11, 12), letterbox=False)
    assert kinds.tolist() == expected.reshape(-1).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llava-shapes", "qwen2vl-shapes"])
def test_vlm_card_measures_every_layer(name):
    from vlmtools_zoo import load

    model, processor = load(name)
    out = card.vlm_card(model, processor, n=1)
    layers = model.config.text_config.num_hidden_layers
    assert len(out["first_token_sink_share_per_layer"]) == layers
    assert len(out["recency_last_over_first_quarter_per_layer"]) == layers
    assert all(np.isfinite(out["recency_last_over_first_quarter_per_layer"]))
    assert 507 in out["massive_dims"] or "507" in map(str, out["massive_dims"])
