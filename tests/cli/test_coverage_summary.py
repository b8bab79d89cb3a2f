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


def test_weight_error_line_says_higher_when_it_is_higher():
    """GPTQ's codes are farther from the weights than round to nearest's (it lowers the output error instead): the
    summary must not print a negative "lower"."""
    from moequant.quantize_command import weight_error_line
    from moequant.report import Report, WeightError

    def report(shipped, max_scales):
        return Report("r", True, "", 0, "coverage", 16, weight_errors=[WeightError("a", "gptq", shipped, max_scales)])

    assert weight_error_line(report(0.0119, 0.0089), "gptq").endswith(
        "(33.7% higher; gptq lowers the layers' output error, not this one)")
    assert weight_error_line(report(0.0060, 0.0080), "mse").endswith("0.0060 shipped vs 0.0080 with max scales "
                                                                      "(25.0% lower)")
