# Copyright (c) torchtune contributors. BSD-3-Clause license.
import pytest

from torchtune.data import AlpacaInstructTemplate, InstructTemplate

# Stanford Alpaca's two prompts, spelled out independently of the library.
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
)
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\nAdd the numbers.\n\n### Response:\n"
)


def test_alpaca_variants():
    t = AlpacaInstructTemplate
    assert (
        t.format({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})
        == WITH_INPUT
    )
    assert t.format({"instruction": "Add the numbers.", "input": "", "output": "5"}) == NO_INPUT
    assert (
        t.format({"instruction": "Add the numbers.", "input": None}) == NO_INPUT
    )  # empty CSV cell
    assert t.format({"instruction": "Add the numbers."}) == NO_INPUT


def test_alpaca_column_map():
    row = {"question": "Add the numbers.", "context": "2 and 3"}
    assert (
        AlpacaInstructTemplate().format(row, {"instruction": "question", "input": "context"})
        == WITH_INPUT
    )
    # Braces in the data are data, not format fields.
    row = {"instruction": "Print {x}.", "input": "{input}"}
    assert (
        "### Instruction:\nPrint {x}.\n\n### Input:\n{input}\n\n"
        in AlpacaInstructTemplate.format(row)
    )


def test_base_template_is_abstract():
    with pytest.raises(NotImplementedError):
        InstructTemplate.format({"instruction": "x"})
