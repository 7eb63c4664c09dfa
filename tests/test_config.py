import pytest

from ciscr.config import builtin_configs, load_config
from ciscr.errors import ConfigError


def test_packaged_configs_all_validate():
    names = builtin_configs()
    assert {"synthetic", "camvid", "pascal", "cityscapes", "coco"} <= set(names)
    for name in names:
        load_config(name)


def test_overrides_are_typed():
    cfg = load_config("synthetic", ["train.epochs=3", "data.labeled=0.25", "model.pretrained="])
    assert cfg.train.epochs == 3 and cfg.data.labeled == 0.25 and cfg.model.pretrained == ""
    cfg = load_config("synthetic", ["data.labeled=20", "train.scale_range=[0.5,1.5]"])
    assert cfg.data.labeled == 20 and cfg.train.scale_range == (0.5, 1.5)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.epochz=3", "train.epochz: unknown key"),
        ("train.epochs=abc", "train.epochs: invalid value 'abc'"),
        ("train.epochs=0", "train.epochs"),
        ("data.format=kitti", "data.format: invalid value 'kitti'"),
        ("data.labeled=1.5", "data.labeled"),
        ("device=tpu", "device"),
        ("nokey", "must look like key=value"),
        ("model.backbone.x=1", "'backbone' is not a section"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config("synthetic", [override])
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_method_presets_and_explicit_keys():
    st = load_config("synthetic", ["method.name=st"]).method
    assert (st.retrain, st.rectify, st.stage1_cisc_loss) == ("one", "none", False)
    bank = load_config("synthetic", ["method.name=ciscr_bank"]).method
    assert (bank.rectify, bank.rectify_classes) == ("bank", "all")
    mixed = load_config("synthetic", ["method.name=ciscr", "method.selection=stpp"]).method
    assert mixed.selection == "stpp" and mixed.rectify == "query"


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="packaged: "):
        load_config(tmp_path / "missing.yaml")
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("seed: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError):  # safe_load never executes code
        load_config(unsafe)


def test_split_names_are_not_yaml_integers():
    assert load_config("pascal", ["data.split=1_8"]).data.split == "1_8"
    assert load_config("cityscapes").data.split == "1_30"
