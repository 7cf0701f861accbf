"""One intervention object serves two ``use`` blocks at once, on two threads: each thread gets exactly
what it gets alone (generated ids, logits, and what the block computed, read from its trace).

An intervention that kept per-block state on itself (the plan's state, its hooks, what it computed)
fails here: the second block's ``attach`` would overwrite the first's."""
import threading

import pytest
import torch

import vlmtools
from hallucination import VAR
from pruning import FastV
from vlmtools.testing.vlm import tiny_llava

STEPS = 3


def results(name, run):
    """What a block computed: the kept positions of FastV's drop layer, VAR's sinks per layer."""
    if name == "fastv":
        return [run.kept_at(1)]
    return [sinks for layer in sorted(run.sinks) for sinks in run.sinks[layer]]


def decode(vlm, method, name, inputs, barrier=None):
    with torch.no_grad(), vlm.use(method) as trace:
        if barrier is not None:
            barrier.wait()  # both blocks are open (both attached) before either runs
        out = vlm.model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        if barrier is not None:
            barrier.wait()  # neither closes before the other is done
    return out.sequences, torch.stack(out.logits, 1), results(name, trace[method])


@pytest.mark.parametrize("name,method", [("fastv", FastV(keep=4, layer=1)),
                                         ("var", VAR(rho=0.3, tau=2.0, dims=(0, 1, 2, 3), variant="released"))])
def test_one_intervention_in_two_threads_gives_each_what_it_gets_alone(name, method):
    model, batch = tiny_llava()
    vlm = vlmtools.wrap(model)
    other = {**batch, "pixel_values": batch["pixel_values"].flip(-1, -2)}  # other images: other choices
    alone = [decode(vlm, method, name, inputs) for inputs in (batch, other)]
    assert any(not torch.equal(a, b) for a, b in zip(alone[0][2], alone[1][2]))  # the runs differ
    barrier = threading.Barrier(2, timeout=120)
    together, errors = [None, None], []

    def worker(index, inputs):
        try:
            together[index] = decode(vlm, method, name, inputs, barrier)
        except Exception as error:  # pragma: no cover - reported below
            barrier.abort()
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i, inputs)) for i, inputs in enumerate((batch, other))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for (ids, logits, computed), (ids_alone, logits_alone, computed_alone) in zip(together, alone):
        assert torch.equal(ids, ids_alone)
        torch.testing.assert_close(logits, logits_alone, atol=1e-6, rtol=0)
        assert len(computed) == len(computed_alone)
        assert all(torch.equal(a, b) for a, b in zip(computed, computed_alone))
    assert model.config.text_config._attn_implementation == "sdpa"
