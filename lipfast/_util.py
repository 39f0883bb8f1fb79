"""Small helpers shared by lipfast's modules: eval-mode probes and optional progress bars."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block; every module's own train/eval flag restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def progress(items: Iterable[Any], desc: str, unit: str) -> Iterable[Any]:
    """``items`` behind a tqdm progress bar when tqdm is installed, else ``items`` itself."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit, leave=False)
