import math

import pytest
import torch

from vllm_surgery.errors import ConfigError
from vllm_surgery.policies import constrain, normalized, policy_params, reweight

SIGMA = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5])
G = torch.tensor([0.2, -0.1, 0.0, 0.4, -0.3])  # mean |g| = 0.2 -> gh = [1, -0.5, 0, 2, -1.5]


def test_normalisation():
    assert torch.allclose(normalized(G), torch.tensor([1.0, -0.5, 0.0, 2.0, -1.5], dtype=torch.float64))
    assert torch.all(normalized(torch.zeros(3)) == 0)  # guarded denominator


def test_grad_direction_by_hand():
    out = reweight(SIGMA, G, "grad_direction")
    gh = [1.0, -0.5, 0.0, 2.0, -1.5]
    expected = [s * math.exp(-(2.0 * max(x, 0) + 0.2 * min(x, 0))) for s, x in zip(SIGMA.tolist(), gh)]
    assert out.tolist() == pytest.approx(expected, rel=1e-6)  # G is float32
    # positive gradient (increasing sigma raises the loss) suppresses, negative enhances, gently
    assert out[0] < SIGMA[0] and out[1] > SIGMA[1] and out[2] == SIGMA[2]
    custom = reweight(SIGMA, G, "grad_direction", {"eta_s": 1.0, "eta_e": 1.0})
    assert custom[3].item() == pytest.approx(1.0 * math.exp(-2.0))


def test_abs_select_by_hand():
    # |gh| = [1, .5, 0, 2, 1.5], r=5: k_core = round(.2*5)=1 -> index 3; k_noise = 1 -> index 2
    out = reweight(SIGMA, G, "abs_select")
    assert out.tolist() == pytest.approx([4.0, 3.0, 2.0 * 0.8, 1.0 * 1.25, 0.5])
    wide = reweight(SIGMA, G, "abs_select", {"core_frac": 0.4, "noise_frac": 0.4, "mid": 0.9})
    # core: indices 3, 4; noise: 2, 1; mid: 0
    assert wide.tolist() == pytest.approx([4.0 * 0.9, 3.0 * 0.8, 2.0 * 0.8, 1.25, 0.5 * 1.25])


def test_abs_select_counts_never_overlap():
    g = torch.arange(1.0, 4.0)
    # k_core = round(1.5) = 2 (indices 2, 1); k_noise = min(round(2.7), r - k_core) = 1 (index 0)
    out = reweight(torch.ones(3), g, "abs_select", {"core_frac": 0.5, "noise_frac": 0.9})
    assert out.tolist() == pytest.approx([0.8, 1.25, 1.25])
    # at least one core component, even for a tiny core_frac
    assert reweight(torch.ones(3), g, "abs_select", {"core_frac": 0.0, "noise_frac": 0.0}).tolist() == [
        1.0,
        1.0,
        1.25,
    ]


def test_smooth_abs_by_hand():
    out = reweight(SIGMA, G, "smooth_abs")
    # |gh| = [1, .5, 0, 2, 1.5], sorted [0, .5, 1, 1.5, 2]; linear-interpolation quantiles:
    # q(0.2) at position 0.8 -> 0.4, q(0.8) at position 3.2 -> 1.6, median 1.0.
    # tau = 0.35 * (1.6 - 0.4) = 0.42; p = (mid - sup) / (amp - sup) = 0.2 / 0.45 = 4/9,
    # log(p / (1 - p)) = log(0.8); mu = 1.0 - 0.42 * log(0.8).
    tau = 0.42
    mu = 1.0 - tau * math.log(0.8)
    gate = [0.8 + 0.45 / (1.0 + math.exp(-(m - mu) / tau)) for m in (1.0, 0.5, 0.0, 2.0, 1.5)]
    assert out.tolist() == pytest.approx([s * f for s, f in zip(SIGMA.tolist(), gate)], rel=1e-6)
    # the median component maps exactly to mid (1.0): index 0 has |gh| = 1.0 = median
    assert out[0].item() == pytest.approx(4.0)
    assert min(gate) > 0.8 and max(gate) < 1.25


def test_smooth_abs_degenerate_is_mid():
    out = reweight(SIGMA, torch.full((5,), 0.3), "smooth_abs", {"mid": 0.9})
    assert out.tolist() == pytest.approx((SIGMA * 0.9).tolist())


def test_random_index_is_seeded_and_uses_abs_select_counts():
    a = reweight(SIGMA, G, "random_index", generator=torch.Generator().manual_seed(3))
    b = reweight(SIGMA, G, "random_index", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    factors = sorted((a / SIGMA.double()).tolist())
    assert factors == pytest.approx([0.8, 1.0, 1.0, 1.0, 1.25])


def test_constraints_invariants():
    new = torch.tensor([5.0, -1.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    l1 = constrain(SIGMA, new, "l1")
    assert torch.all(l1 >= 0) and l1[1] == 0
    assert l1.sum().item() == pytest.approx(SIGMA.sum().item())
    assert (l1 / new.clamp_min(0)).nan_to_num(0)[[0, 2, 4]].tolist() == pytest.approx([10.5 / 8] * 3)
    l2 = constrain(SIGMA, new, "l2")
    assert torch.linalg.vector_norm(l2).item() == pytest.approx(torch.linalg.vector_norm(SIGMA).item())
    none = constrain(SIGMA, new, "none")
    assert none.tolist() == [5.0, 0.0, 2.0, 0.0, 1.0]
    zero = constrain(torch.zeros(3), torch.zeros(3), "l1")
    assert torch.all(zero == 0)


@pytest.mark.parametrize(
    ("policy", "params", "message"),
    [
        (
            "nope",
            {},
            "unknown policy 'nope'; choose one of grad_direction, abs_select, smooth_abs, random_index, "
            "grad_search, sigma_descent or auto",
        ),
        (
            "grad_direction",
            {"eta": 1},
            "policy 'grad_direction' has no parameter 'eta' (it has: eta_s, eta_e)",
        ),
        (
            "grad_direction",
            {"eta_s": "x"},
            "policy parameter grad_direction.eta_s must be a finite number; got 'x' (the default is 2.0)",
        ),
        (
            "grad_direction",
            {"eta_e": float("nan")},
            "policy parameter grad_direction.eta_e must be a finite number; got nan (the default is 0.2)",
        ),
        (
            "grad_direction",
            {"eta_s": -1},
            "grad_direction needs eta_s >= 0 (a step size; the default is 2.0); got eta_s=-1.0",
        ),
        (
            "abs_select",
            {"core_frac": 1.5},
            "abs_select needs core_frac to lie in [0, 1] (a share of the rank); got core_frac=1.5",
        ),
        (
            "abs_select",
            {"sup": float("inf")},
            "policy parameter abs_select.sup must be a finite number; got inf (the default is 0.8)",
        ),
        (
            "smooth_abs",
            {"mid": 2.0},
            "smooth_abs needs sup < mid < amp (the gate passes through mid at the median); got sup=0.8, mid=2.0, amp=1.25",
        ),
    ],
)
def test_bad_policy_settings(policy, params, message):
    with pytest.raises(ConfigError) as info:
        policy_params(policy, params)
    assert str(info.value) == message


def test_bad_constraint():
    with pytest.raises(ConfigError, match="unknown constraint"):
        constrain(SIGMA, SIGMA, "l3")
