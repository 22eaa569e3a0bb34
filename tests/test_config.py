"""kerasfrac.config: defaults, YAML overlay, overrides, errors naming the key, round trip."""

from pathlib import Path

import pytest
import yaml

from kerasfrac import config as C
from kerasfrac.config import Config, ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_report_recipe():
    cfg = load_config()
    assert cfg.dataset == "fracatlas"
    assert (cfg.train.optimizer, cfg.train.learning_rate, cfg.train.weight_decay) == (
        "sgd",
        1e-4,
        0.2,
    )
    assert (cfg.train.batch_size, cfg.train.epochs) == (16, 5)
    assert (cfg.data.image_size, cfg.data.grayscale, cfg.data.oversample) == (512, True, True)
    assert (cfg.data.flips, cfg.data.resize, cfg.data.cache) == ("none", "stretch", "memory")
    assert (cfg.model.name, cfg.model.weights) == ("paper_cnn", "none")
    assert cfg.train.steps_per_epoch is None


def test_yaml_overlays_only_what_it_names(tmp_path):
    path = write(tmp_path, "dataset: synthetic\ndata:\n  image_size: 224\ntrain:\n  epochs: 2\n")
    cfg = load_config(path)
    assert (cfg.dataset, cfg.data.image_size, cfg.train.epochs) == ("synthetic", 224, 2)
    assert cfg.data.grayscale is True and cfg.train.batch_size == 16  # untouched defaults


def test_empty_yaml_is_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n")) == Config()


def test_overrides_win_over_yaml_and_parse_types(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 2\n  learning_rate: 0.01\n")
    cfg = load_config(
        path,
        [
            "train.epochs=7",
            "train.learning_rate=1e-3",  # YAML 1.1 reads this as a string: accepted for floats
            "data.oversample=false",
            "train.steps_per_epoch=null",
            "model.name=vgg16",
            "train.epochs=9",  # later overrides win
        ],
    )
    assert cfg.train.epochs == 9
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.data.oversample is False
    assert cfg.train.steps_per_epoch is None
    assert cfg.model.name == "vgg16"


def test_int_is_accepted_for_float():
    cfg = load_config(None, ["train.learning_rate=1"])
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)


@pytest.mark.parametrize(
    ("source", "key", "allowed"),
    [
        ("train:\n  lr: 0.1\n", "train.lr", "learning_rate"),
        ("datset: synthetic\n", "datset", "dataset"),
        ("data:\n  imagesize: 64\n", "data.imagesize", "image_size"),
    ],
)
def test_unknown_key_names_key_and_allowed(tmp_path, source, key, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, source))
    msg = str(err.value)
    assert repr(key) in msg and allowed in msg and "allowed keys" in msg


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"'train\.bach_size'.*batch_size"):
        load_config(None, ["train.bach_size=8"])


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("data.image_size=abc", "data.image_size", "int"),
        ("data.image_size=1.5", "data.image_size", "int"),
        ("data.grayscale=3", "data.grayscale", "bool"),
        ("train.batch_size=true", "train.batch_size", "int"),
        ("train.learning_rate=fast", "train.learning_rate", "float"),
        ("data=5", "data", "mapping"),
    ],
)
def test_wrong_type_names_key_type_and_value(override, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert repr(key) in msg and expected in msg
    assert override.split("=", 1)[1].lower() in msg.lower()  # the offending value


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.image_size=0", "data.image_size"),
        ("data.image_size=-3", "data.image_size"),
        ("train.batch_size=0", "train.batch_size"),
        ("data.flips=sideways", "data.flips"),
        ("data.resize=crop", "data.resize"),
        ("dataset=mnist", "dataset"),
        ("model.name=resnet", "model.name"),
        ("train.precision=float8", "train.precision"),
        ("train.steps_per_epoch=0", "train.steps_per_epoch"),
        ("train.momentum=1.5", "train.momentum"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=repr(key).replace(".", r"\.")):
        load_config(None, [override])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_env_vars_and_home_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("KF_TEST_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(tmp_path, "data:\n  dir: $KF_TEST_DATA/fracatlas\n  cache: ~/cache\n")
    cfg = load_config(path, ["run_dir=${KF_TEST_DATA}/runs/x"])
    assert cfg.data.dir == str(tmp_path / "data" / "fracatlas")
    assert cfg.data.cache == str(tmp_path / "home" / "cache")
    assert cfg.run_dir == str(tmp_path / "data" / "runs" / "x")


def test_unset_env_var_is_an_error_naming_it(monkeypatch):
    monkeypatch.delenv("KF_SURELY_UNSET", raising=False)
    with pytest.raises(ConfigError, match=r"KF_SURELY_UNSET.*--set data\.dir="):
        load_config(None, ["data.dir=$KF_SURELY_UNSET/x"])


def test_save_load_round_trip(tmp_path):
    cfg = load_config(None, ["dataset=synthetic", "data.image_size=64", "train.seed=3"])
    saved = cfg.save(tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(saved.read_text())["data"]["image_size"] == 64
    assert load_config(saved) == cfg
    assert C.from_dict(cfg.to_dict()) == cfg


def test_allowed_keys_lists_dotted_leaves():
    keys = C.allowed_keys()
    for key in ("dataset", "run_dir", "data.dir", "data.flips", "model.name", "train.seed"):
        assert key in keys


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path, monkeypatch, tmp_path):
    """Every shipped config loads, and holds exactly the values its YAML gives (paths after
    expanding $KERASFRAC_DATA), the rest the defaults."""
    monkeypatch.setenv("KERASFRAC_DATA", str(tmp_path))
    cfg = load_config(path).to_dict()
    written = yaml.safe_load(path.read_text()) or {}
    defaults = Config().to_dict()
    for section, values in written.items():
        if not isinstance(values, dict):
            assert cfg[section] == values, section
            continue
        for key, value in values.items():
            got = cfg[section][key]
            if isinstance(value, str) and "$KERASFRAC_DATA" in value:
                value = value.replace("$KERASFRAC_DATA", str(tmp_path))
            assert got == (list(value) if isinstance(got, list) else value), (section, key)
        for key in set(defaults[section]) - set(values):
            assert cfg[section][key] == defaults[section][key], (section, key)


def test_the_six_experiments_exist():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    for dataset in ("fracatlas", "tibia"):
        for variant in ("orig", "aug", "small"):
            assert f"{dataset}_{variant}.yaml" in names
    assert "demo.yaml" in names


# The report's six experiments: dataset x pipeline (original, augmented = flip-expanded,
# downsized = 224 px); everything else is the report's recipe.
SIX = {
    "fracatlas_orig": ("fracatlas", "fracatlas", 512, "none"),
    "fracatlas_aug": ("fracatlas", "fracatlas", 512, "expand"),
    "fracatlas_small": ("fracatlas", "fracatlas", 224, "none"),
    "tibia_orig": ("tibia-fibula", "tibia-fibula", 512, "none"),
    "tibia_aug": ("tibia-fibula", "tibia-fibula", 512, "expand"),
    "tibia_small": ("tibia-fibula", "tibia-fibula", 224, "none"),
}


@pytest.mark.parametrize("name", sorted(SIX))
def test_each_report_config_holds_the_reports_settings(name, monkeypatch, tmp_path):
    monkeypatch.setenv("KERASFRAC_DATA", str(tmp_path))
    cfg = load_config(CONFIGS / f"{name}.yaml")
    dataset, folder, size, flips = SIX[name]
    assert cfg.dataset == dataset
    assert Path(cfg.data.dir) == tmp_path / folder
    assert cfg.run_dir.rstrip("/").endswith(f"runs/{name}")
    assert (cfg.data.image_size, cfg.data.flips) == (size, flips)
    assert (cfg.data.grayscale, cfg.data.oversample, cfg.data.resize) == (True, True, "stretch")
    t = cfg.train
    assert (t.optimizer, t.learning_rate, t.weight_decay) == ("sgd", 1e-4, 0.2)
    assert (t.batch_size, t.epochs, t.steps_per_epoch) == (16, 5, None)
    assert (cfg.model.name, cfg.model.weights) == ("paper_cnn", "none")


def test_a_run_config_from_before_the_model_defaults_still_loads(tmp_path):
    """Runs saved before model.width/blocks_per_stage/box_stride had defaults stored null."""
    path = tmp_path / "config.yaml"
    path.write_text(
        "model:\n  name: resnet_small\n  width: null\n  blocks_per_stage: null\n"
        "  box_stride: null\n"
    )
    cfg = load_config(path)
    assert (cfg.model.width, cfg.model.blocks_per_stage, cfg.model.box_stride) == (32, 2, 32)
    with pytest.raises(ConfigError, match="'model.drop_path' expects float"):
        load_config(overrides=["model.drop_path=null"])  # only those three keys
