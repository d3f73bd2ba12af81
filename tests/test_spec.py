"""Policy spec strings: NAME or NAME:KEY=VALUE,... with bracketed lists."""
from __future__ import annotations

import pytest

from autolr.chain import build_chain
from autolr.plugins import policy_classes
from autolr.policy import PolicyError
from autolr.spec import parse_spec

REGISTRY = policy_classes()


@pytest.mark.parametrize("spec, expected", [
    ("plateau", ("plateau", {})),
    ("step:step_size=30,gamma=0.5", ("step", {"step_size": 30, "gamma": 0.5})),
    ("multistep:milestones=[30,60,90],gamma=0.1", ("multistep", {"milestones": [30, 60, 90], "gamma": 0.1})),
    ("exponential:decay_rate=0.9,staircase=true", ("exponential", {"decay_rate": 0.9, "staircase": True})),
    ("plateau:metric=val/loss,mode=max", ("plateau", {"metric": "val/loss", "mode": "max"})),
    ("plateau:metric='a,b'", ("plateau", {"metric": "'a", "b'": None}) if False else None),
    (" cosine : T_max = 100 , eta_min = 1e-5 ", ("cosine", {"T_max": 100, "eta_min": 1e-5})),
    ("x:a=[],b=none", ("x", {"a": [], "b": None})),
])
def test_parse_spec(spec, expected):
    if expected is None:
        with pytest.raises(PolicyError):
            parse_spec(spec)
        return
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("bad", ["", ":a=1", "step:step_size", "step:=3", "m:milestones=[1,2", "m:x=1]",
                                 "step:a=1,a=2", "9abc"])
def test_bad_specs_are_clear_errors(bad):
    with pytest.raises(PolicyError, match="spec|parameter|list|unbalanced"):
        parse_spec(bad)


def build(spec):
    return build_chain([parse_spec(spec)], REGISTRY)


def test_unknown_policy_lists_the_installed_ones():
    with pytest.raises(PolicyError, match="unknown policy 'stepp'.*installed: .*step"):
        build("stepp")


def test_a_missing_required_parameter_is_named_with_an_example():
    """Regression (a helper's audit): it read "Step.__init__() missing 1 required keyword-only
    argument"."""
    with pytest.raises(PolicyError, match=r"policy 'step' needs 'step_size' \(e.g. --policy step:step_size=...\)"):
        build("step:gamma=0.5")
    with pytest.raises(PolicyError, match="needs 'milestones'"):
        build("multistep")


def test_unknown_parameter_lists_the_valid_ones():
    with pytest.raises(PolicyError, match="no parameter 'stepsize'.*valid: .*step_size"):
        build("step:stepsize=3")


@pytest.mark.parametrize("spec, message", [
    ("step:step_size=1.5", "integer"),
    ("step:step_size=0", "step_size must be > 0"),
    ("step", "step_size"),  # required
    ("plateau:mode=up", "not one of"),
    ("plateau:factor=2", "factor must be in"),
    ("warmup:start_factor=0", "start_factor"),
    ("exponential", "either gamma"),
    ("exponential:gamma=0.9,decay_rate=0.9", "either gamma"),
    ("cosine:T_max=abc", "number"),
    ("multistep:milestones=[1,x]", "integer"),
    ("step:step_size=2,gamma=true", "number"),
    # an integer parameter given inf, nan or an overflowing number: was a raw OverflowError/ValueError
    ("step:step_size=inf", "integer, got inf"),
    ("step:step_size=nan", "integer, got nan"),
    ("plateau:method=threshold,patience=1e400", "integer, got inf"),
    ("multistep:milestones=[10,inf]", "integer"),
    ("step:step_size=2.5", "integer"),
])
def test_invalid_values_are_clear_errors(spec, message):
    with pytest.raises(PolicyError, match=message):
        build(spec)


def test_lists_become_tuples_and_numbers_are_coerced():
    chain = build("multistep:milestones=[60,30]")
    assert chain.policies[0].milestones == (30, 60)
    assert build("cosine:T_max=10").policies[0].T_max == 10.0
