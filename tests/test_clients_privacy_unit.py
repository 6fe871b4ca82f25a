"""The privacy unit is one preference pair: Opacus' per-sample gradients, in every
grad-sample mode, are the per-pair gradients (computed independently with
torch.func), and clipping bounds each pair's whole contribution."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.grad_sample import get_gsm_class
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader

from secure_mor.clients.models import ARCHITECTURES, architecture
from secure_mor.clients.training import GRAD_SAMPLE_MODES, bradley_terry_loss, encode_pairs, pair_margins
from secure_mor.data import SplitConfig, build_federated_data

torch.set_num_threads(1)
PAIRS = 8


@pytest.fixture(scope="module")
def pairs():
    data = build_federated_data(SplitConfig(pairs_per_client=40, eval_per_family=10, calibration_pairs=30))
    return data.clients[1].select(range(PAIRS))  # sentence style: multi-token answers


def _setup(name: str, pairs):
    arch = architecture(name)
    texts = list(pairs["question"]) + list(pairs["chosen_text"]) + list(pairs["rejected_text"])
    encoder = arch.build_encoder(texts)
    torch.manual_seed(0)
    model = arch.build_model(encoder)
    # The bilinear head starts at zero, where every other parameter's gradient is
    # zero too: give it the values of a trained model, so that all are compared.
    with torch.no_grad():
        for param in model.head.parameters():
            param.normal_(0.0, 0.3)
    return model, encode_pairs(pairs, encoder)


def _per_pair_gradients(model: torch.nn.Module, rows) -> dict[str, torch.Tensor]:
    """Independent reference: grad of one pair's Bradley-Terry loss, vmapped over pairs."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def pair_loss(p, image, question, answers):
        rewards = functional_call(model, p, (image[None], question[None], answers[None]))
        return -F.logsigmoid(rewards[:, 0] - rewards[:, 1]).sum()

    return vmap(grad(pair_loss), in_dims=(None, 0, 0, 0))(params, *rows.tensors)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_opacus_per_sample_gradient_is_the_per_pair_gradient(name, mode, pairs):
    model, rows = _setup(name, pairs)
    reference = _per_pair_gradients(copy.deepcopy(model), rows)
    assert all(reference[k].abs().sum() > 0 for k in ["head.bilinear.weight", next(iter(reference))])
    options = {"force_functorch": True} if mode == "functorch" else {}
    wrapped = get_gsm_class(mode)(model, batch_first=True, loss_reduction="mean", **options)  # as make_private does
    bradley_terry_loss(pair_margins(wrapped, *rows.tensors)).backward()
    for key, param in model.named_parameters():
        assert param.grad_sample.shape == (PAIRS, *param.shape), key  # one row per pair, never 2 per pair
        torch.testing.assert_close(param.grad_sample, reference[key], rtol=1e-4, atol=1e-6, msg=key)


def test_clipping_bounds_each_pair_contribution(pairs):
    model, rows = _setup("cnn-gru", pairs)
    reference = _per_pair_gradients(copy.deepcopy(model), rows)
    names = [k for k, _ in model.named_parameters()]
    flat = torch.cat([reference[k].flatten(1) for k in names], dim=1)  # [pairs, params]
    norms = flat.norm(dim=1)
    clip = float(norms.median())  # so that about half of the pairs are clipped
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus' flat clipping rule
    clipped = flat * factors[:, None]
    assert (clipped.norm(dim=1) <= clip * (1 + 1e-5)).all()

    engine = PrivacyEngine()
    loader = DataLoader(rows, batch_size=PAIRS)
    wrapped, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        poisson_sampling=False,  # the whole fixed batch, to compare sums exactly
    )
    image, question, answers = next(iter(loader))
    bradley_terry_loss(pair_margins(wrapped, image, question, answers)).backward()
    optimizer.pre_step()  # clip per pair, add (zero) noise, average: the update direction
    update = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(update, clipped.sum(0) / PAIRS, rtol=1e-4, atol=1e-7)
    assert update.norm() <= clip * (1 + 1e-5)  # a mean of vectors of norm <= C
    unclipped = flat.mean(0)
    assert (update - unclipped).norm() > 1e-3 * unclipped.norm()  # the large pairs were cut down
