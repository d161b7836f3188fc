"""Where the tests find the official DEIMv2 reference fixtures (made with the official code).

The small ones live in the repository, ``tests/fixtures/deimv2_official/`` (atto forward, the six
loss cases, the architectures of all eight sizes; see that folder's README). The large n / s
forward fixtures (``n_calibrated``, ``s_calibrated``, 65 MB) are not copied: a test that needs one
looks in the folder named by the environment variable ``TFG_MM_FIXTURES`` (a ``deimv2_official``
folder, e.g. ``../shared/fixtures/deimv2_official`` on the project's machines) and skips, naming
the variable, when it is not there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

IN_REPO = Path(__file__).resolve().parent / "fixtures" / "deimv2_official"
ENV_VAR = "TFG_MM_FIXTURES"


def official_fixture(name: str) -> Path:
    """The fixture folder ``name`` (e.g. ``atto_calibrated``, ``loss_n_dn``, ``architectures``), or skip."""
    roots = [IN_REPO]
    if os.environ.get(ENV_VAR):
        roots.append(Path(os.environ[ENV_VAR]))
    for root in roots:
        if (root / name).is_dir():
            return root / name
    pytest.skip(
        f"official DEIMv2 fixture `{name}` is not in tests/fixtures/deimv2_official/: set {ENV_VAR} "
        f"to a deimv2_official folder that holds it"
    )
