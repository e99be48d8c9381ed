# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""The validation loss against a plain per-sample loop, its loader's shards, the RNG and the
model mode it leaves as they were, and the config rules of ``validation_dataset``."""

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from tests.test_utils import randomise_norms_and_biases_
from torchtune.data import padded_collate
from torchtune.models.llama2 import llama2, lora_llama2
from torchtune.training import (
    ChunkedCrossEntropyLoss,
    LinearCrossEntropyLoss,
    RecipeState,
    Validator,
    build_validation_dataloader,
    validation_dataset_config,
    validation_loss,
)

IGNORE = -100
PAD = 0
CPU = torch.device("cpu")
SHAPE = dict(
    vocab_size=61,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=32,
    intermediate_dim=44,
    max_seq_len=32,
)


def _dataset(n=13, seed=0):
    """Samples of lengths 3..16 with a prompt (unscored) prefix; a few have nothing scored."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 17, (1,), generator=g))
        n_prompt = length if i == 4 else int(torch.randint(0, length, (1,), generator=g))
        tokens = torch.randint(3, 61, (length,), generator=g).tolist()
        out.append({"tokens": tokens, "labels": [IGNORE] * n_prompt + tokens[n_prompt:]})
    return out


def _plain_loss(model, samples):
    """One sample at a time, full logits: sum of next-token CEs / number of scored labels."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in samples:
            logits = model(torch.tensor([s["tokens"]]))  # [1, s, v]
            labels = torch.tensor(s["labels"][1:])
            total += float(
                F.cross_entropy(
                    logits[0, :-1].double(), labels, ignore_index=IGNORE, reduction="sum"
                )
            )
            count += int((labels != IGNORE).sum())
    return total / count, count


def _lora_model(dropout):
    torch.manual_seed(0)
    model = lora_llama2(
        ["q_proj", "v_proj"], lora_rank=4, lora_alpha=8, lora_dropout=dropout, **SHAPE
    )
    with torch.no_grad():  # B is zero at init: give the adapters a visible effect
        for n, p in model.named_parameters():
            if "lora_b" in n:
                p.normal_(0, 0.05)
    return randomise_norms_and_biases_(model)


@pytest.mark.parametrize(
    "loss_fn", [ChunkedCrossEntropyLoss(num_chunks=3), LinearCrossEntropyLoss(num_chunks=2)]
)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_validation_loss_is_the_plain_mean_token_loss(loss_fn, batch_size):
    torch.manual_seed(0)
    model = randomise_norms_and_biases_(llama2(**SHAPE))
    ds = _dataset()
    loader = build_validation_dataloader(ds, batch_size=batch_size, pad_id=PAD)
    got = validation_loss(model.train(), loss_fn, loader, CPU)
    assert model.training  # mode given back
    want, count = _plain_loss(model, ds)
    assert got["val_tokens"] == count
    assert got["val_loss"] == pytest.approx(want, abs=1e-6)
    assert got["val_perplexity"] == pytest.approx(torch.tensor(want).exp().item(), rel=1e-6)


def test_rng_and_mode_are_left_as_they_were_and_dropout_is_off():
    """A plain DataLoader draws a seed from the global RNG on every iter (so does LoRA dropout
    in train mode): validation_loss must still leave the generator where it was."""
    model = _lora_model(dropout=0.3).train()
    ds = _dataset()
    plain_loader = DataLoader(ds, batch_size=3, collate_fn=lambda b: padded_collate(b, PAD))
    before = torch.get_rng_state()
    iter(plain_loader)
    assert not torch.equal(torch.get_rng_state(), before)  # the hazard is real
    torch.manual_seed(123)
    before = torch.get_rng_state()
    got = validation_loss(model, ChunkedCrossEntropyLoss(), plain_loader, CPU)
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training
    want, _ = _plain_loss(model, ds)  # in eval mode: no dropout
    assert got["val_loss"] == pytest.approx(want, abs=1e-6)
    assert all(p.grad is None for p in model.parameters())
    # The kit's own loader draws nothing from the global RNG at all.
    loader = build_validation_dataloader(ds, batch_size=3, pad_id=PAD)
    before = torch.get_rng_state()
    list(loader)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("n, world_size", [(13, 2), (13, 3), (2, 3)])
def test_shards_are_disjoint_and_cover_the_split_once(n, world_size):
    ds = _dataset(n)
    seen = []
    for rank in range(world_size):
        loader = build_validation_dataloader(
            ds, batch_size=2, pad_id=PAD, world_size=world_size, rank=rank
        )
        idx = list(loader.sampler)
        assert idx == list(range(rank, n, world_size))
        seen += idx
    assert sorted(seen) == list(range(n))  # no repeats (DistributedSampler would pad)


def test_sharded_sums_add_up_to_the_one_device_loss():
    """What the ranks' all-reduce adds (checked end to end on 2 processes in the recipe
    tests): the per-shard sums over 3 shards give the whole split's mean."""
    torch.manual_seed(0)
    model = randomise_norms_and_biases_(llama2(**SHAPE))
    ds = _dataset()
    loss_fn = ChunkedCrossEntropyLoss()
    total = count = 0
    for rank in range(3):
        loader = build_validation_dataloader(ds, batch_size=2, pad_id=PAD, world_size=3, rank=rank)
        shard = validation_loss(model, loss_fn, loader, CPU)
        total += shard["val_loss"] * shard["val_tokens"]
        count += shard["val_tokens"]
    whole = validation_loss(
        model, loss_fn, build_validation_dataloader(ds, batch_size=5, pad_id=PAD), CPU
    )
    assert count == whole["val_tokens"]
    assert total / count == pytest.approx(whole["val_loss"], abs=1e-6)


def test_nothing_scored_is_an_error():
    ds = [{"tokens": [3, 4, 5], "labels": [IGNORE] * 3}]
    loader = build_validation_dataloader(ds, batch_size=1, pad_id=PAD)
    with pytest.raises(ValueError, match="no scored tokens"):
        validation_loss(llama2(**SHAPE), ChunkedCrossEntropyLoss(), loader, CPU)


TRAIN_DS = {
    "_component_": "torchtune.datasets.alpaca_dataset",
    "source": "json",
    "data_files": "train.json",
    "train_on_input": False,
}


def test_a_node_without_component_overrides_the_training_dataset():
    cfg = OmegaConf.create({"dataset": TRAIN_DS, "validation_dataset": {"split": "train[90%:]"}})
    assert OmegaConf.to_container(validation_dataset_config(cfg)) == {
        **TRAIN_DS,
        "split": "train[90%:]",
    }
    cfg.validation_dataset = {"data_files": "val.json"}
    assert validation_dataset_config(cfg).data_files == "val.json"
    own = {"_component_": "torchtune.datasets.chat_dataset", "source": "x.jsonl"}
    cfg.validation_dataset = own
    assert OmegaConf.to_container(validation_dataset_config(cfg)) == own  # used as it is
    cfg.validation_dataset = None
    assert validation_dataset_config(cfg) is None
    cfg.validation_dataset = "val.json"
    with pytest.raises(ValueError, match="validation_dataset must be a dataset node"):
        validation_dataset_config(cfg)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.test_utils import train_sentencepiece
    from torchtune.models.llama2 import llama2_tokenizer

    path = train_sentencepiece(tmp_path_factory.mktemp("tok") / "sp", vocab_size=400)
    return llama2_tokenizer(str(path))


def _write(path, n):
    rows = [
        {"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)}
        for i in range(n)
    ]
    path.write_text(json.dumps(rows))
    return path


def test_validator_from_config(tmp_path, tokenizer):
    train = _write(tmp_path / "train.json", 10)
    cfg = OmegaConf.create(
        {
            "dataset": {**TRAIN_DS, "data_files": str(train)},
            "batch_size": 4,
            "validation_dataset": {"split": "train[:3]"},
            "eval_every_n_steps": 2,
        }
    )
    v = Validator.from_config(cfg, tokenizer, steps_per_epoch=5, device=CPU)
    assert len(v.loader.dataset) == 3 and v.loader.batch_size == 4
    state = RecipeState(seed=0, total_epochs=1, max_steps_per_epoch=None)
    due = []
    for _ in range(5):
        state.end_step()
        due.append(v.due(state))
    assert due == [False, True, False, True, False]
    cfg.eval_every_n_steps = None  # at each epoch's end
    cfg.validation_batch_size = 2
    v = Validator.from_config(cfg, tokenizer, steps_per_epoch=5, device=CPU)
    assert v.loader.batch_size == 2
    assert [v.due(RecipeState(0, 1, None, steps_in_epoch=k)) for k in (1, 4, 5)] == [
        False,
        False,
        True,
    ]
    # Without a validation_dataset nothing is due and nothing runs.
    off = Validator.from_config(
        OmegaConf.create({"dataset": TRAIN_DS}), tokenizer, steps_per_epoch=5, device=CPU
    )
    assert off.maybe_run(None, None, state) is None


def test_bad_validation_config_names_the_key(tmp_path, tokenizer):
    train = _write(tmp_path / "train.json", 10)
    base = {"dataset": {**TRAIN_DS, "data_files": str(train)}, "batch_size": 4}
    missing = tmp_path / "nope" / "val.json"

    def build(**keys):
        return Validator.from_config(
            OmegaConf.create({**base, **keys}), tokenizer, steps_per_epoch=5, device=CPU
        )

    with pytest.raises(
        FileNotFoundError, match=rf"validation_dataset.data_files: no file at '{missing}'"
    ):
        build(validation_dataset={"data_files": str(missing)})
    own = {**TRAIN_DS, "data_files": [str(train), str(missing)]}
    with pytest.raises(FileNotFoundError, match="validation_dataset.data_files: no file at"):
        build(validation_dataset=own)
    with pytest.raises(
        FileNotFoundError, match=r"dataset.data_files \(inherited by validation_dataset\)"
    ):
        Validator.from_config(
            OmegaConf.create(
                {
                    "dataset": {**TRAIN_DS, "data_files": str(missing)},
                    "batch_size": 4,
                    "validation_dataset": {"split": "train"},
                }
            ),
            tokenizer,
            steps_per_epoch=5,
            device=CPU,
        )
    with pytest.raises(ValueError, match="validation_dataset: .*column"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps([{"question": "q", "answer": "a"}]))
        build(validation_dataset={"data_files": str(bad)})
    with pytest.raises(ValueError, match="validation_dataset: .*no_such_arg"):
        build(validation_dataset={"no_such_arg": 1})
    with pytest.raises(
        ValueError, match="eval_every_n_steps=3 but the config has no validation_dataset"
    ):
        build(eval_every_n_steps=3)
    with pytest.raises(ValueError, match="'eval_every_n_steps' must be >= 1"):
        build(validation_dataset={"split": "train"}, eval_every_n_steps=0)
    with pytest.raises(ValueError, match="validation_batch_size must be >= 1"):
        build(validation_dataset={"split": "train"}, validation_batch_size=-1)
