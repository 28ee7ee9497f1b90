"""``dinokit train``'s command line: settings as options or KEY=VALUE, and clear errors."""

import pytest
from click.testing import CliRunner

from dinokit.cli import main
from dinokit.cli.train import build_train_config
from dinokit.config import ConfigError


def test_options_and_key_value_read_a_setting_the_same_way(tmp_path):
    as_options = build_train_config("laptop", {"data": "2024", "global_crops_scale": "0.3,1.0", "knn_k": "20"}, ())
    as_pairs = build_train_config("laptop", {}, ("data=2024", "global_crops_scale=0.3,1.0", "knn_k=20"))
    assert as_options == as_pairs
    assert as_options.data == "2024" and as_options.global_crops_scale == (0.3, 1.0) and as_options.knn_k == (20,)


def test_a_setting_given_twice_with_two_values_is_refused():
    with pytest.raises(ConfigError, match="epochs given twice, as --epochs 1 and epochs=2"):
        build_train_config("laptop", {"epochs": "1"}, ("epochs=2",))
    assert build_train_config("laptop", {"epochs": "2"}, ("epochs=2",)).epochs == 2


def test_help_describes_every_setting_with_defaults_as_typed():
    text = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    assert "[default: 0.4,1]" in text  # global_crops_scale, in the form the option takes
    assert "The defaults below are the DINO recipe's" in text


@pytest.mark.parametrize("args, message", [
    (["--device", "gpu"], "device 'gpu': expected auto, cpu, cuda, cuda:N or mps"),
    (["lr=inf"], "lr: Input should be a finite number"),
])
def test_bad_settings_are_one_line_errors(tmp_path, args, message):
    result = CliRunner().invoke(main, ["train", "--config", "laptop", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_a_run_folder_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(main, ["train", "--config", "laptop", "--out", str(tmp_path / "afile"), "device=cpu"])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output


def test_the_closing_knn_table_has_a_column_per_k(capsys):
    from dinokit.cli.train import _print_knn_summary

    _print_knn_summary({"untrained": {10: {"top1": 40.25, "top5": 90.0}, 48: {"top1": 31.0, "top5": 88.0}},
                        "final": {10: {"top1": 80.0, "top5": 99.0}, 48: {"top1": 71.5, "top5": 98.0}}})
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].split() == ["k=10", "k=48"]
    assert lines[-2].split() == ["untrained", "40.2", "31.0"] and lines[-1].split() == ["final", "80.0", "71.5"]


def test_a_second_ctrl_c_ends_with_the_code_of_ctrl_c(tmp_path, monkeypatch):
    from dinokit.train import loop

    def second_ctrl_c(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", second_ctrl_c)
    result = CliRunner().invoke(main, ["train", "--config", "laptop", "--out", str(tmp_path / "run")])
    assert result.exit_code == 130 and "Aborted" not in result.output
