"""llava-shapes' trainer end to end on a few steps: every stage checkpoints, resumes and exports."""
from collections import Counter

import pytest
import torch

from vlmtools_zoo import world as W


@pytest.mark.slow
def test_llava_trainer_smoke_run_resumes_and_exports(train_cache, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from vlmtools_zoo import llava, llava_train

    monkeypatch.setattr(llava, "WEIGHTS", tmp_path / "weights")  # never the shipped file
    tower = llava_train.train_tower(2, batch=2)
    llava_train.train_align(tower.state_dict(), 1, 2, batch=1, turns=2)
    ckpts = train_cache / "train" / "llava-shapes"
    assert {p.name for p in ckpts.iterdir()} == {"tower.pt", "words.pt", "align.pt"}
    llava_train.train_align(tower.state_dict(), 1, 3, batch=1, turns=2)  # resumes: one more align step
    assert torch.load(ckpts / "align.pt", weights_only=True)["step"] == 3
    state = load_file(tmp_path / "weights" / "model.safetensors")
    assert {k.split(".")[0] for k in state} == {"vision_tower", "multi_modal_projector", "lora"}


@pytest.mark.slow
def test_refine_stage_follows_align_and_restarts_from_the_shipped_weights(train_cache, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from vlmtools_zoo import llava, llava_train

    monkeypatch.setattr(llava, "WEIGHTS", tmp_path / "weights")
    tower = llava_train.train_tower(2, batch=2)
    llava_train.train_align(tower.state_dict(), 1, 2, batch=1, turns=2, later={"refine": 1})
    ckpts = train_cache / "train" / "llava-shapes"
    assert torch.load(ckpts / "refine.pt", weights_only=True)["step"] == 1
    shipped = load_file(tmp_path / "weights" / "model.safetensors")

    (ckpts / "refine.pt").unlink()  # as on a machine that has only the shipped weights
    llava_train.main(later={"refine": 2}, from_shipped=True, align_batch=1)
    assert torch.load(ckpts / "refine.pt", weights_only=True)["step"] == 2
    refined = load_file(tmp_path / "weights" / "model.safetensors")
    a = "lora.layers.0.self_attn.q_proj.A"  # random at the start of align: a fresh LoRA would draw another
    step = (refined[a].float() - shipped[a].float()).norm()
    assert 0 < step < 0.05 * shipped[a].float().norm()  # two small steps away from the shipped factors


@pytest.mark.slow
def test_reread_stage_moves_the_lm_to_the_last_layer_once_and_reprobe_keeps_it(train_cache, tmp_path, monkeypatch):
    from vlmtools_zoo import llava, llava_train

    monkeypatch.setattr(llava, "WEIGHTS", tmp_path / "weights")
    monkeypatch.setattr(llava_train, "REREAD_TOWER_STEPS", 2)
    tower = llava_train.train_tower(2, batch=2)
    llava_train.train_align(tower.state_dict(), 1, 1, batch=1, turns=2, later={"probe": 1})
    shipped = tmp_path / "weights" / "model.safetensors"
    assert llava.feature_layer(shipped) == -2  # stages 2-6 read layer -2, as LLaVA-1.5
    llava_train.main(later={"reread": 1}, from_shipped=True, align_batch=1)
    ckpts = train_cache / "train" / "llava-shapes"
    assert torch.load(ckpts / "reread_tower.pt", weights_only=True)["step"] == 2
    assert torch.load(ckpts / "reread.pt", weights_only=True)["step"] == 1
    assert llava.feature_layer(shipped) == -1
    llava_train.main(later={"reprobe": 1}, from_shipped=True, align_batch=1)  # stage 8 keeps the layer
    assert torch.load(ckpts / "reprobe.pt", weights_only=True)["step"] == 1
    assert llava.feature_layer(shipped) == -1
    llava_train.main(later={"reread": 1}, from_shipped=True, align_batch=1)  # resumes: done already
    (ckpts / "reread.pt").unlink()  # as on a machine that has only the shipped weights
    with pytest.raises(ValueError, match="already ran"):
        llava_train.main(later={"reread": 1}, from_shipped=True, align_batch=1)


@pytest.mark.slow
def test_recount_tally_and_census_train_the_tower_on_the_count_then_the_lm_on_it(train_cache, tmp_path, monkeypatch):
    """Stage 10 from the shipped weights: 10a moves the tower alone (resumable, reporting each
    step), then LM steps realign; the LM keeps reading the last layer. Stages 11 and 12 do the
    same under checkpoints of their own, 12a with a head for each shape's count."""
    import shutil

    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    from vlmtools_zoo import llava, llava_train

    (tmp_path / "weights").mkdir()
    shutil.copy(llava.WEIGHTS / "model.safetensors", tmp_path / "weights")
    monkeypatch.setattr(llava, "WEIGHTS", tmp_path / "weights")
    monkeypatch.setattr(llava_train, "COUNT_TOWER_STEPS", 2)
    shipped = load_file(tmp_path / "weights" / "model.safetensors")
    llava_train.main(later={"recount": 1}, from_shipped=True, align_batch=1)
    ckpts = train_cache / "train" / "llava-shapes"
    assert torch.load(ckpts / "count_tower.pt", weights_only=True)["step"] == 2
    assert torch.load(ckpts / "recount.pt", weights_only=True)["step"] == 1
    recounted = load_file(tmp_path / "weights" / "model.safetensors")
    assert llava.feature_layer(tmp_path / "weights" / "model.safetensors") == -1
    a = "vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(recounted[a], shipped[a])

    tower = CLIPVisionModel(llava.vision_config())
    tower.load_state_dict({k.removeprefix("vision_tower."): v.float() for k, v in recounted.items()
                           if k.startswith("vision_tower.")})
    reported = []
    heads = llava_train.count_tower(tower, -1, 3, batch=2, report=lambda step, read, heads: reported.append(step))
    assert reported == [2]  # resumed from the checkpoint at step 2: one more step
    assert isinstance(heads, llava_train.CountHeads)
    assert torch.load(ckpts / "count_tower.pt", weights_only=True)["step"] == 3

    monkeypatch.setattr(llava_train, "TALLY_TOWER_STEPS", 2)  # stage 11: the same again, its own checkpoints
    llava_train.main(later={"tally": 1}, from_shipped=True, align_batch=1)
    assert torch.load(ckpts / "tally_tower.pt", weights_only=True)["step"] == 2
    assert torch.load(ckpts / "tally.pt", weights_only=True)["step"] == 1
    assert torch.load(ckpts / "count_tower.pt", weights_only=True)["step"] == 3
    tallied = load_file(tmp_path / "weights" / "model.safetensors")
    assert not torch.equal(tallied[a], recounted[a])

    monkeypatch.setattr(llava_train, "CENSUS_TOWER_STEPS", 2)  # stage 12: also each shape's count
    llava_train.main(later={"census": 1}, from_shipped=True, align_batch=1)
    census = torch.load(ckpts / "census_tower.pt", weights_only=True)
    assert census["step"] == 2 and census["heads"]["per_shape.weight"].shape == (len(W.SHAPES) * 6, 192)
    assert torch.load(ckpts / "census.pt", weights_only=True)["step"] == 1
    assert not torch.equal(load_file(tmp_path / "weights" / "model.safetensors")[a], tallied[a])


def test_shape_counts_are_read_from_the_mean_of_the_patch_tokens():
    from vlmtools_zoo.llava_train import CountHeads, shape_count_labels

    heads = CountHeads(8, per_shape=True)
    tokens = torch.randn(3, 5, 8)
    direct = tokens[:, 1:].mean(1) @ heads.per_shape.weight.T + heads.per_shape.bias
    assert torch.allclose(heads.shape_counts_from_mean(tokens), direct.view(3, len(W.SHAPES), 6))
    assert CountHeads(8).per_shape is None  # stages 10a and 11a: no such head
    scenes = [W.scene("train", i) for i in range(20)]
    labels = shape_count_labels(scenes)
    for s, row in zip(scenes, labels.tolist()):
        assert sum(row) == len(s.objects)
        assert dict(zip(W.SHAPES, row)) == {x: Counter(o.shape for o in s.objects)[x] for x in W.SHAPES}


def test_moved_is_the_relative_squared_change():
    from vlmtools_zoo.llava_train import moved

    before = torch.tensor([[1.0, -2.0], [2.0, 1.0]])
    assert moved(before, before) == 0
    assert torch.isclose(moved(before + 1, before), torch.tensor(4 / 10))


def tiny_lm():
    """Two targeted linear layers on the attribute path add_lora and merge_lora walk
    (model.model.language_model), run as ``forward(model, x)``."""
    from torch import nn

    model = nn.Module()
    model.model = nn.Module()
    attn = nn.ModuleDict({"q_proj": nn.Linear(6, 4), "o_proj": nn.Linear(4, 6)})
    model.model.language_model = nn.ModuleDict({"attn": attn})
    return model


def forward(model, x):
    attn = model.model.language_model["attn"]
    return attn["o_proj"](attn["q_proj"](x))


def test_lora_from_factors_round_trips():
    from vlmtools_zoo import llava_train

    factors = {"attn.q_proj.A": torch.randn(8, 6), "attn.q_proj.B": torch.randn(4, 8),
               "attn.o_proj.A": torch.randn(8, 4), "attn.o_proj.B": torch.randn(6, 8)}
    model = tiny_lm()
    x = torch.randn(3, 6)
    base = model.model.language_model["attn"]["q_proj"](x)
    loras = llava_train.add_lora(model, {k: v.half() for k, v in factors.items()})
    assert set(loras) == {"attn.q_proj", "attn.o_proj"}
    got = model.model.language_model["attn"]["q_proj"](x)
    a, b = factors["attn.q_proj.A"].half().float(), factors["attn.q_proj.B"].half().float()
    want = base + 2.0 * x @ a.T @ b.T
    assert torch.allclose(got, want, atol=1e-5)
    state = llava_train.lora_state(loras)
    assert all(torch.equal(state[k], factors[k].half().float()) for k in factors)


def test_widen_lora_keeps_the_model_and_merges_like_the_lora_it_trains():
    """Stage 9's start, after stages that trained at rank 8: rank 8 -> 16 changes no output, the
    optimiser built before it trains the new columns, and the shipped factors (rank 16) merged at
    the shipped scale give what the LoRA computed."""
    from vlmtools_zoo import llava, llava_train

    torch.manual_seed(0)
    model = tiny_lm()
    loras = llava_train.add_lora(model)
    opt = torch.optim.AdamW([p for m in loras.values() for p in (m.A, m.B)], lr=0.1)  # built once
    x = torch.randn(3, 6)

    def step():
        opt.zero_grad()
        forward(model, x).square().sum().backward()
        opt.step()

    step()  # a stage at rank 8
    before = forward(model, x).detach()
    llava_train.widen_lora(model)
    assert [tuple(m.A.shape) for m in loras.values()] == [(16, 6), (16, 4)]
    assert (forward(model, x).detach() - before).abs().max() < 1e-6  # zero columns; a wider matmul may sum in another order
    llava_train.widen_lora(model)  # already that wide (a resumed run): unchanged
    assert [m.A.shape[0] for m in loras.values()] == [16, 16]

    opt = torch.optim.AdamW(opt.param_groups[0]["params"], lr=0.1)  # stage 9's optimiser
    step()
    assert loras["attn.q_proj"].B[:, 8:].abs().sum() > 0  # the new columns train
    trained = forward(model, x).detach()
    merged = tiny_lm()
    for name, lora in loras.items():
        merged.model.language_model.get_submodule(name).load_state_dict(lora.base.state_dict())
    llava.merge_lora(merged, llava_train.lora_state(loras))
    assert torch.allclose(forward(merged, x), trained, atol=1e-5)
