"""Tiled logits + cross-entropy (memory/tiled_loss.py) against F.cross_entropy on the full logits.

    PYTHONPATH=src python -m pytest -q tests/test_loss.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longseq.loss import LossConfig, cross_entropy_sum
from longseq.memory import MemoryConfig, lm_head_cross_entropy_sum, tiled_cross_entropy_sum
from longseq.memory.tiled_loss import loss_tile_tokens
from tests.models import assert_grads_equal, shifted_labels, tiny_model

V, H = 97, 24


def _inputs(shape, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / 2).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.3] = -100
    return hidden, weight, b, labels


def _reference(hidden, weight, bias, labels, softcap=None):
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="sum")


@pytest.mark.parametrize("shape", [(2, 127), (1, 1), (301,)])
@pytest.mark.parametrize("tile", [1, 10, 64, 1000])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_matches_full_logits(shape, tile, softcap):
    hidden, weight, bias, labels = _inputs(shape)
    tensors = [hidden, weight, bias]
    want = _reference(hidden, weight, bias, labels, softcap)
    want_grads = torch.autograd.grad(want * 0.37, tensors)
    got, count = tiled_cross_entropy_sum(hidden, weight, labels, bias=bias, softcap=softcap, tile_tokens=tile)
    assert count.dtype == torch.int64 and count.item() == (labels != -100).sum().item()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got * 0.37, tensors), want_grads):
        torch.testing.assert_close(g, w)


def test_softcap_changes_the_loss():
    hidden, weight, bias, labels = _inputs((40,))
    plain, _ = tiled_cross_entropy_sum(hidden * 4, weight, labels, tile_tokens=8)
    capped, _ = tiled_cross_entropy_sum(hidden * 4, weight, labels, softcap=2.0, tile_tokens=8)
    assert not torch.allclose(plain, capped)


def test_all_ignored_gives_zero_sum_zero_count_zero_grads():
    hidden, weight, bias, labels = _inputs((3, 17))
    labels.fill_(-100)
    total, count = tiled_cross_entropy_sum(hidden, weight, labels, bias=bias, tile_tokens=5)
    assert total.item() == 0.0 and count.item() == 0
    for grad in torch.autograd.grad(total, [hidden, weight, bias]):
        assert torch.isfinite(grad).all() and grad.abs().sum() == 0


def test_custom_ignore_index_and_frozen_weight():
    hidden, weight, _, labels = _inputs((2, 33))
    labels[labels == -100] = 5
    weight.requires_grad_(False)
    want = F.cross_entropy(F.linear(hidden, weight).reshape(-1, V), labels.reshape(-1), ignore_index=5,
                           reduction="sum")
    got, count = tiled_cross_entropy_sum(hidden, weight, labels, ignore_index=5, tile_tokens=8)
    assert count.item() == (labels != 5).sum().item()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, hidden)[0], torch.autograd.grad(want, hidden)[0])


def test_no_grad_computes_only_the_loss():
    hidden, weight, bias, labels = _inputs((2, 33))
    with torch.no_grad():
        got, _ = tiled_cross_entropy_sum(hidden, weight, labels, bias=bias, tile_tokens=8)
    assert not got.requires_grad
    torch.testing.assert_close(got, _reference(hidden, weight, bias, labels))


@pytest.mark.parametrize("fp32_weight_grad", [True, False])
def test_bf16(fp32_weight_grad):
    hidden, weight, bias, labels = _inputs((2, 255), dtype=torch.bfloat16)
    tensors = [hidden, weight, bias]
    want = _reference(hidden, weight, bias, labels)
    want_grads = torch.autograd.grad(want, tensors)
    got, _ = tiled_cross_entropy_sum(hidden, weight, labels, bias=bias, tile_tokens=16,
                                     fp32_weight_grad=fp32_weight_grad)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-2)
    for g, w in zip(torch.autograd.grad(got, tensors), want_grads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * w.abs().max().item())


def test_fp32_weight_grad_is_closer_to_exact_than_bf16_accumulation():
    hidden, weight, _, labels = _inputs((256,), dtype=torch.bfloat16, bias=False)
    exact = torch.autograd.grad(_reference(hidden.double(), weight.double(), None, labels), weight)[0]
    errors = []
    for fp32 in (True, False):
        got, _ = tiled_cross_entropy_sum(hidden, weight, labels, tile_tokens=1, fp32_weight_grad=fp32)
        errors.append((torch.autograd.grad(got, weight)[0].double() - exact).abs().mean().item())
    assert errors[0] < errors[1] / 2


def test_tile_size_from_memory_target():
    # 1 MiB / (97 × 4 bytes × 2) = 1351 tokens
    assert loss_tile_tokens(97, 1) == 1351
    assert loss_tile_tokens(10**9, 1) == 1


def test_labels_must_match_hidden():
    hidden, weight, _, labels = _inputs((2, 10))
    with pytest.raises(ValueError, match="already shifted"):
        tiled_cross_entropy_sum(hidden, weight, labels[:, :-1], tile_tokens=4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_tied_embeddings_on_hf_model(family):
    """sum/count through the decoder equals HF's mean loss; the tied embedding's grad sums both uses."""
    reference = tiny_model(family, tie_word_embeddings=True, final_logit_softcapping=None)
    model = tiny_model(family, tie_word_embeddings=True, final_logit_softcapping=None)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = torch.randint(0, 256, (2, 131), generator=torch.Generator().manual_seed(3))
    want = reference(ids, labels=ids).loss
    hidden = model.model(ids).last_hidden_state
    total, count = lm_head_cross_entropy_sum(model, hidden, shifted_labels(ids))
    torch.testing.assert_close(total / count, want)
    want.backward()
    (total / count).backward()
    assert_grads_equal(reference, model)


def test_gemma3_softcap_read_from_config():
    reference = tiny_model("gemma3", final_logit_softcapping=0.5)
    model = tiny_model("gemma3", final_logit_softcapping=0.5)
    ids = torch.randint(0, 256, (1, 77), generator=torch.Generator().manual_seed(4))
    want = reference(ids, labels=ids).loss
    total, count = lm_head_cross_entropy_sum(model, model.model(ids).last_hidden_state, shifted_labels(ids),
                                             MemoryConfig(tile_tokens=16))
    torch.testing.assert_close(total / count, want)
    want.backward()
    (total / count).backward()
    assert_grads_equal(reference, model)


# Note [Loss options]: label smoothing, z-loss and per-token weights, tiled and untiled, against the full logits.

OPTIONS = [LossConfig(label_smoothing=0.1), LossConfig(z_loss=1e-2), LossConfig(label_smoothing=0.2, z_loss=1e-3)]


def _reference_with_options(hidden, weight, bias, labels, loss, weights=None, softcap=None):
    """Note [Loss options] written out on the full fp32 logits (autograd gives the reference gradient)."""
    logits = F.linear(hidden, weight, bias).float().reshape(-1, V)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    targets = labels.reshape(-1)
    valid = targets != -100
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    eps = loss.label_smoothing
    per_token = lse - (1 - eps) * picked - eps / V * logits.sum(-1) + loss.z_loss * lse.square()
    scale = torch.ones_like(per_token) if weights is None else weights.reshape(-1).float()
    return (per_token * scale)[valid].sum()


@pytest.mark.parametrize("loss", OPTIONS, ids=["smoothing", "z_loss", "both"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("softcap,tile", [(None, 7), (3.0, 1000)])
def test_loss_options_match_full_logits(loss, weighted, softcap, tile):
    hidden, weight, bias, labels = _inputs((2, 61))
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(5)) * 2 if weighted else None
    tensors = [hidden, weight, bias]
    want = _reference_with_options(hidden, weight, bias, labels, loss, weights, softcap)
    want_grads = torch.autograd.grad(want * 0.37, tensors)
    tiled, count = tiled_cross_entropy_sum(hidden, weight, labels, bias=bias, softcap=softcap, tile_tokens=tile,
                                           loss=loss, weights=weights)
    untiled, _ = cross_entropy_sum(hidden, lambda h: F.linear(h, weight, bias), labels, softcap, loss, weights)
    assert count.item() == (labels != -100).sum().item()
    for got in (tiled, untiled):
        torch.testing.assert_close(got, want)
        for g, w in zip(torch.autograd.grad(got * 0.37, tensors), want_grads):
            torch.testing.assert_close(g, w)


def test_label_smoothing_is_transformers_label_smoother():
    """TrainingArguments.label_smoothing_factor's LabelSmoother (unshifted labels, HF logits) gives the same mean."""
    from transformers.trainer_pt_utils import LabelSmoother

    hidden, weight, bias, labels = _inputs((2, 40))
    logits = F.linear(hidden, weight, bias)
    unshifted = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], dim=1)
    hf_padded = torch.cat([logits, logits[:, :1]], dim=1)  # LabelSmoother drops the last position's logits
    want = LabelSmoother(epsilon=0.1)({"logits": hf_padded}, torch.cat([unshifted, labels[:, -1:]], dim=1),
                                      shift_labels=True)
    total, count = tiled_cross_entropy_sum(hidden, weight, labels, bias=bias, tile_tokens=9,
                                           loss=LossConfig(label_smoothing=0.1))
    torch.testing.assert_close(total / count, want)


def test_unsupported_loss_options_fail_clearly():
    hidden, weight, _, labels = _inputs((2, 10))
    with pytest.raises(ValueError, match=r"reduction='none'\) is not supported"):
        tiled_cross_entropy_sum(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="weights must be constants"):
        tiled_cross_entropy_sum(hidden, weight, labels, weights=torch.ones(labels.shape, requires_grad=True))
    with pytest.raises(ValueError, match="labels' shape"):
        tiled_cross_entropy_sum(hidden, weight, labels, weights=torch.ones(labels.shape[1]))
    with pytest.raises(ValueError, match=r"label_smoothing=1.0 must be in \[0, 1\)"):
        LossConfig(label_smoothing=1.0)
    with pytest.raises(ValueError, match="z_loss=-1 must be >= 0"):
        LossConfig(z_loss=-1)


@pytest.mark.parametrize("tiled", [True, False])
def test_apply_passes_loss_options_and_weights(tiled):
    """longseq.apply(loss=...) and a batch's shift_loss_weights reach the loss, tiled or not."""
    import longseq

    reference = tiny_model("llama")
    model = tiny_model("llama")
    options = LossConfig(label_smoothing=0.1, z_loss=1e-3)
    longseq.apply(model, memory=MemoryConfig(tile_tokens=16, tiled_loss=tiled, offload_checkpoints=False),
                  loss=options)
    ids = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(6))
    labels = shifted_labels(ids)
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(7))
    hidden = reference.model(ids).last_hidden_state
    want = _hf_reference(reference, hidden, labels, options, weights)
    batch = {"input_ids": ids, "shift_labels": labels, "shift_loss_weights": weights}
    got = longseq.causal_lm_loss(model, batch)
    torch.testing.assert_close(got, want)
    want.backward()
    got.backward()
    assert_grads_equal(reference, model)


def _hf_reference(model, hidden, labels, loss, weights):
    logits = model.lm_head(hidden).float().reshape(-1, model.config.vocab_size)
    targets = labels.reshape(-1)
    valid = targets != -100
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    eps, vocab = loss.label_smoothing, logits.shape[-1]
    per_token = (lse - (1 - eps) * picked - eps / vocab * logits.sum(-1) + loss.z_loss * lse.square())
    return (per_token * weights.reshape(-1))[valid].sum() / valid.sum()
