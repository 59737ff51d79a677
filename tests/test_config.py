"""config.py: args.json -> --config FILE -> command line, typed from the defaults, strict about
unknown keys and abbreviations, environment variables for the SageMaker-style folders."""
import json
from pathlib import Path

import pytest

import config
from config import build_parser, default_config, load_spec, parse_config, read_config_file, script_keys

SPEC = load_spec()
ENV_VARS = sorted({e["env"] for e in SPEC.values() if "env" in e})


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """The defaults must not depend on the environment the tests happen to run in."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def write_json(path, values):
    path.write_text(json.dumps(values))
    return str(path)


def parse_error(capsys, script, argv):
    """Parse argv expecting argparse to exit with status 2; return what it printed."""
    with pytest.raises(SystemExit) as exc:
        parse_config(script, argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Defaults and types
@pytest.mark.parametrize("script", sorted(config.SCRIPT_GROUPS))
def test_no_arguments_give_the_args_json_defaults(script):
    cfg = parse_config(script, [])
    keys = script_keys(script, SPEC)
    assert keys, script
    assert cfg == {k: SPEC[k]["default"] for k in keys}
    assert cfg == default_config(script)


def test_types_come_from_the_defaults():
    cfg = parse_config("train", ["--epochs", "3", "--lr", "0.05", "--name", "trial", "--fold", "all",
                                 "--resize", "64", "48", "--center_crop", "0.8", "0.9",
                                 "--mean", "0.1", "0.2", "0.3", "--age_threshold", "58"])
    assert cfg["epochs"] == 3 and type(cfg["epochs"]) is int
    assert cfg["age_threshold"] == 58 and type(cfg["age_threshold"]) is int
    assert cfg["lr"] == 0.05 and type(cfg["lr"]) is float
    assert cfg["name"] == "trial" and cfg["fold"] == "all"
    assert cfg["resize"] == [64, 48] and all(type(v) is int for v in cfg["resize"])
    assert cfg["center_crop"] == [0.8, 0.9] and all(type(v) is float for v in cfg["center_crop"])
    assert cfg["mean"] == pytest.approx([0.1, 0.2, 0.3])
    # a float-valued default accepts an integer spelling and still yields a float
    assert type(parse_config("train", ["--dropout", "0"])["dropout"]) is float


def test_booleans_are_flag_pairs():
    assert SPEC["pretrained"]["default"] is True and SPEC["balanced_sampler"]["default"] is False
    cfg = parse_config("train", ["--no-pretrained", "--balanced_sampler", "--no-amp"])
    assert cfg["pretrained"] is False and cfg["balanced_sampler"] is True and cfg["amp"] is False
    assert parse_config("train", ["--no-pretrained", "--pretrained"])["pretrained"] is True


def test_empty_list_defaults_take_any_number_of_values():
    assert parse_config("train", ["--extra_data", "a", "b/c.csv", "d"])["extra_data"] == ["a", "b/c.csv", "d"]
    assert parse_config("train", ["--extra_data"])["extra_data"] == []
    assert parse_config("inference", ["--run", "runs/x"])["run"] == ["runs/x"]


@pytest.mark.parametrize("argv, flag", [
    (["--epochs", "1.5"], "--epochs"),
    (["--lr", "fast"], "--lr"),
    (["--resize", "64"], "--resize"),           # a list takes exactly as many values as its default
    (["--resize", "64", "48", "32"], None),     # the extra value is an unrecognized argument
    (["--pretrained", "yes"], None),
])
def test_badly_typed_values_are_errors(capsys, argv, flag):
    err = parse_error(capsys, "train", argv)
    assert "error" in err
    if flag:
        assert flag in err


# ---------------------------------------------------------------------------------------------
# Precedence: args.json < --config FILE < command line
def test_config_file_overrides_defaults_and_command_line_overrides_both(tmp_path):
    path = write_json(tmp_path / "my.json", {"lr": 0.5, "epochs": 9, "resize": [40, 30], "pretrained": False})
    from_file = parse_config("train", ["--config", path])
    assert (from_file["lr"], from_file["epochs"], from_file["resize"], from_file["pretrained"]) == (0.5, 9, [40, 30], False)
    assert from_file["batch_size"] == SPEC["batch_size"]["default"]  # untouched keys keep the default
    assert "config" not in from_file
    for argv in (["--config", path, "--lr", "0.1", "--pretrained"], ["--lr", "0.1", "--pretrained", "--config", path]):
        cfg = parse_config("train", argv)
        assert cfg["lr"] == 0.1 and cfg["pretrained"] is True, argv  # command line wins wherever it sits
        assert cfg["epochs"] == 9 and cfg["resize"] == [40, 30], argv


def test_config_files_given_twice_apply_in_order(tmp_path):
    recipe = write_json(tmp_path / "recipe.json", {"lr": 0.5, "epochs": 9})
    mine = write_json(tmp_path / "mine.json", {"epochs": 3})
    cfg, given = parse_config("train", ["--config", recipe, "--config", mine], with_given=True)
    assert (cfg["lr"], cfg["epochs"]) == (0.5, 3) and {"lr", "epochs"} <= given


def test_unknown_command_line_flag_names_the_closest_key(capsys):
    err = parse_error(capsys, "train", ["--lrr", "0.1"])
    assert "unrecognized arguments" in err and "--lrr" in err
    assert "did you mean --lr?" in err
    err = parse_error(capsys, "train", ["--epoch=3"])
    assert "did you mean --epochs?" in err
    assert "did you mean --epochs?" in parse_error(capsys, "train", ["--ep", "1"])  # the key it begins, not --report
    assert "did you mean --age_sigma, --age_smoothing?" in parse_error(capsys, "train", ["--age_s", "1"])


def test_flags_of_another_script_are_unknown(capsys):
    err = parse_error(capsys, "inference", ["--lr", "0.1"])
    assert "unrecognized arguments" in err and "--lr" in err
    parse_error(capsys, "score", ["--members", "a"])


def test_unknown_key_in_config_file_names_key_and_file(tmp_path):
    path = write_json(tmp_path / "typo.json", {"lr": 0.1, "lrr": 0.2})
    with pytest.raises(SystemExit) as exc:
        parse_config("train", ["--config", path])
    message = str(exc.value.code)
    assert "'lrr'" in message and path in message and "--lr" in message



@pytest.mark.parametrize("key, value", [("resize", [64]), ("resize", [64, 48, 32]), ("mean", [0.5, 0.5]),
                                        ("epochs", True), ("lr", False), ("resize", [64, True])])
def test_a_config_file_value_of_the_wrong_length_or_a_boolean_for_a_number_is_refused(tmp_path, key, value):
    path = write_json(tmp_path / "bad.json", {key: value})
    with pytest.raises(SystemExit) as exc:
        parse_config("train", ["--config", path])
    message = str(exc.value.code)
    assert f"'{key}' should look like {json.dumps(SPEC[key]['default'])}" in message and path in message


def test_a_config_file_takes_whole_numbers_for_floats_and_any_length_for_empty_list_defaults(tmp_path):
    path = write_json(tmp_path / "good.json", {"resize": [64, 48], "lr": 1, "epochs": 3, "drop_ages": [58, 59, 60],
                                              "amp": False})
    cfg = parse_config("train", ["--config", path])
    assert (cfg["resize"], cfg["lr"], cfg["epochs"], cfg["drop_ages"], cfg["amp"]) == ([64, 48], 1, 3, [58, 59, 60],
                                                                                      False)


def test_one_config_file_serves_several_scripts(tmp_path):
    """A recipe file may hold training keys and inference keys; each script takes its own."""
    path = write_json(tmp_path / "recipe.json", {"lr": 0.01, "tta": "flip_crops"})
    assert read_config_file(path, script_keys("train", SPEC)) == {"lr": 0.01}
    assert parse_config("inference", ["--config", path])["tta"] == "flip_crops"
    with pytest.raises(SystemExit, match="'tta'"):  # values of other scripts' keys are still checked
        read_config_file(write_json(tmp_path / "bad.json", {"tta": "sideways"}), script_keys("train", SPEC))


def test_a_key_given_twice_in_a_config_file_is_an_error(tmp_path):
    path = tmp_path / "twice.json"
    path.write_text('{"epochs": 1, "lr": 0.1, "epochs": 3}')
    with pytest.raises(SystemExit, match=r"twice.json: key\(s\) \['epochs'\] given twice"):
        parse_config("train", ["--config", str(path)])


def test_a_number_for_a_text_key_reads_as_on_the_command_line(tmp_path):
    """--fold 0 on the command line is the text '0'; "fold": 0 in a file is the same."""
    path = write_json(tmp_path / "fold.json", {"fold": 0})
    assert parse_config("train", ["--config", path])["fold"] == parse_config("train", ["--fold", "0"])["fold"] == "0"


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_unreadable_config_file_names_the_file(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(SystemExit) as exc:
        parse_config("train", ["--config", str(path)])
    assert str(path) in str(exc.value.code)
    with pytest.raises(SystemExit, match="missing.json"):
        parse_config("train", ["--config", str(tmp_path / "missing.json")])


@pytest.mark.parametrize("argv, meant", [(["--lr_decay", "3"], "lr_decay_step"), (["--epoch", "3"], "epochs"),
                                         (["--pretrain"], "pretrained")])
def test_abbreviations_are_not_accepted(capsys, argv, meant):
    err = parse_error(capsys, "train", argv)
    assert "unrecognized arguments" in err and f"--{meant}" in err
    # and the real key keeps its default
    assert parse_config("train", [])[meant] == SPEC[meant]["default"]


# ---------------------------------------------------------------------------------------------
# Environment variables
def test_environment_sets_defaults_and_command_line_wins(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SM_CHANNEL_TRAIN", "/srv/competition/train")
    monkeypatch.setenv("SM_MODEL_DIR", "/srv/models")
    cfg = parse_config("train", [])
    assert cfg["data_dir"] == "/srv/competition/train" and cfg["model_dir"] == "/srv/models"
    assert capsys.readouterr().err.splitlines() == [  # said, so an error about the folder can be traced to it
        "--data_dir /srv/competition/train from the environment variable SM_CHANNEL_TRAIN",
        "--model_dir /srv/models from the environment variable SM_MODEL_DIR"]
    assert default_config("train")["data_dir"] == "/srv/competition/train"
    cfg = parse_config("train", ["--data_dir", "here/train", "--model_dir", "here/runs"])
    assert cfg["data_dir"] == "here/train" and cfg["model_dir"] == "here/runs"
    assert capsys.readouterr().err == ""
    parse_config("train", ["--resume", "runs/a"])  # a resumed run keeps its saved folders: nothing to name
    assert capsys.readouterr().err == ""
    path = write_json(tmp_path / "c.json", {"model_dir": "file/runs"})
    cfg = parse_config("train", ["--config", path])
    assert cfg["model_dir"] == "file/runs" and cfg["data_dir"] == "/srv/competition/train"


def test_output_environment_variable_is_inference_only(monkeypatch):
    """SM_OUTPUT_DATA_DIR is where the starter code's inference writes; a training run must not
    be pinned to it (every run would go to one folder)."""
    monkeypatch.setenv("SM_OUTPUT_DATA_DIR", "/srv/output")
    assert parse_config("inference", [])["output_dir"] == "/srv/output"
    assert parse_config("train", ["--name", "b0"])["output_dir"] == SPEC["output_dir"]["default"]


def test_empty_environment_variable_keeps_the_default(monkeypatch):
    monkeypatch.setenv("SM_CHANNEL_TRAIN", "")
    assert parse_config("train", [])["data_dir"] == SPEC["data_dir"]["default"]


# ---------------------------------------------------------------------------------------------
# args.json itself and the scripts' parsers
def test_every_key_has_default_group_and_help():
    known_groups = {g for groups in config.SCRIPT_GROUPS.values() for g in groups}
    for key, entry in SPEC.items():
        assert {"default", "group", "help"} <= set(entry), key
        assert entry["help"].strip(), key
        groups = [entry["group"]] if isinstance(entry["group"], str) else entry["group"]
        assert groups and set(groups) <= known_groups, (key, groups)
        assert "%" not in entry["help"], key  # argparse would try to format it
        if "env" in entry:
            assert isinstance(entry["default"], str), key  # environment values are strings
            assert set(entry.get("env_scripts", [])) <= set(config.SCRIPT_GROUPS), key
        if isinstance(entry["default"], list) and entry["default"]:
            assert len({type(v) for v in entry["default"]}) == 1, key
    used = {k for script in config.SCRIPT_GROUPS for k in script_keys(script, SPEC)}
    assert used == set(SPEC)  # every key is read by some script


@pytest.mark.parametrize("script", sorted(config.SCRIPT_GROUPS))
def test_every_script_parser_builds(script):
    assert set(config.SCRIPT_GROUPS) == {"train", "inference", "ensemble", "score", "detect", "masks"}
    parser = build_parser(script, description=f"{script} test")
    text = parser.format_help()
    for key in script_keys(script, SPEC):
        assert f"--{key}" in text
    assert "--config" in text


def test_documented_command_lines_parse():
    """The examples in the scripts' docstrings and the Makefile."""
    cfg = parse_config("ensemble", ["--members", "runs/a", "runs/b", "--member_weights", "2", "1",
                                    "--method", "soft", "--submission", "s.csv"])
    assert cfg["members"] == ["runs/a", "runs/b"] and cfg["method"] == "soft" and cfg["submission"] == "s.csv"
    cfg = parse_config("inference", ["--run", "runs/kfold", "--tta", "flip_crops"])
    assert cfg["run"] == ["runs/kfold"] and cfg["tta"] == "flip_crops"
    cfg = parse_config("score", ["--answers", "a.csv", "--submission", "s.csv"])
    assert cfg == {"submission": "s.csv", "answers": "a.csv"}
    cfg = parse_config("train", ["--output_dir", "runs/demo/multi", "--overwrite", "--head", "multi", "--epochs", "6"])
    assert cfg["output_dir"] == "runs/demo/multi" and cfg["overwrite"] is True and cfg["epochs"] == 6


def test_readme_documents_every_key():
    """The README's table of args.json keys stays complete, and says what args.json says."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [key for key in SPEC if f"| `{key}` |" not in readme]
    assert not missing, f"README.md lacks rows for {missing}"
    rows = {line.split("`")[1]: line for line in readme.splitlines() if line.startswith("| `")}
    stale = [key for key in SPEC if not rows[key].endswith(f"| {SPEC[key]['help']} |")]
    assert not stale, f"README.md rows whose help differs from args.json: {stale}"
