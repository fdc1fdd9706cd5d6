"""SurgeryConfig refuses every setting that would produce garbage, by name, wherever it is built.

The HTTP refine route builds SurgeryConfig(**json_fields) and the CLI builds it from its options, so
this table is what a client of either gets. Expected messages are written out by hand.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from vllm_surgery.config import SurgeryConfig
from vllm_surgery.errors import ConfigError

MODULES = (
    "modules must be a scope (residual, attention, mlp, all), comma-separated module names or a list of "
    "module names; "
)
LAYERS = (
    "layers must be 'START:END' or [START, END] (a half-open range of layer indices >= 0, either end may be "
    "None for open); got "
)
POLICY = (
    "unknown policy {}: policy must be one of auto, grad_direction, abs_select, smooth_abs, random_index, "
    "grad_search, sigma_descent"
)
PARAMS = "policy_params must be a mapping of parameter names to numbers, e.g. {'eta_s': 1.0}; got "

BAD = [
    # modules
    ({"modules": 5}, MODULES + "got 5"),
    ({"modules": [0, 1, 2]}, MODULES + "got [0, 1, 2]"),
    ({"modules": {}}, MODULES + "got {}"),
    ({"modules": None}, MODULES + "got None"),
    ({"modules": []}, MODULES + "got the empty []"),
    ({"modules": ""}, MODULES + "got the empty ''"),
    ({"modules": " , "}, MODULES + "got the empty ' , '"),
    ({"modules": ["o_proj", " "]}, MODULES + "the list ['o_proj', ' '] holds an empty name"),
    # layers
    ({"layers": [0]}, LAYERS + "[0]"),
    ({"layers": [0, 1, 2]}, LAYERS + "[0, 1, 2]"),
    ({"layers": {}}, LAYERS + "{}"),
    ({"layers": 3}, LAYERS + "3"),
    ({"layers": [True, 2]}, LAYERS + "[True, 2]"),
    ({"layers": [0.5, 2]}, LAYERS + "[0.5, 2]"),
    ({"layers": [-1, 3]}, LAYERS + "[-1, 3]"),
    ({"layers": ["0", "2"]}, LAYERS + "['0', '2']"),
    ({"layers": (3, 3)}, "layers (3, 3) is empty (START must be below END)"),
    ({"layers": "5:2"}, "layers '5:2' is empty (START must be below END)"),
    ({"layers": "x"}, "layers must look like START:END with layer indices >= 0, e.g. 4:12; got 'x'"),
    ({"layers": "-2:4"}, "layers must look like START:END with layer indices >= 0, e.g. 4:12; got '-2:4'"),
    # integers: no bools, floats or strings
    ({"samples": 2.5}, "samples must be a positive integer or None; got 2.5"),
    ({"samples": 0}, "samples must be a positive integer or None; got 0"),
    ({"samples": True}, "samples must be a positive integer or None; got True"),
    ({"samples": "8"}, "samples must be a positive integer or None; got '8'"),
    ({"seed": "x"}, "seed must be an integer in [0, 2**63); got 'x'"),
    ({"seed": 2**70}, f"seed must be an integer in [0, 2**63); got {2**70}"),
    ({"seed": 2**63}, f"seed must be an integer in [0, 2**63); got {2**63}"),
    ({"seed": -1}, "seed must be an integer in [0, 2**63); got -1"),
    ({"seed": False}, "seed must be an integer in [0, 2**63); got False"),
    ({"seed": 1.0}, "seed must be an integer in [0, 2**63); got 1.0"),
    ({"max_length": 1}, "max_length must be an integer >= 2; got 1"),
    ({"max_length": 512.0}, "max_length must be an integer >= 2; got 512.0"),
    ({"max_length": None}, "max_length must be an integer >= 2; got None"),
    ({"max_batch_tokens": 0}, "max_batch_tokens must be a positive integer or None; got 0"),
    ({"max_batch_tokens": True}, "max_batch_tokens must be a positive integer or None; got True"),
    # floats: finite numbers, no bools or strings
    ({"heldout_fraction": True}, "heldout_fraction must be a number in [0, 1); got True"),
    ({"heldout_fraction": "0.25"}, "heldout_fraction must be a number in [0, 1); got '0.25'"),
    ({"heldout_fraction": float("nan")}, "heldout_fraction must be a number in [0, 1); got nan"),
    ({"heldout_fraction": 1.0}, "heldout_fraction must be a number in [0, 1); got 1.0"),
    ({"heldout_fraction": -0.1}, "heldout_fraction must be a number in [0, 1); got -0.1"),
    ({"min_improvement": float("nan")}, "min_improvement must be a number in [0, 1); got nan"),
    ({"min_improvement": float("-inf")}, "min_improvement must be a number in [0, 1); got -inf"),
    ({"min_improvement": -0.01}, "min_improvement must be a number in [0, 1); got -0.01"),
    ({"min_improvement": 1}, "min_improvement must be a number in [0, 1); got 1"),
    ({"min_improvement": False}, "min_improvement must be a number in [0, 1); got False"),
    ({"max_false_accept": 0}, "max_false_accept must be a probability in (0, 1]; got 0"),
    ({"max_false_accept": 1.5}, "max_false_accept must be a probability in (0, 1]; got 1.5"),
    ({"max_false_accept": float("inf")}, "max_false_accept must be a probability in (0, 1]; got inf"),
    ({"max_false_accept": True}, "max_false_accept must be a probability in (0, 1]; got True"),
    ({"max_false_accept": "0.05"}, "max_false_accept must be a probability in (0, 1]; got '0.05'"),
    # choices
    ({"policy": "best"}, POLICY.format("'best'")),
    ({"policy": 5}, POLICY.format("5")),
    ({"policy": None}, POLICY.format("None")),
    ({"constraint": "l0"}, "unknown constraint 'l0': constraint must be one of l1, l2, none"),
    ({"constraint": ["l1"]}, "unknown constraint ['l1']: constraint must be one of l1, l2, none"),
    ({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:N; got 'gpu'"),
    ({"device": "cuda:x"}, "device must be auto, cpu, cuda or cuda:N; got 'cuda:x'"),
    ({"device": 0}, "device must be auto, cpu, cuda or cuda:N; got 0"),
    ({"force": 1}, "force must be true or false; got 1"),
    ({"progress": "yes"}, "progress must be true or false; got 'yes'"),
    # policy parameters
    ({"policy_params": [1]}, PARAMS + "[1]"),
    ({"policy_params": "eta_s=1"}, PARAMS + "'eta_s=1'"),
    ({"policy_params": None}, PARAMS + "None"),
    (
        {"policy_params": {"eta_s": float("nan")}},
        "policy parameter grad_direction.eta_s must be a finite number; got nan (the default is 2.0)",
    ),
    (
        {"policy_params": {"eta_s": float("inf")}},
        "policy parameter grad_direction.eta_s must be a finite number; got inf (the default is 2.0)",
    ),
    (
        {"policy_params": {"eta_e": float("-inf")}},
        "policy parameter grad_direction.eta_e must be a finite number; got -inf (the default is 0.2)",
    ),
    (
        {"policy_params": {"eta_s": True}},
        "policy parameter grad_direction.eta_s must be a finite number; got True (the default is 2.0)",
    ),
    (
        {"policy_params": {"eta_s": "1.0"}},
        "policy parameter grad_direction.eta_s must be a finite number; got '1.0' (the default is 2.0)",
    ),
    (
        {"policy_params": {"eta_s": -1}},
        "grad_direction needs eta_s >= 0 (a step size; the default is 2.0); got eta_s=-1.0",
    ),
    (
        {"policy_params": {"eta": 1.0}},
        "policy 'grad_direction' has no parameter 'eta' (it has: eta_s, eta_e)",
    ),
    (
        {"policy": "abs_select", "policy_params": {"amp": -0.5}},
        "abs_select needs amp >= 0 (a factor on singular values); got amp=-0.5",
    ),
    (
        {"policy": "random_index", "policy_params": {"noise_frac": 1.5}},
        "random_index needs noise_frac to lie in [0, 1] (a share of the rank); got noise_frac=1.5",
    ),
    (
        {"policy": "smooth_abs", "policy_params": {"mid": 2.0}},
        "smooth_abs needs sup < mid < amp (the gate passes through mid at the median); "
        "got sup=0.8, mid=2.0, amp=1.25",
    ),
    (
        {"policy": "smooth_abs", "policy_params": {"tau_scale": 0}},
        "smooth_abs needs tau_scale > 0; got tau_scale=0.0",
    ),
    (
        {"policy": "auto", "policy_params": {"sigma_descent": 1}},
        "policy_params['sigma_descent'] must be a mapping of sigma_descent's parameter names to numbers; "
        "got 1",
    ),
    (
        {"policy": "auto", "policy_params": {"random_index": {}}},
        "with policy auto, policy_params maps policy names (sigma_descent) to overrides; unknown: random_index",
    ),
    (
        {"policy": "auto", "policy_params": {"sigma_descent": {"eta_s": float("nan")}}},
        "policy parameter sigma_descent.eta_s must be a finite number; got nan (the default is 2.0)",
    ),
    (
        {"policy": "auto", "heldout_fraction": 0.0},
        "policy auto tests its candidate on held-out data; heldout_fraction must be > 0",
    ),
    (
        {"policy": "auto", "selection_fraction": 0.0},
        "policy auto chooses on the selection split; selection_fraction must be > 0",
    ),
    (
        {"policy": "grad_search", "selection_fraction": 0.0},
        "policy grad_search chooses on the selection split; selection_fraction must be > 0",
    ),
    (
        {"policy": "sigma_descent", "heldout_fraction": 0.5, "selection_fraction": 0.5},
        "heldout_fraction (0.5) + selection_fraction (0.5) must be below 1: the sensitivity pass needs "
        "examples of its own",
    ),
    ({"selection_fraction": 1.0}, "selection_fraction must be a number in [0, 1); got 1.0"),
    ({"correction_weight": 0}, "correction_weight must be a number in (0, 100]; got 0"),
    ({"correction_weight": float("inf")}, "correction_weight must be a number in (0, 100]; got inf"),
    (
        {"policy": "sigma_descent", "policy_params": {"steps": 2.5}},
        "sigma_descent needs steps to be a whole number from 1 to 100; got steps=2.5",
    ),
    (
        {"policy": "grad_search", "policy_params": {"rungs": 0}},
        "grad_search needs rungs to be a whole number from 1 to 20; got rungs=0.0",
    ),
]


@pytest.mark.parametrize(("settings", "message"), BAD, ids=[repr(s) for s, _ in BAD])
def test_bad_settings_are_refused_by_name(settings, message):
    with pytest.raises(ConfigError) as info:
        SurgeryConfig(**settings)
    assert str(info.value) == message


def test_good_settings_are_normalised():
    c = SurgeryConfig(modules=" o_proj, down_proj ", layers="2:", policy_params={"eta_s": 1})
    assert c.modules == ["o_proj", "down_proj"] and c.layers == (2, None)
    assert c.policy_params == {"eta_s": 1.0} and type(c.policy_params["eta_s"]) is float
    assert SurgeryConfig(modules=("q_proj",), layers=[1, None]).modules == ["q_proj"]
    assert SurgeryConfig(layers=[None, 3]).layers == (None, 3)
    assert SurgeryConfig(layers="4").layers == (4, 5)
    assert SurgeryConfig(modules="mlp").modules == "mlp"
    assert SurgeryConfig(modules="model.layers.0.mlp.up_proj").modules == ["model.layers.0.mlp.up_proj"]
    assert SurgeryConfig(seed=2**63 - 1, device="cuda:1", max_false_accept=1).seed == 2**63 - 1
    c = SurgeryConfig(policy="auto", policy_params={"sigma_descent": {"steps": 3}})
    assert c.policy_params == {"sigma_descent": {"steps": 3.0}}
    assert c.to_dict()["policy_params"] == {"sigma_descent": {"steps": 3.0}}
    # A one-step policy uses no selection split, so its fractions are not checked against each other.
    assert (
        SurgeryConfig(policy="grad_direction", heldout_fraction=0.5, selection_fraction=0.6).policy
        == "grad_direction"
    )


def test_from_mapping_refuses_unknown_names_and_points_from_min_z_to_its_replacement():
    with pytest.raises(
        ConfigError, match=re.escape("unknown setting(s) min_z, speed (settings: policy, ")
    ) as e:
        SurgeryConfig.from_mapping({"min_z": 2.0, "speed": 1})
    assert str(e.value).endswith(
        "; min_z was replaced by max_false_accept (the gate's false-acceptance probability, default 0.025)"
    )
    assert SurgeryConfig.from_mapping({"seed": 3}) == SurgeryConfig(seed=3)


def test_every_field_has_help_and_says_whether_it_changes_the_result():
    for f in dataclasses.fields(SurgeryConfig):
        assert f.metadata["help"] and isinstance(f.metadata["affects_result"], bool), f.name
    # The fields a cache key must cover (the serving store's KEY_CONFIG_FIELDS derives from this).
    assert SurgeryConfig.result_fields() == (
        "policy",
        "policy_params",
        "constraint",
        "modules",
        "layers",
        "heldout_fraction",
        "selection_fraction",
        "correction_weight",
        "min_improvement",
        "min_loss_reduction",
        "max_false_accept",
        "gate_statistic",
        "samples",
        "max_length",
        "seed",
    )
