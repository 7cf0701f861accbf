"""The zoo's trainers run on a GPU where there is one: each step moves its batch to its model's
device. Checked here without a GPU on the meta device, where a CPU tensor meeting a model's
tensor raises: each test fails where a batch, or a tensor built on the way, stays on the CPU.
The LM stages cannot run on meta (transformers checks image-token counts by value), so they are
covered only by the CPU tests."""
import torch

from vlmtools_zoo import world as W
from vlmtools_zoo.train_utils import training_device


def test_the_training_device_is_the_one_named_else_a_gpu_else_the_cpu(monkeypatch):
    assert training_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_device() == torch.device("cuda")


def test_a_flux_training_step_runs_on_the_pipelines_device():
    from vlmtools_zoo import flux
    from vlmtools_zoo.flux_train import batch

    pipe = flux.build_pipeline().to("meta")
    x_t, t, emb, pooled, text_ids, target, weight = inputs = batch(pipe, 0, 2)
    assert {a.device.type for a in inputs} == {"meta"}
    pred = pipe.forward(x_t, t, emb, pooled, text_ids)
    assert pred.device.type == "meta" and pred.shape == target.shape


def test_flux_seeds_change_the_noise_not_the_data():
    from vlmtools_zoo import flux
    from vlmtools_zoo.flux_train import batch

    pipe = flux.build_pipeline()
    first, again, other = batch(pipe, 3, 2), batch(pipe, 3, 2, seed=0), batch(pipe, 3, 2, seed=1)
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x_t, t, emb, _, _, target, weight = first
    torch.testing.assert_close(other[1], t, rtol=0, atol=0)  # same timesteps,
    torch.testing.assert_close(other[2], emb, rtol=0, atol=0)  # captions
    torch.testing.assert_close(other[6], weight, rtol=0, atol=0)  # and scenes
    assert not torch.allclose(other[5], target)  # other noise
    # seed 0 is the shipped recipe: the noise of generator seed = step
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(3))
    x0 = pipe.image_tokens(torch.stack([flux.letterbox(W.scene("train", 70_000_000 + 3 * 2 + i))[0]
                                        for i in range(2)]))
    torch.testing.assert_close(target, noise - x0)


def test_a_llava_tower_step_runs_on_the_towers_device():
    from transformers import CLIPVisionModel

    from vlmtools_zoo import llava
    from vlmtools_zoo.llava_train import TowerHeads, patch_labels, tower_step

    scenes = [W.scene("train", i) for i in range(2)]
    pv = llava.build_processor().image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
    tower = CLIPVisionModel(llava.vision_config()).to("meta")
    heads = TowerHeads(tower.config.hidden_size).to("meta")
    loss, losses, acc = tower_step(tower, heads, pv, patch_labels(scenes))
    assert {v.device.type for v in [loss, *losses.values(), *acc.values()]} == {"meta"}


def test_lora_factors_live_on_their_layers_device():
    from vlmtools_zoo.llava_train import LoRA

    lora = LoRA(torch.nn.Linear(4, 3).to("meta"))
    assert lora.A.device.type == lora.B.device.type == "meta"
    assert lora(torch.zeros(2, 4, device="meta")).shape == (2, 3)
