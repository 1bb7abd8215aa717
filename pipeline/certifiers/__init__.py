"""The certifiers. Each module holds one method's math on counts and its `Certifier` class.

Sharing: certifiers that ask for the same (stage, sigma) stream get the same draws, so one forward
pass per draw serves `Cohen` and `TopK` together. Each certificate still holds with probability
>= 1 - alpha on its own; being computed from shared draws, several certificates of one image hold
together with probability >= 1 - (the sum of their alphas). Certifiers in a sequential mode (see
`pipeline.certifiers.sequential`) decide per image how many draws to take, so they sample on their own.

`REGISTRY` maps a config's certifier name to its class. A certifier defined elsewhere joins it with
`register(cls)`; nothing else is edited, as the readers of the rows read what the certifier declares
(`pipeline.certifiers.base`).
"""

from pipeline.certifiers import center, cohen, dssn, smooth_reduce, topk
from pipeline.certifiers.base import ABSTAIN, Certificate, Certifier
from pipeline.certifiers.center import Center
from pipeline.certifiers.cohen import Cohen
from pipeline.certifiers.dssn import DSSN, SSN
from pipeline.certifiers.smooth_reduce import SmoothReduce
from pipeline.certifiers.topk import TopK

REGISTRY: dict[str, type[Certifier]] = {cls.name: cls for cls in (Cohen, TopK, DSSN, SSN, Center, SmoothReduce)}


def register(cls: type[Certifier]) -> type[Certifier]:
    """Adds a certifier class to `REGISTRY` under its `name` (usable as a class decorator); returns it.
    Raises ValueError when the name is taken by another class."""
    if not (isinstance(cls, type) and issubclass(cls, Certifier) and isinstance(getattr(cls, "name", None), str)):
        raise ValueError(f"register: expected a Certifier subclass with a name, got {cls!r}")
    if REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"register: the certifier name {cls.name!r} is taken by {REGISTRY[cls.name].__qualname__}")
    REGISTRY[cls.name] = cls
    return cls


__all__ = ["ABSTAIN", "DSSN", "REGISTRY", "SSN", "Center", "Certificate", "Certifier", "Cohen", "SmoothReduce",
           "TopK", "center", "cohen", "dssn", "register", "smooth_reduce", "topk"]
