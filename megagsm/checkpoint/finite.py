"""NaN / Inf in a weight is reported, never converted silently."""
from __future__ import annotations

import torch

from megagsm.errors import UserError


class NonFiniteWeightError(UserError):
    pass


def check_finite(tensor: torch.Tensor, name: str, where) -> None:
    """Raises NonFiniteWeightError naming the tensor, the file/dir it came from and the counts."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    nan = int(torch.isnan(tensor).sum())
    inf = int(tensor.numel() - int(finite.sum()) - nan)
    raise NonFiniteWeightError(f"{where}: tensor {name} has {nan} NaN and {inf} Inf value(s) of "
                               f"{tensor.numel()}; pass --allow-nonfinite to convert it anyway")
