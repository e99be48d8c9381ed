# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""torchtune/utils reaches model families only through torchtune.models._families."""

import re
from pathlib import Path

import torchtune
from torchtune.models._families import FAMILIES

UTILS = Path(torchtune.__file__).parent / "utils"
# Any torchtune.models import but the table's (a family folder, _decoder, ...).
IMPORT = re.compile(r"^\s*(from|import)\s+torchtune\.models(?!\._families\b)", re.M)
# Every name of every row, and the stem the llama names share.
NAME = re.compile(
    "|".join(sorted({n for r in FAMILIES for n in (r.name, *r.model_types, *r.hf_model_types)}))
    + "|llama",
    re.I,
)


def _offences(text: str):
    return [m.group(0).strip() for m in IMPORT.finditer(text)] + [
        m.group(0) for m in NAME.finditer(text)
    ]


def test_no_file_under_utils_imports_or_names_a_family():
    files = sorted(UTILS.rglob("*.py"))
    assert len(files) > 5
    offenders = {str(p): _offences(p.read_text()) for p in files}
    assert not {p: o for p, o in offenders.items() if o}


def test_the_check_catches_an_offender():
    text = "from torchtune.models.llama2 import hf_to_tune\nmodel_type = 'LLAMA2'\n"
    assert _offences(text) == ["from torchtune.models", "llama2", "LLAMA2"]
    assert _offences("from torchtune.models._families import FAMILIES\n") == []
    assert _offences("import torchtune.models._decoder\n") == ["import torchtune.models"]
