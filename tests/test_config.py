import pytest

from dinokit.config import PRESET_DIR, ConfigError, TrainConfig, parse_overrides, parse_setting, presets


def test_defaults_are_the_recipe():
    cfg = TrainConfig()
    assert (cfg.arch, cfg.patch_size, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim) == ("vit_small", 16, 65536, 2048, 256)
    assert (cfg.global_crops_size, cfg.local_crops_size, cfg.local_crops_number) == (224, 96, 8)
    assert cfg.global_crops_scale == (0.4, 1.0) and cfg.local_crops_scale == (0.05, 0.4)
    assert (cfg.student_temp, cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs) == (0.1, 0.04, 0.07, 30)
    assert (cfg.momentum_teacher, cfg.momentum_teacher_final, cfg.center_momentum) == (0.996, 1.0, 0.9)
    assert (cfg.lr, cfg.min_lr, cfg.warmup_epochs, cfg.weight_decay, cfg.weight_decay_end) == (0.0005, 1e-6, 10, 0.04, 0.4)
    assert (cfg.clip_grad, cfg.freeze_last_layer, cfg.drop_path_rate, cfg.norm_last_layer) == (3.0, 1, 0.1, True)
    assert cfg.blur_prob == (1.0, 0.1, 0.5) and cfg.solarize_prob == (0.0, 0.2, 0.0)
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)


def test_presets_load_and_validate():
    assert {"laptop", "cifar", "paper"} <= set(presets())
    for name in presets():
        TrainConfig.build(name)
    assert TrainConfig.build("paper").batch_size == 1024
    assert TrainConfig.build("cifar").global_crops_size == 32


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("epochs: 5\nteacher_temp: 0.05\n")
    cfg = TrainConfig.build(path, parse_overrides(["epochs=300", "teacher_temp=0.07", "knn_k=[5,10]"]))
    assert cfg.epochs == 300 and cfg.teacher_temp == 0.07 and cfg.knn_k == (5, 10)
    cfg.to_yaml(tmp_path / "saved.yaml")
    assert TrainConfig.build(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("given, parts", [("true", "all"), ("false", "off"), ("loss", "loss"), ("all", "all")])
def test_compile_takes_the_parts_or_a_bool(given, parts):
    assert TrainConfig.build(None, parse_overrides([f"compile={given}"])).compile == parts


@pytest.mark.parametrize("changes, key", [
    ({"epoch": 3}, "epoch"),                              # unknown key, with a suggestion
    ({"compile": "backbone"}, "compile"),                 # not one of the choices
    ({"epochs": "many"}, "epochs"),                       # wrong type
    ({"momentum_teacher": 1.5}, "momentum_teacher"),      # outside [0, 1]
    ({"local_crops_size": 256}, "local_crops_size"),      # local larger than global
    ({"global_crops_size": 100}, "global_crops_size"),    # not a multiple of the patch size
    ({"global_crops_scale": [0.9, 0.2]}, "global_crops_scale"),
    ({"local_crops_scale": [0.05, 1.5]}, "^invalid config: local_crops_scale"),  # blamed global_crops_scale before
])
def test_bad_values_name_the_key(changes, key):
    with pytest.raises(ConfigError, match=key):
        TrainConfig.build(None, changes)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        TrainConfig.build(None, {"epoch": 3})


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(ConfigError, match="no such file and no such preset"):
        TrainConfig.build("does-not-exist.yaml")


def test_a_preset_name_means_the_preset_even_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar").mkdir()  # the user's data folder
    assert TrainConfig.build("cifar") == TrainConfig.build(str(PRESET_DIR / "cifar.yaml"))
    (tmp_path / "laptop").write_text("epochs: 3\n")
    assert TrainConfig.build("./laptop").epochs == 3  # a path names the file
    assert TrainConfig.build("laptop").epochs != 3


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])


@pytest.mark.parametrize("key, raw, value", [
    ("data", "2024", "2024"),                          # a text setting keeps the text: a folder named 2024
    ("data", "trip, 2023", "trip, 2023"),
    ("out", "no", "no"),
    ("data", "null", None),                            # clears an optional text setting
    ("global_crops_scale", "0.3,1.0", [0.3, 1.0]),     # a list setting: comma-separated
    ("knn_k", "20", [20]),                             # ... or one item
    ("knn_k", "[5, 10]", [5, 10]),
    ("epochs", "3", 3),
    ("lr", "1e-3", 1e-3),
])
def test_command_line_values_are_read_by_the_settings_type(key, raw, value):
    assert parse_setting(key, raw) == value
    assert parse_overrides([f"{key}={raw}"]) == {key: value}


def test_settings_from_the_command_line_validate():
    cfg = TrainConfig.build(None, parse_overrides(["data=2024", "global_crops_scale=0.3,1.0", "knn_k=20"]))
    assert cfg.data == "2024" and cfg.global_crops_scale == (0.3, 1.0) and cfg.knn_k == (20,)


@pytest.mark.parametrize("raw", ["inf", "nan", "-inf"])
def test_non_finite_numbers_are_refused(raw):
    with pytest.raises(ConfigError, match="lr.*finite"):
        TrainConfig.build(None, parse_overrides([f"lr={raw}"]))


def test_a_config_that_is_not_utf8_text_is_a_clear_error(tmp_path):
    (tmp_path / "notepad.yaml").write_text("epochs: 3\n", encoding="utf-16")
    with pytest.raises(ConfigError, match="notepad.yaml: not UTF-8 text"):
        TrainConfig.build(str(tmp_path / "notepad.yaml"))


def test_a_folder_as_config_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a YAML file$"):
        TrainConfig.build(tmp_path)
    TrainConfig().to_yaml(tmp_path / "config.yaml")  # a run folder: the error says how to resume or reuse it
    with pytest.raises(ConfigError, match=f"resume it with --out {tmp_path}, or start a new run from its settings "
                                          f"with --config {tmp_path / 'config.yaml'} --out NEW_FOLDER"):
        TrainConfig.build(tmp_path)


def test_every_setting_is_described():
    assert [k for k, f in TrainConfig.model_fields.items() if not f.description] == []
