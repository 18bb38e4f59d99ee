"""Run config: defaults in pyproject.toml match the dataclass; bad values stop the run naming the key."""

import tomllib
from pathlib import Path

import pytest

from app.config import Config, ConfigError, parse_config

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_defaults_are_complete_and_equal_to_the_dataclass():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == Config().to_run_config()
    assert parse_config(table) == Config()


def test_overrides_are_typed():
    cfg = parse_config({"alpha": "0.8", "num-rounds": 3.0, "fakes-dtype": "uint8"})
    assert cfg.alpha == 0.8 and cfg.num_rounds == 3 and cfg.fakes_dtype == "uint8"


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.01, 2])
def test_alpha_outside_unit_interval_is_refused(alpha):
    with pytest.raises(ConfigError, match=r"'alpha' = .*\(0, 1\]"):
        parse_config({"alpha": alpha})


def test_alpha_one_is_allowed_without_a_teacher():
    assert parse_config({"alpha": 1.0, "teacher-steps": 0}).alpha == 1.0


@pytest.mark.parametrize("key,value,needle", [
    ("strategy", "bogus", "'strategy' = 'bogus'.*privacygan"),
    ("dataset", "nope", "'dataset' = 'nope'.*digits"),
    ("fakes-dtype", "int4", "'fakes-dtype' = 'int4'.*uint8"),
    ("loss", "lsgan", "'loss' = 'lsgan'.*wgan-gp"),
    ("num-rounds", 0, "'num-rounds' = 0.*>= 1"),
    ("image-size", 20, "'image-size' = 20.*16"),
    ("num-rounds", "many", "'num-rounds' = 'many'.*int"),
])
def test_invalid_values_name_key_value_and_allowed(key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_config({key: value})


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="unknown run config key 'aplha'.*'alpha'"):
        parse_config({"aplha": 0.5})


def test_uint8_fakes_refused_for_2d_data():
    with pytest.raises(ConfigError, match="fakes-dtype"):
        parse_config({"dataset": "ring", "fakes-dtype": "uint8"})
