"""hallucination: attention redistribution against hallucination (VAR, GIFT, PAINT) and
its metrics (POPE, CHAIR); built on vlmtools only."""
from .gift import GIFT
from .paint import PAINT
from .var import VAR, NoSinksWarning

__all__ = ["GIFT", "PAINT", "VAR", "NoSinksWarning"]
