"""The zoo card's measurements: patch places on a letterboxed scene, and one scene end to end."""
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
