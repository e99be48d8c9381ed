# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""preference_step: k micro-batches give the gradient of one k-times larger batch; metrics are
the per-pair means; StepLog writes them with the step's row."""

import copy

import pytest
import torch

from tests.test_utils import tiny_hf_llama
from tests.torchtune.rlhf.test_logps_and_reference import VOCAB, _lora, _pairs
from torchtune.modules.peft import get_adapter_params, set_trainable_params
from torchtune.rlhf import DPOLoss, SimPOLoss, adapters_disabled, preference_step, sequence_logps
from torchtune.training import StepLog

CPU = torch.device("cpu")


def _split(batch):
    """A pair batch of 2b rows as two batches of b/2 pairs each."""
    c_tok, r_tok = batch["tokens"].chunk(2)
    c_lab, r_lab = batch["labels"].chunk(2)
    half = c_tok.shape[0] // 2
    out = []
    for sl in (slice(0, half), slice(half, None)):
        out.append(
            {
                "tokens": torch.cat([c_tok[sl], r_tok[sl]]),
                "labels": torch.cat([c_lab[sl], r_lab[sl]]),
            }
        )
    return out


def _reference(model):
    def fn(batch):
        with adapters_disabled(model):
            return sequence_logps(model, batch, CPU)

    return fn


def _trained(model):
    params = get_adapter_params(model)
    set_trainable_params(model, params)
    return params


def test_accumulated_micro_batches_equal_one_batch():
    hf = tiny_hf_llama(seed=0, vocab_size=VOCAB)
    one, _ = _lora(hf)
    two = copy.deepcopy(one)
    batch = _pairs(n_pairs=4, seed=4)
    results = []
    for model, micro in ((one, [batch]), (two, _split(batch))):
        params = _trained(model)
        opt = torch.optim.SGD(params.values(), lr=1.0)
        before = {k: p.detach().clone() for k, p in params.items()}
        metrics = preference_step(
            model,
            DPOLoss(0.3),
            opt,
            micro,
            params=params.values(),
            device=CPU,
            reference=_reference(model),
        )
        results.append((metrics, {k: before[k] - p.detach() for k, p in params.items()}))
    (m1, step1), (m2, step2) = results
    for k in step1:
        torch.testing.assert_close(step2[k], step1[k], rtol=1e-5, atol=1e-7, msg=k)
    assert set(m1) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies"} | {
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "tokens",
    }
    for k in m1:
        assert m2[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), k


def test_metrics_are_per_pair_means():
    hf = tiny_hf_llama(seed=0, vocab_size=VOCAB)
    model, _ = _lora(hf)
    params = _trained(model)
    batch = _pairs(n_pairs=3, seed=5)
    with torch.no_grad():
        logps, lengths = sequence_logps(model, batch, CPU, pairs=True)  # as preference_step
    (pc, pr), (nc, nr) = logps.chunk(2), lengths.chunk(2)
    losses, cr, rr = SimPOLoss(2.0, 0.3)(pc, pr, None, None, nc, nr)
    opt = torch.optim.SGD(params.values(), lr=0.0)
    metrics = preference_step(
        model,
        SimPOLoss(2.0, 0.3),
        opt,
        [batch],
        params=params.values(),
        device=CPU,
        reference=None,
    )
    expected = {
        "loss": losses.mean(),
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/accuracies": (cr > rr).float().mean(),
        "rewards/margins": (cr - rr).mean(),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
    }
    for k, v in expected.items():
        assert metrics[k] == pytest.approx(float(v), rel=1e-6, abs=1e-7), k
    assert metrics["tokens"] == int((batch["labels"] != -100).sum())  # no padding
    with pytest.raises(ValueError, match="DPOLoss needs a reference model; reference is None"):
        preference_step(
            model, DPOLoss(), opt, [batch], params=params.values(), device=CPU, reference=None
        )


def test_step_log_writes_extra_metrics():
    rows = []

    class Logger:
        def log_dict(self, d, step):
            rows.append((step, d))

    log = StepLog(Logger(), 1, CPU, 1, desc="x", show=False)
    log.step(1, 0.5, 1e-3, 100, 2.0, extra={"rewards/chosen": 0.25})
    log.close()
    step, row = rows[0]
    assert step == 1 and row["loss"] == 0.5 and row["rewards/chosen"] == 0.25
    assert row["tokens_per_second"] == 50.0
