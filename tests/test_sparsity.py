import pytest
from hypothesis import given
from hypothesis import strategies as st

from chipprune.models import ARCHS
from chipprune.pruning.sparsity import (
    Rounded,
    SparsityError,
    format_rates,
    full_widths,
    parse_rates,
    resolve,
    rounding,
    widths,
)


def test_paper_syntax_expands_runs():
    assert parse_rates("[0.]+[0.15]*2+[0.4]*27") == [0.0, 0.15, 0.15] + [0.4] * 27


def test_plain_list_and_bracket_lists():
    assert parse_rates("0, 0.5,.25") == [0.0, 0.5, 0.25]
    assert parse_rates("[0.1, 0.2]*2+[3e-1]") == [0.1, 0.2, 0.1, 0.2, 0.3]


@pytest.mark.parametrize(
    "text",
    ["", "[0.1", "[0.1]*", "[0.1]*x", "__import__('os')", "[0.1]+", "0.1;0.2", "[a]", "[0.1]]", "[0.1]*2*3", "1,,2"],
)
def test_malformed_strings_raise_our_error(text):
    with pytest.raises(SparsityError):
        parse_rates(text)


@given(st.text(max_size=40))
def test_parser_raises_nothing_but_its_own_error(text):
    try:
        rates = parse_rates(text)
    except SparsityError:
        return
    assert all(isinstance(r, float) for r in rates)


@given(st.lists(st.sampled_from([0.0, 0.1, 0.15, 0.4, 0.5, 0.75]), min_size=1, max_size=60))
def test_format_round_trips(rates):
    assert parse_rates(format_rates(rates)) == rates


def test_presets_resolve_for_every_arch():
    for name, arch in ARCHS.items():
        for preset in arch.presets:
            assert len(resolve(name, preset)) == arch.num_rates


def test_wrong_count_names_the_expected_count():
    with pytest.raises(SparsityError, match="resnet56 takes 30 rates"):
        resolve("resnet56", "[0.]+[0.15]*2+[0.4]*26")
    with pytest.raises(SparsityError, match="resnet110 takes 57 rates"):
        resolve("resnet110", "[0.]*3")


@pytest.mark.parametrize("bad", ["[1.0]*30", "[0.]*29+[1.5]"])
def test_rates_outside_unit_interval(bad):
    with pytest.raises(SparsityError, match=r"\[0, 1\)"):
        resolve("resnet56", bad)


def test_rates_that_leave_no_channels():
    with pytest.raises(SparsityError, match="no channels"):
        widths("resnet56", "[0.]+[0.]*2+[0.95]*27")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(SparsityError, match="unknown preset 'paper-9' for resnet56 .presets: paper-1, paper-2"):
        resolve("resnet56", "paper-9")
    with pytest.raises(SparsityError, match="presets: none"):
        resolve("resnet20", "paper-1")


@pytest.mark.parametrize("arch", ["resnet56", "resnet110", "vgg16_bn", "resnet50"])
@pytest.mark.parametrize("n", [1, 8, 16, 48])
def test_round_to_keeps_multiples_never_zero_never_above_the_layer(arch, n):
    for preset in ARCHS[arch].presets:
        floor, full, kept = widths(arch, preset), full_widths(arch), widths(arch, preset, n)
        for name, c in kept.items():
            assert 1 <= c <= full[name]
            assert c % n == 0 or c == full[name], "a multiple of n, or the whole layer"
            assert abs(c - floor[name]) <= n / 2 or c in (n, full[name]), "the nearest multiple"


def test_round_to_matches_the_hand_computed_paper_1_widths():
    kept = widths("resnet56", "paper-1", 8)
    assert (kept["conv1"], kept["layer1.0.conv2"], kept["layer2.0.conv2"]) == (16, 16, 24)
    assert (kept["layer1.0.conv1"], kept["layer2.0.conv1"], kept["layer3.0.conv1"]) == (8, 16, 40)
    assert rounding("resnet56", "paper-1", 16) == [
        Rounded(9, 16, 9),
        Rounded(13, 16, 9),
        Rounded(19, 16, 9),
        Rounded(27, 32, 9),
        Rounded(38, 32, 9),
    ]


def test_round_to_rescues_a_layer_the_floor_would_empty():
    with pytest.raises(SparsityError, match="leaves no channels"):
        widths("resnet20", "[0.99]*12")
    assert min(widths("resnet20", "[0.99]*12", 8).values()) == 8
