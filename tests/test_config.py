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


def test_an_override_typo_names_the_override_and_the_closest_key():
    with pytest.raises(ConfigError) as err:
        load_config("synthetic", ["train.epoch=3"])
    assert str(err.value) == (
        "override train.epoch=3: train.epoch: unknown key (did you mean train.epochs?)"
    )
    with pytest.raises(ConfigError, match=r"^override trian\.epochs=3: trian: .*did you mean train\?"):
        load_config("synthetic", ["trian.epochs=3"])
    with pytest.raises(ConfigError, match=r"^override model\.pretrianed=x: .*model\.pretrained\?"):
        load_config("synthetic", ["model.pretrianed=x"])


def test_a_yaml_typo_names_the_file_and_pydantics_prefix_is_gone(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("train: {epoch: 3}\ndata: {labeled: 0.5}\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert str(err.value) == f"{cfg}: train.epoch: unknown key (did you mean train.epochs?)"
    with pytest.raises(ConfigError) as err:
        load_config("synthetic", ["data.labeled=1.5"])
    assert "Value error" not in str(err.value)
    assert str(err.value).endswith("data.labeled: invalid value 1.5: a labeled fraction must lie in (0, 1)")


def test_paper_configs_default_to_imagenet_weights():
    for name in ("pascal", "cityscapes", "coco"):
        assert load_config(name).model.pretrained == "imagenet"
    assert load_config("synthetic").model.pretrained == ""


def test_threads_setting():
    assert load_config("synthetic").threads == "auto"  # issue 26: the free cores at start
    assert load_config("synthetic", ["threads=3"]).threads == 3
    assert load_config("synthetic", ["threads=0"]).threads == 0
    with pytest.raises(ConfigError, match="threads"):
        load_config("synthetic", ["threads=-1"])
