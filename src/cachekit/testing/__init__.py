"""Public testing helpers: a toy model, hypothesis strategies and the policy contract suite.

Plugin authors test their policies exactly as cachekit tests its own::

    from cachekit.testing import ToyModel, run_policy_contract

    run_policy_contract("my_policy")   # raises AssertionError with a report on a violation

See :mod:`cachekit.testing.contract` for the checks and the pytest recipe.
"""

from ..protocols import PolicyContract
from .contract import (CHECKS, ContractReport, ContractSkip, policy_contract_tests, run_check,
                       run_policy_contract)
from .replay import Trajectory, record_trajectory, replay
from .toy import ToyModel, ToySession

__all__ = ["ToyModel", "ToySession", "PolicyContract", "CHECKS", "ContractReport",
           "ContractSkip", "policy_contract_tests", "run_check", "run_policy_contract",
           "Trajectory", "record_trajectory", "replay"]
