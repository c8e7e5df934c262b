"""Tests of the example policy, written the way cachekit tests its own policies."""

from __future__ import annotations

import pytest
import torch

from cachekit.engine import CacheEngine
from cachekit.errors import ConfigError
from cachekit.plugins import Registry
from cachekit.sampling import SamplerConfig, generate
from cachekit.testing import ToyModel
from cachekit.testing.contract import policy_contract_tests
from cachekit_example_policy import EveryOtherConfig


# The policy contract suite, one test per check (e.g. test_policy_contract[every_other-state]);
# the policy comes from the installed entry point.
test_policy_contract = policy_contract_tests(["every_other"], registry=Registry)


def test_found_through_the_entry_point():
    item = Registry().get("policy", "every_other")
    assert item.distribution.startswith("cachekit-example-policy")


def test_knobs_are_validated_and_documented():
    with pytest.raises(ConfigError, match="warmup_steps"):
        EveryOtherConfig(warmup_steps=0)
    assert all(row["doc"] for row in EveryOtherConfig.knob_docs())
    assert {"slow", "fast"} <= set(EveryOtherConfig.presets)


def test_alternates_on_the_toy_model():
    model = ToyModel(seed=0)
    engine = CacheEngine.from_name("every_other", preset="fast", registry=Registry())
    cond = model.encode_condition(torch.tensor([3]))
    result = generate(model, cond, uncond=model.null_condition(1), engine=engine,
                      config=SamplerConfig(num_frames=4, num_steps=6))
    stats = result.stats
    assert stats.decisions["reuse"] > 0 and not stats.recomputes
    previous = {}
    for r in stats.records:  # one record per (branch, chunk, step), in call order
        key = (r.window, r.branch, r.chunk)
        assert not (r.kind == "reuse" and previous.get(key) == "reuse"), r
        previous[key] = r.kind
