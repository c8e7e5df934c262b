"""Public testing helpers: a toy model, hypothesis strategies and the policy contract suite.

Plugin authors test their policies exactly as cachekit tests its own::

    from cachekit.testing import ToyModel, run_policy_contract
"""

from .toy import ToyModel, ToySession

__all__ = ["ToyModel", "ToySession"]
