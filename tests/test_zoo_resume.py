"""One call of a zoo trainer reproduces a run that was stopped and resumed with a longer
learning-rate schedule, as some shipped stages were trained (``train_utils.schedule_end``)."""
import numpy as np
import pytest
import torch
from torch import nn

from vlmtools_zoo.train_utils import Checkpoint, schedule_end


def test_the_schedule_ends_at_the_next_restart_then_at_the_last_step():
    ends = [schedule_end(s, 10, (4, 7)) for s in range(10)]
    assert ends == [4] * 4 + [7] * 3 + [10] * 3
    assert [schedule_end(s, 3, (4,)) for s in range(3)] == [3, 3, 3]  # a restart past the end: none
    assert schedule_end(5, 10) == 10


def tower_run(steps: int, restarts: tuple[int, ...]) -> tuple[torch.Tensor, list[float]]:
    """``llava_train.tower_loop`` on a linear layer (checkpoint ``demo/tower``): its weight and
    the learning rate of each step this call ran."""
    from vlmtools_zoo.llava_train import tower_loop

    torch.manual_seed(0)
    layer = nn.Linear(3, 1)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    rates = []

    def loss_at(step):
        rates.append(opt.param_groups[0]["lr"])
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(step))
        loss = (layer(x) - x.sum(1, keepdim=True)).pow(2).mean()
        return loss, {"fit": loss}, {}

    tower_loop(Checkpoint("demo", "tower"), {"layer": layer, "opt": opt}, steps, 0.1, loss_at, restarts)
    return layer.weight.detach().clone(), rates


def test_a_tower_stage_with_a_restart_is_the_stopped_and_resumed_run(train_cache):
    _, early = tower_run(40, ())
    resumed, late = tower_run(90, ())
    (train_cache / "train" / "demo" / "tower.pt").unlink()
    one_call, rates = tower_run(90, (40,))
    assert rates == early + late
    torch.testing.assert_close(one_call, resumed, rtol=0, atol=0)
    assert rates[39] < 0.1 * rates[40]  # the cosine reached its floor at 40, then restarted


@pytest.mark.slow
def test_flux_training_in_one_call_is_the_run_stopped_at_the_restart_and_resumed(train_cache, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from vlmtools_zoo import flux, flux_train

    monkeypatch.setattr(flux, "WEIGHTS", tmp_path / "weights")  # never the shipped file
    monkeypatch.setattr(flux_train, "RESTARTS", (2,))
    weights = tmp_path / "weights" / "transformer" / "diffusion_pytorch_model.safetensors"
    flux_train.main(2, size=2)
    flux_train.main(3, size=2)  # resumes at step 2 with the decay toward step 3
    resumed = load_file(weights)
    (train_cache / "train" / "flux-shapes" / "dit.pt").unlink()
    flux_train.main(3, size=2)
    one_call = load_file(weights)
    assert resumed.keys() == one_call.keys()
    for name in resumed:
        torch.testing.assert_close(one_call[name], resumed[name], rtol=0, atol=0)


@pytest.mark.slow
def test_flux_training_goes_on_from_the_shipped_dit(train_cache, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from vlmtools_zoo import flux, flux_train

    monkeypatch.setattr(flux, "WEIGHTS", tmp_path / "shipped")
    monkeypatch.setattr(flux_train, "STEPS", 2)
    flux_train.main(2, size=2)  # the "shipped" DiT
    file = "transformer/diffusion_pytorch_model.safetensors"
    shipped = load_file(tmp_path / "shipped" / file)
    flux_train.main(3, size=2, lr=0.0, from_shipped=True, out=tmp_path / "on")  # a step that moves nothing
    on = load_file(tmp_path / "on" / file)
    for name in shipped:
        torch.testing.assert_close(on[name], shipped[name], rtol=0, atol=0)
    assert torch.load(train_cache / "train" / "flux-shapes" / "dit-from-shipped.pt")["step"] == 3
    with pytest.raises(ValueError, match="needs more"):
        flux_train.main(2, size=2, from_shipped=True)
    # a fresh warm-up from the shipped step, then the decay toward the last step
    rates = [flux_train.learning_rate(s, 6000, 1.0, (2000, 3000), 3000) for s in (3000, 3019, 6000)]
    assert rates == pytest.approx([0.05 * 0.55, 0.55 - 0.9 * 19 / 6000, 0.1])


@pytest.mark.slow
def test_flux_training_through_a_new_round_is_the_shipped_run_gone_on_from(train_cache, tmp_path, monkeypatch):
    """One call through a round = the first round, then ``from_shipped`` from its DiT: the
    optimiser and the warm-up start afresh at the round, from a run resumed there or not."""
    from safetensors.torch import load_file

    from vlmtools_zoo import flux, flux_train

    monkeypatch.setattr(flux, "WEIGHTS", tmp_path / "shipped")
    monkeypatch.setattr(flux_train, "ROUNDS", (2,))
    monkeypatch.setattr(flux_train, "STEPS", 2)
    file = "transformer/diffusion_pytorch_model.safetensors"
    flux_train.main(2, size=2)  # the first round, exported as the "shipped" DiT
    flux_train.main(4, size=2, from_shipped=True, out=tmp_path / "gone-on")
    flux_train.main(4, size=2, out=tmp_path / "resumed")  # resumes dit.pt at the round
    (train_cache / "train" / "flux-shapes" / "dit.pt").unlink()
    flux_train.main(4, size=2, out=tmp_path / "one-call")
    gone_on = load_file(tmp_path / "gone-on" / file)
    for run in ("resumed", "one-call"):
        weights = load_file(tmp_path / run / file)
        for name in gone_on:
            torch.testing.assert_close(weights[name], gone_on[name], rtol=0, atol=0)


@pytest.mark.slow
def test_a_dit_of_another_size_trains_to_its_own_checkpoint_and_loads_with_its_config(train_cache, tmp_path,
                                                                                      monkeypatch):
    import vlmtools_zoo as zoo
    from vlmtools_zoo import evaluate, flux, flux_train, world

    monkeypatch.setattr(flux, "WEIGHTS", tmp_path / "shipped")  # never the shipped file
    with pytest.raises(ValueError, match="exported to --out"):
        flux_train.main(1, size=2, dit_size=(2, 1, 1))
    flux_train.main(1, size=2, dit_size=(2, 1, 1), seed=5, out=tmp_path / "small")
    assert torch.load(train_cache / "train" / "flux-shapes" / "dit-2x1x1-seed5.pt")["step"] == 1
    assert not (tmp_path / "shipped").exists()
    pipe = zoo.load("flux-shapes", folder=tmp_path / "assembled", weights=tmp_path / "small")
    config = pipe.transformer.config
    assert (config.num_attention_heads, config.num_layers, config.num_single_layers) == (2, 1, 1)
    scene = world.scene("val", 0)
    image, _ = flux.letterbox(scene)
    expression = scene.referring_expressions()[0]
    (heatmap,) = evaluate.heatmaps(pipe, image[None], [expression.text], [expression.content_words])
    assert heatmap.shape == image.shape[-2:] and np.isfinite(heatmap).all() and heatmap.max() > 0
