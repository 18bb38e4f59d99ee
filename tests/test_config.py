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


@pytest.mark.parametrize("value", [-0.5, 1.5])
def test_alpha_final_outside_unit_interval_is_refused(value):
    with pytest.raises(ConfigError, match=r"'alpha-final' = .*\(0, 1\]"):
        parse_config({"alpha-final": value})


@pytest.mark.parametrize("raw, needle", [({"audit-probe": -1}, ">= 0"),
                                         ({"audit-probe": 24, "strategy": "local"}, "unless strategy = privacygan")])
def test_the_audit_probe_is_privacygan_only_and_not_negative(raw, needle):
    with pytest.raises(ConfigError, match=f"'audit-probe' = .*{needle}"):
        parse_config(raw)
    assert parse_config({"audit-probe": 24}).audit_probe == 24


@pytest.mark.parametrize("raw, needle", [
    ({"server-negatives": -1}, ">= 0"),
    ({"server-negatives": 8, "strategy": "local"}, "unless strategy = privacygan"),
    ({"server-negatives": 8, "server-data": "none", "teacher-path": "t.pt"}, "server-data = 'none'"),
    ({"server-negatives": 8, "loss": "wgan-gp"}, "bce, hinge"),
])
def test_server_negatives_bad_values_stop_at_start_naming_the_key(raw, needle):
    with pytest.raises(ConfigError, match=f"'server-negatives' = .*{needle}"):
        parse_config(raw)
    assert parse_config({"server-negatives": 16}).server_negatives == 16
    # under DP the negatives are a public term of D_i's step (models.dp), so the pair is accepted
    assert parse_config({"server-negatives": 16, "dp": True, "dp-noise-multiplier": 1.0}).dp


def test_a_schedule_below_one_needs_a_teacher():
    with pytest.raises(ConfigError, match="'teacher-steps' = 0"):
        parse_config({"alpha": 1.0, "alpha-final": 0.5, "teacher-steps": 0})


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


def test_imagefolder_path_is_checked_at_start_naming_key_and_path(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(ConfigError, match=r"run config 'dataset' = .*no-such-folder.*: no such folder") as err:
        parse_config({"dataset": f"imagefolder:{missing}"})
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not images")
    with pytest.raises(ConfigError, match=rf"'dataset' = .*{a_file}: it is a file, not a folder"):
        parse_config({"dataset": f"imagefolder:{a_file}"})
    # a folder, or a zip of a folder-per-class tree, is accepted
    (tmp_path / "faces" / "0").mkdir(parents=True)
    assert parse_config({"dataset": f"imagefolder:{tmp_path / 'faces'}"}).dataset.endswith("faces")
    import zipfile
    with zipfile.ZipFile(tmp_path / "faces.zip", "w") as zf:
        zf.writestr("0/a.png", b"")
    assert parse_config({"dataset": f"imagefolder:{tmp_path / 'faces.zip'}"}).dataset.endswith("faces.zip")
    # a process that does not read the path (a deployed ClientApp) can skip the check
    assert parse_config({"dataset": f"imagefolder:{missing}"}, check_paths=False).dataset.endswith("no-such-folder")


def test_fedgan_run_refuses_a_missing_imagefolder_before_flower_starts(tmp_path, capsys):
    from app.launch import check_run_config

    problem = check_run_config(f"dataset='imagefolder:{tmp_path / 'gone'}'")
    assert problem is not None and "'dataset'" in problem and str(tmp_path / "gone") in problem
    # against a remote SuperLink the path is the server's: not checked here
    assert check_run_config(f"dataset='imagefolder:{tmp_path / 'gone'}'", check_paths=False) is None
