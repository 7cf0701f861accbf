"""The zoo's shapes world in motion: clips with exact masks per frame and expressions that need motion or
persistence, J&F of RefAM on them with the zoo's image DiT frame by frame, and ``vlmtools segment`` on
video input (a video file, a folder of frames, a held-out zoo clip)."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from vlmtools_zoo import video, world
from vlmtools_zoo.world import COLOURS

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast")


def test_a_clip_is_a_pure_function_of_its_seed_and_apart_from_the_scenes():
    a, b = video.clip("test", 3), video.clip("test", 3)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))
    assert a.seed == world.SPLITS["test"] + video.SEED_OFFSET + 3 and len(a.images) == video.FRAMES
    assert video.clip("val", 3).seed != a.seed


@pytest.mark.parametrize("index", range(6))
def test_visible_masks_are_the_pixels_drawn_for_each_shape(index):
    clip = video.clip("test", index)
    for f in range(clip.frames):
        pixels = np.asarray(clip.images[f])
        visible, whole = clip.visible[f], clip.shape_masks[f]
        assert not (visible.sum(0) > 1).any()  # no pixel belongs to two shapes
        for i, track in enumerate(clip.tracks):
            assert (visible[i] <= whole[i]).all()
            assert (pixels[visible[i]] == COLOURS[track.obj.colour]).all()
            in_front = whole[i + 1:].any(0) if i + 1 < len(clip.tracks) else np.zeros_like(whole[i])
            assert np.array_equal(visible[i], whole[i] & ~in_front)  # drawn back to front


def test_shapes_move_as_their_expressions_say():
    moved = 0
    for index in range(20):
        clip = video.clip("test", index)
        for ref in clip.referring_expressions():
            rows, cols = np.nonzero(clip.shape_masks[0, ref.target])
            first = np.array([cols.mean(), rows.mean()])
            rows, cols = np.nonzero(clip.shape_masks[-1, ref.target])
            last = np.array([cols.mean(), rows.mean()])
            step = (last - first) / (clip.frames - 1)
            if "moves left" in ref.text:
                assert step[0] < -1.5 and abs(step[1]) < 0.5
            elif "moves right" in ref.text:
                assert step[0] > 1.5 and abs(step[1]) < 0.5
            elif "moves up" in ref.text:
                assert step[1] < -1.5 and abs(step[0]) < 0.5
            elif "moves down" in ref.text:
                assert step[1] > 1.5 and abs(step[0]) < 0.5
            elif "stays still" in ref.text:
                assert np.abs(step).max() < 1e-9
            moved += ref.kind == "motion"
    assert moved >= 10


def test_each_expression_names_one_shape_and_needs_what_its_kind_says():
    kinds = {kind: 0 for kind in video.KINDS}
    for index in range(40):
        clip = video.clip("test", index)
        for ref in clip.referring_expressions():
            kinds[ref.kind] += 1
            t = clip.tracks[ref.target]
            if ref.kind == "motion":  # the look alone names several shapes, the look and the motion one
                look = ref.text.removeprefix("the ").split(" that ")[0]
                same = [u for u in clip.tracks if look in (u.name, u.obj.shape)]
                assert len(same) > 1 and sum(u.motion == t.motion for u in same) == 1
            elif ref.kind == "persistence":
                assert clip.hidden(ref.target).max() >= 0.5 and ref.occluded
                assert sum(u.name == t.name for u in clip.tracks) == 1
            else:
                assert ref.text == f"the {t.name}" and sum(u.name == t.name for u in clip.tracks) == 1
            assert ref.occluded == bool(clip.hidden(ref.target).max() >= 0.5)
    assert all(kinds.values()), kinds


def test_letterboxed_frames_and_truths_as_flux_shapes_sees_them():
    sample = video.video_samples(1, "test")[0]
    assert len(sample.frames) == video.FRAMES and sample.frames[0].size == (64, 64)
    assert sample.masks.shape == (video.FRAMES, 64, 64) and sample.masks.dtype == bool
    clip = video.clip("test", 0)
    ref = clip.referring_expressions()[0]
    areas = clip.visible[:, ref.target].sum((1, 2))
    scale = 64 ** 2 / max(clip.width, clip.height) ** 2
    assert np.allclose(sample.masks.sum((1, 2)), areas * scale, rtol=0.35, atol=4)


def test_jf_of_refam_on_zoo_clips_with_the_image_dit_frame_by_frame():
    """J&F with truth: every frame's mask scored against the referent's visible pixels, by sequence."""
    import vlmtools_zoo as zoo
    from grounding import RefAM
    from grounding.metrics import SegmentationScores, boundary_f
    from grounding.refam.video import segment_video
    from vlmtools.masks import iou

    refam = RefAM(zoo.load("flux-shapes"))
    samples = video.video_samples(2, "test")
    scores = video.video_scores(refam, samples, smoothing=0.0)
    j, f = [], []
    for sample in samples:
        segs = segment_video(refam, sample.frames, sample.expression, smoothing=0.0)
        assert [seg.settings["path"] for seg in segs] == ["frames"] * video.FRAMES
        j.append(np.mean([iou(seg.mask, truth) for seg, truth in zip(segs, sample.masks)]))
        f.append(np.mean([boundary_f(seg.mask, truth) for seg, truth in zip(segs, sample.masks)]))
    summary = scores["all"].summary()
    assert summary["J"] == pytest.approx(np.mean(j)) and summary["F"] == pytest.approx(np.mean(f))
    assert summary["J&F"] == pytest.approx((np.mean(j) + np.mean(f)) / 2)
    assert set(scores) >= {"all", samples[0].kind} and isinstance(scores["all"], SegmentationScores)


def build_parser():
    import vlmtools_app.segment

    parser = argparse.ArgumentParser(prog="vlmtools")
    vlmtools_app.segment.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_segments_a_folder_of_frames_in_one_pass_on_a_video_dit(tmp_path, monkeypatch, capsys):
    import vlmtools_app.segment
    from vlmtools.testing.pipelines import VIDEO_SIZE, tiny_wan_pipeline

    monkeypatch.setattr(vlmtools_app.segment, "load_model", lambda name: tiny_wan_pipeline())
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # Wan folds 1 + 4 k frames: the sixth is dropped
        Image.fromarray((rng.random((40, 60, 3)) * 255).astype(np.uint8)).save(folder / f"f{i:02d}.png")
    args = build_parser().parse_args(["segment", str(folder), "the red circle", "--out", str(tmp_path / "out"),
                                      "--resize", *map(str, VIDEO_SIZE)])
    assert args.run(args) == 0
    assert "segmenting the first 5 of 6" in capsys.readouterr().out
    info = json.loads((tmp_path / "out" / "video.json").read_text())
    assert info["settings"]["path"] == "clip" and info["settings"]["family"] == "wan"
    assert [r["latent_frame"] for r in info["frames"]] == [0, 1, 1, 1, 1]
    assert Image.open(tmp_path / "out" / "frames" / "0004_mask.png").size == (60, 40)


def test_cli_segments_a_video_file_frame_by_frame_on_an_image_dit(tmp_path, monkeypatch):
    import vlmtools_app.segment
    from vlmtools.testing.pipelines import tiny_flux_pipeline

    monkeypatch.setattr(vlmtools_app.segment, "load_model", lambda name: tiny_flux_pipeline())
    rng = np.random.default_rng(0)
    frames = [Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    path = tmp_path / "clip.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert len(vlmtools_app.segment.read_frames(path)) == 3
    args = build_parser().parse_args(["segment", str(path), "the red circle", "--out", str(tmp_path / "out"),
                                      "--magnets", "."])
    assert args.run(args) == 0
    info = json.loads((tmp_path / "out" / "video.json").read_text())
    assert info["settings"]["path"] == "frames" and info["settings"]["smoothing"] == 0.5 and len(info["frames"]) == 3
    with pytest.raises(ValueError, match="no image files"):
        vlmtools_app.segment.read_frames(tmp_path / "out")


def test_cli_segments_a_held_out_zoo_clip_and_scores_it(tmp_path, capsys):
    args = build_parser().parse_args(["segment", "--video", "--out", str(tmp_path / "out")])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    sample = video.video_samples(1, "test")[0]
    assert f"{sample.expression!r}" in out and "J&F with the referent's true masks:" in out
    assert len(list((tmp_path / "out" / "frames").glob("*_mask.png"))) == video.FRAMES
