"""The terminal summary of under-covered experts stays a few lines however deep the model (each remedy said once,
four layers shown, the rest counted), and still names experts with their routed tokens."""

from moequant.calibrate import ExpertsCoverage
from moequant.quantize_command import SHOWN_CONTAINERS, SHOWN_EXPERTS, coverage_lines

REMEDY = "coverage: gate_up from the layer's hidden states, down from a targeted pass over 8192 tokens"


def _layer(i: int, under: list[tuple[int, int, str]]) -> ExpertsCoverage:
    return ExpertsCoverage(f"model.layers.{i}.mlp.experts", "coverage", 16, (0,) * 128, 8192, tuple(under), 0, 0,
                           0.0, 0.0)


def test_a_deep_model_s_listing_is_bounded_and_says_each_remedy_once():
    layers = [_layer(i, [(e, e % 16, REMEDY) for e in range(40)]) for i in range(48)]
    lines = coverage_lines(layers)
    assert len(lines) == 1 + SHOWN_CONTAINERS + 1
    assert sum(REMEDY in line for line in lines) == 1
    assert lines[1] == "    model.layers.0.mlp.experts: " + " ".join(f"e{e}:{e % 16}" for e in range(SHOWN_EXPERTS)) \
        + f" (+{40 - SHOWN_EXPERTS} more)"
    rest = 48 - SHOWN_CONTAINERS
    assert lines[-1] == (f"    ... {40 * rest} more in {rest} more layers: every one in report.html and "
                         "moequant_report.json")


def test_each_remedy_gets_its_own_heading_and_covered_layers_print_nothing():
    layers = [_layer(0, [(3, 0, "route_all: every token"), (5, 2, REMEDY)]), _layer(1, []), _layer(2, [(7, 1, REMEDY)])]
    lines = coverage_lines(layers)
    assert lines == ["  under-covered -> route_all: every token:", "    model.layers.0.mlp.experts: e3:0",
                     f"  under-covered -> {REMEDY}:", "    model.layers.0.mlp.experts: e5:2",
                     "    model.layers.2.mlp.experts: e7:1"]
    assert coverage_lines([_layer(0, [])]) == []
