# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Prompt templates: turn one dataset row into the prompt text the model sees."""

from typing import Any, ClassVar, Mapping, Optional, Tuple


class InstructTemplate:
    """Base class of instruction prompt templates.

    A template names the fields it reads (``required_fields`` must be non-empty strings,
    ``optional_fields`` may be empty or absent) and formats a row into a prompt. A
    ``column_map`` renames fields to the dataset's columns, e.g.
    ``{"instruction": "prompt", "input": "context"}``.
    """

    required_fields: ClassVar[Tuple[str, ...]] = ()
    optional_fields: ClassVar[Tuple[str, ...]] = ()

    @classmethod
    def column(cls, field: str, column_map: Optional[Mapping[str, str]] = None) -> str:
        """The dataset column that holds ``field`` under ``column_map``."""
        return (column_map or {}).get(field, field)

    @classmethod
    def format(
        cls, sample: Mapping[str, Any], column_map: Optional[Mapping[str, str]] = None
    ) -> str:
        """Format one row into the prompt.

        Args:
            sample (Mapping[str, Any]): one dataset row.
            column_map (Optional[Mapping[str, str]]): template field -> dataset column.

        Returns:
            str: the prompt text, ending where the response begins.
        """
        raise NotImplementedError


class AlpacaInstructTemplate(InstructTemplate):
    """The Stanford Alpaca prompt, in its two variants: with an ``input`` and without one.

    An empty or missing ``input`` selects the no-input variant.
    """

    required_fields = ("instruction",)
    optional_fields = ("input",)

    template_with_input: ClassVar[str] = (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    )
    template_no_input: ClassVar[str] = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    )

    @classmethod
    def format(
        cls, sample: Mapping[str, Any], column_map: Optional[Mapping[str, str]] = None
    ) -> str:
        instruction = sample[cls.column("instruction", column_map)]
        # CSV readers turn an empty cell into None, so None means "no input" here.
        input_ = sample.get(cls.column("input", column_map)) or ""
        if input_:
            return cls.template_with_input.format(instruction=instruction, input=input_)
        return cls.template_no_input.format(instruction=instruction)
