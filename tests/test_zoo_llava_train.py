"""llava-shapes' trainer end to end on a few steps: every stage checkpoints, resumes and exports."""
import pytest
import torch


@pytest.mark.slow
def test_llava_trainer_smoke_run_resumes_and_exports(train_cache, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from vlmtools.zoo import llava, llava_train

    monkeypatch.setattr(llava, "WEIGHTS", tmp_path / "weights")  # never the shipped file
    tower = llava_train.train_tower(2, batch=2)
    llava_train.train_align(tower.state_dict(), 1, 2, batch=1, turns=2)
    ckpts = train_cache / "train" / "llava-shapes"
    assert {p.name for p in ckpts.iterdir()} == {"tower.pt", "words.pt", "align.pt"}
    llava_train.train_align(tower.state_dict(), 1, 3, batch=1, turns=2)  # resumes: one more align step
    assert torch.load(ckpts / "align.pt", weights_only=False)["step"] == 3
    state = load_file(tmp_path / "weights" / "model.safetensors")
    assert {k.split(".")[0] for k in state} == {"vision_tower", "multi_modal_projector", "lora"}
