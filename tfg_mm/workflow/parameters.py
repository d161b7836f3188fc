"""What a notebook's first code cell calls: its validated parameters (:func:`notebook_params`).

A module of its own so that a notebook kernel imports neither papermill (about 4 s) nor nbconvert to read them.
"""

from __future__ import annotations

from transformers.utils import logging as transformers_logging

from tfg_mm.config import params_from_notebook


def notebook_params(namespace: dict):
    """The validated :class:`~tfg_mm.config.Params` of a notebook run, from ``globals()``.

    The notebooks' ``parameters`` cells set ``params_file`` and leave the other names at ``None``
    ("not given here"), so a value from ``params_file`` is only overridden by what papermill's
    ``-p name value`` / ``-f file.yaml`` inject. A misspelled injected name fails with a
    did-you-mean (:func:`tfg_mm.config.params_from_notebook`).
    """
    # A notebook is a thesis page: transformers' per-save / per-load progress bars ("Writing model shards",
    # "Loading weights") would fill its stderr blocks. The terminal (CLI) keeps them.
    transformers_logging.disable_progress_bar()
    return params_from_notebook({k: v for k, v in namespace.items() if v is not None})
