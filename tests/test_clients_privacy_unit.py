"""The privacy unit is one annotation (all its candidate answers in one row): Opacus'
per-sample gradients, in every grad-sample mode, are the per-annotation gradients
(computed independently with torch.func), and clipping bounds each annotation's whole
contribution. The rows mix annotations with different numbers of candidates (padding
masked), as a client's own data may."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import PrivacyEngine
from opacus.grad_sample import get_gsm_class
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader

from secure_mor.clients.models import ARCHITECTURES, architecture
from secure_mor.clients.training import GRAD_SAMPLE_MODES, candidate_rewards, encode_annotations, listwise_loss
from secure_mor.data import SplitConfig, build_federated_data

torch.set_num_threads(1)
ROWS = 8


@pytest.fixture(scope="module")
def annotations():
    data = build_federated_data(SplitConfig(pairs_per_client=40, eval_per_family=10, calibration_pairs=30))
    rows = data.clients[1].select(range(ROWS))  # sentence style: multi-token answers
    widths = {len(texts) for texts in rows["rejected_texts"]}
    assert len(widths) > 1  # rows of several widths: the padding mask is exercised
    return rows


def _setup(name: str, annotations):
    arch = architecture(name)
    rejected = (t for texts in annotations["rejected_texts"] for t in texts)
    texts = [*annotations["question"], *annotations["chosen_text"], *rejected]
    encoder = arch.build_encoder(texts)
    torch.manual_seed(0)
    model = arch.build_model(encoder)
    # The bilinear head starts at zero, where every other parameter's gradient is
    # zero too: give it the values of a trained model, so that all are compared.
    with torch.no_grad():
        for param in model.head.parameters():
            param.normal_(0.0, 0.3)
    return model, encode_annotations(annotations, encoder)


def _per_pair_gradients(model: torch.nn.Module, rows) -> dict[str, torch.Tensor]:
    """Independent reference: grad of one annotation's loss over its real candidates, computed for
    each annotation alone (torch.func, vmapped over annotations)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def row_loss(p, image, question, answers, mask):
        rewards = functional_call(model, p, (image[None], question[None], answers[None]))
        return listwise_loss(torch.where(mask[None], rewards, -torch.inf))  # one row: its own loss

    return vmap(grad(row_loss), in_dims=(None, 0, 0, 0, 0))(params, *rows.tensors)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_opacus_per_sample_gradient_is_the_per_annotation_gradient(name, mode, annotations):
    model, rows = _setup(name, annotations)
    reference = _per_pair_gradients(copy.deepcopy(model), rows)
    assert all(reference[k].abs().sum() > 0 for k in ["head.bilinear.weight", next(iter(reference))])
    options = {"force_functorch": True} if mode == "functorch" else {}
    wrapped = get_gsm_class(mode)(model, batch_first=True, loss_reduction="mean", **options)  # as make_private does
    listwise_loss(candidate_rewards(wrapped, *rows.tensors)).backward()
    for key, param in model.named_parameters():
        assert param.grad_sample.shape == (ROWS, *param.shape), key  # one row per annotation, never one per answer
        # float32 summation order differs between the two paths: ~3e-6 on entries of ~10
        atol = 1e-6 * max(1.0, float(reference[key].abs().max()))
        torch.testing.assert_close(param.grad_sample, reference[key], rtol=1e-4, atol=atol, msg=key)


def test_clipping_bounds_each_annotation_contribution(annotations):
    model, rows = _setup("cnn-gru", annotations)
    reference = _per_pair_gradients(copy.deepcopy(model), rows)
    names = [k for k, _ in model.named_parameters()]
    flat = torch.cat([reference[k].flatten(1) for k in names], dim=1)  # [annotations, params]
    norms = flat.norm(dim=1)
    clip = float(norms.median())  # so that about half of the annotations are clipped
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus' flat clipping rule
    clipped = flat * factors[:, None]
    assert (clipped.norm(dim=1) <= clip * (1 + 1e-5)).all()

    engine = PrivacyEngine()
    loader = DataLoader(rows, batch_size=ROWS)
    wrapped, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        poisson_sampling=False,  # the whole fixed batch, to compare sums exactly
    )
    listwise_loss(candidate_rewards(wrapped, *next(iter(loader)))).backward()
    optimizer.pre_step()  # clip per annotation, add (zero) noise, average: the update direction
    update = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(update, clipped.sum(0) / ROWS, rtol=1e-4, atol=1e-7)
    assert update.norm() <= clip * (1 + 1e-5)  # a mean of vectors of norm <= C
    unclipped = flat.mean(0)
    assert (update - unclipped).norm() > 1e-3 * unclipped.norm()  # the large ones were cut down
