"""Tests for vggnet.net.configs: the paper's Table 1 as data and the architecture parser.

Every expected value here is written out by hand from the paper (arXiv:1409.1556, Table 1) or from the token rules
in the module docstring, not computed by the code under test.
"""

from __future__ import annotations

import json

import pytest

import vggnet
from vggnet.net.configs import (
    CFGS,
    D2L_VGG11_BLOCKS,
    LRN,
    Conv,
    Pool,
    arch_to_json,
    blocks_to_arch,
    num_pools,
    parse_arch,
    scale_width,
)

M = Pool()


def convs(layers):
    """(channels, kernel) of every conv, in order."""
    return [(layer.channels, layer.kernel) for layer in layers if isinstance(layer, Conv)]


# ------------------------------------------------------------------------------------------------ Table 1 as data
# Convs per block for channels (64, 128, 256, 512, 512), straight from the paper's Table 1.
TABLE1_BLOCKS = {
    "A": (1, 1, 2, 2, 2),
    "A-LRN": (1, 1, 2, 2, 2),
    "B": (2, 2, 2, 2, 2),
    "C": (2, 2, 3, 3, 3),
    "D": (2, 2, 3, 3, 3),
    "E": (2, 2, 4, 4, 4),
}
WEIGHT_LAYERS = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}


def test_cfgs_has_exactly_the_paper_letters():
    assert sorted(CFGS) == ["A", "A-LRN", "B", "C", "D", "E"]


@pytest.mark.parametrize("letter", sorted(TABLE1_BLOCKS))
def test_table1_block_structure(letter):
    layers = parse_arch(letter)
    # Split at pools and count convs per block, ignoring LRN.
    blocks, current = [], []
    for layer in layers:
        if isinstance(layer, Pool):
            blocks.append(current)
            current = []
        elif isinstance(layer, Conv):
            current.append(layer.channels)
    assert current == []  # every config ends with a pool
    assert tuple(len(b) for b in blocks) == TABLE1_BLOCKS[letter]
    assert [set(b) for b in blocks] == [{64}, {128}, {256}, {512}, {512}]
    assert num_pools(layers) == 5
    # weight layers = convs + 3 FC layers
    assert len(convs(layers)) + 3 == WEIGHT_LAYERS[letter]


def test_config_c_kernel_sizes():
    # The third conv of blocks 3, 4 and 5 is 1x1; everything else 3x3.
    expected = [3, 3, 3, 3, 3, 3, 1, 3, 3, 1, 3, 3, 1]
    assert [k for _, k in convs(parse_arch("C"))] == expected
    assert [k for _, k in convs(parse_arch("D"))] == [3] * 13


def test_config_a_lrn_has_one_lrn_right_after_first_conv():
    layers = parse_arch("A-LRN")
    assert layers[0] == Conv(64, 3)
    assert layers[1] == LRN()
    assert sum(isinstance(layer, LRN) for layer in layers) == 1
    # Removing the LRN gives config A exactly.
    assert tuple(layer for layer in layers if not isinstance(layer, LRN)) == parse_arch("A")


def test_configs_without_lrn_have_none():
    for letter in ("A", "B", "C", "D", "E"):
        assert not any(isinstance(layer, LRN) for layer in parse_arch(letter))


# ------------------------------------------------------------------------------------------------ token forms
def test_paper_style_tokens():
    layers = parse_arch([(256, 1), "conv1-256", "conv3-64", "M", "LRN", 32, "conv5-16"])
    assert layers == (Conv(256, 1), Conv(256, 1), Conv(64, 3), M, LRN(), Conv(32, 3), Conv(16, 5))


def test_pool_and_lrn_spellings():
    layers = parse_arch([8, "M", "m", "maxpool", "POOL", " M ", "lrn", "LRN"])
    assert layers == (Conv(8, 3), M, M, M, M, M, LRN(), LRN())


def test_comma_string():
    assert parse_arch("64,M,128,M") == (Conv(64, 3), M, Conv(128, 3), M)
    # spaces and trailing commas are ignored; string channel counts become 3x3 convs
    assert parse_arch(" 64 , M, conv1-32 ,M,") == (Conv(64, 3), M, Conv(32, 1), M)


def test_record_tokens_pass_through():
    layers = (Conv(8, 5), M, LRN(), Conv(4, 1))
    assert parse_arch(list(layers)) == layers


def test_d2l_blocks_equal_config_a():
    assert blocks_to_arch(D2L_VGG11_BLOCKS) == CFGS["A"]
    assert D2L_VGG11_BLOCKS == ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))
    assert parse_arch(((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))) == parse_arch("A")
    # lists of lists (what JSON gives back) are the same spec
    assert parse_arch([[1, 64], [1, 128], [2, 256], [2, 512], [2, 512]]) == parse_arch("A")


def test_d2l_quarter_width():
    # d2l's small VGG-11 divides every channel count by 4: 16, 32, 64, 64, 128, 128, 128, 128.
    layers = scale_width(parse_arch(D2L_VGG11_BLOCKS), 0.25)
    assert [c for c, _ in convs(layers)] == [16, 32, 64, 64, 128, 128, 128, 128]
    assert num_pools(layers) == 5


def test_scale_width_keeps_kernels_pools_and_lrn():
    layers = scale_width(parse_arch("C"), 0.125)
    assert convs(layers) == [
        (8, 3), (8, 3), (16, 3), (16, 3), (32, 3), (32, 3), (32, 1),
        (64, 3), (64, 3), (64, 1), (64, 3), (64, 3), (64, 1),
    ]  # fmt: skip
    lrn = scale_width(parse_arch("A-LRN"), 0.5)
    assert lrn[:3] == (Conv(32, 3), LRN(), M)


def test_scale_width_rounds_and_floors_at_one():
    # 3 * 0.5 = 1.5 -> round -> 2; 5 * 0.01 = 0.05 -> 0 -> clamped to 1; 7 * 0.3 = 2.1 -> 2
    assert convs(scale_width((Conv(3), Conv(5), Conv(7, 1)), 0.5)) == [(2, 3), (2, 3), (4, 1)]
    assert convs(scale_width((Conv(5),), 0.01)) == [(1, 3)]
    assert convs(scale_width((Conv(7),), 0.3)) == [(2, 3)]


@pytest.mark.parametrize("width", [0, -0.5])
def test_scale_width_rejects_non_positive(width):
    with pytest.raises(vggnet.ConfigError, match="width must be > 0"):
        scale_width(parse_arch("A"), width)


def test_num_pools():
    assert num_pools(parse_arch("64,M,M,8")) == 2
    assert num_pools(parse_arch("64")) == 0


# ------------------------------------------------------------------------------------------------ canonical JSON
def test_arch_to_json_of_config_c():
    expected = [64, 64, "M", 128, 128, "M", 256, 256, "conv1-256", "M", 512, 512, "conv1-512", "M",
                512, 512, "conv1-512", "M"]  # fmt: skip
    assert arch_to_json(parse_arch("C")) == expected
    assert json.loads(json.dumps(expected)) == expected


@pytest.mark.parametrize("letter", sorted(CFGS))
def test_arch_to_json_round_trip(letter):
    layers = parse_arch(letter)
    as_json = json.loads(json.dumps(arch_to_json(layers)))
    assert parse_arch(as_json) == layers


def test_arch_to_json_custom():
    layers = parse_arch([(256, 1), "conv1-256", "conv3-64", "M", "LRN", "conv5-8"])
    assert arch_to_json(layers) == ["conv1-256", "conv1-256", 64, "M", "LRN", "conv5-8"]
    assert parse_arch(arch_to_json(layers)) == layers


def test_arch_to_json_round_trip_all_non_3x3_convs():
    layers = parse_arch("conv1-8,conv5-4")
    assert layers == (Conv(8, 1), Conv(4, 5))
    # arch_to_json gives [[8, 1], [4, 5]], which parse_arch reads as 8 convs of 1 channel + M + 4 convs of 5 + M.
    assert parse_arch(arch_to_json(layers)) == layers


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "arch",
    [
        ["X"],
        [64, "Q"],
        "64,Q",
        [64, 3.5],
        [64, None],
        [True],
        [64, (64, 3, 1)],
        [64, "conv3x3-64"],
        [64, "conv-64"],
        [64, (64, "3")],
    ],
)
def test_bad_tokens_raise_config_error(arch):
    with pytest.raises(vggnet.ConfigError, match="is not a layer"):
        parse_arch(arch)


def test_bad_token_message_names_the_token_and_the_forms():
    with pytest.raises(vggnet.ConfigError) as info:
        parse_arch([64, "Q"])
    message = str(info.value)
    assert "'Q'" in message
    for form in ("(channels, kernel)", "'conv1-256'", "'M'", "'LRN'"):
        assert form in message
    assert "\n" not in message


@pytest.mark.parametrize("arch", [[8, (64, 2)], [8, "conv2-64"], [8, "conv4-16", "M"], [8, "conv0-8"], "64,conv6-8"])
def test_even_or_zero_kernel_rejected(arch):
    with pytest.raises(vggnet.ConfigError, match="kernel odd"):
        parse_arch(arch)


@pytest.mark.parametrize("arch", [[0, "M"], [-4], [8, (0, 3)], "0,M"])
def test_non_positive_channels_rejected(arch):
    with pytest.raises(vggnet.ConfigError, match="channels must be >= 1"):
        parse_arch(arch)


@pytest.mark.parametrize("arch", [[], "", ["M"], ["M", "M"], ","])
def test_no_convolution_rejected(arch):
    with pytest.raises(vggnet.ConfigError, match="no convolution"):
        parse_arch(arch)


def test_lrn_first_rejected():
    with pytest.raises(vggnet.ConfigError, match="starts with LRN"):
        parse_arch(["LRN", 64, "M"])


def test_config_error_is_a_value_error():
    # Callers catching ValueError (argparse, generic code) still see it.
    assert issubclass(vggnet.ConfigError, ValueError)
    assert issubclass(vggnet.ConfigError, vggnet.VggnetError)
