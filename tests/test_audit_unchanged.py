"""The audit text of a few torchvision models, compared exactly with goldens made before the
issue-15 refactor (analysis apart from graph edits, one graph-utilities layer): the refactor must
not change a character of what convert() records, so this test fails on any change.

Regenerate (only on purpose, when the audit is meant to change) with
``python tests/test_audit_unchanged.py``; the goldens are tests/data/audit_<case>.txt.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

import normprop_fx
from normprop_fx.model_check import randomize_batchnorms

DATA = Path(__file__).parent / "data"

#: case -> (torchvision builder, randomize the BatchNorms first: a trained network)
CASES = {
    "resnet18": ("resnet18", False),
    "efficientnet_b0": ("efficientnet_b0", False),
    "densenet121": ("densenet121", False),
    "resnet18_trained": ("resnet18", True),
}


def audit(case: str) -> str:
    name, trained = CASES[case]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    if trained:
        randomize_batchnorms(model, torch.randn(8, 3, 64, 64))
    converted = normprop_fx.convert(model, example_inputs=torch.empty(2, 3, 64, 64))
    return normprop_fx.summary(converted)


@pytest.mark.parametrize("case", list(CASES))
def test_audit_text_unchanged(case):
    expected = (DATA / f"audit_{case}.txt").read_text()
    assert audit(case) == expected


if __name__ == "__main__":
    for case in CASES:
        (DATA / f"audit_{case}.txt").write_text(audit(case))
        print("wrote", DATA / f"audit_{case}.txt")
