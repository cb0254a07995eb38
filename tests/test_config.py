from pathlib import Path

import pytest

from components.config import available_recipes, load_config
from components.errors import ConfigError


def test_recipes_load_with_their_documented_settings():
    assert {"paper", "strong", "demo"} <= set(available_recipes())
    paper = load_config("paper")
    assert paper.augment.resize == (768, 1024) and paper.augment.crop is None
    assert (paper.optimizer.name, paper.optimizer.lr, paper.optimizer.schedule) == ("adam", 1e-4, "constant")
    assert (paper.train.global_batch_size, paper.train.epochs, paper.train.aux_weight) == (24, 20, 0.0)
    strong = load_config("strong")
    assert (strong.optimizer.name, strong.optimizer.schedule, strong.train.aux_weight) == ("sgd", "poly", 0.4)
    assert strong.augment.scale_range == (0.5, 2.0)
    assert load_config("demo").data.source == "synthetic"


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config("demo", ["train.epochs=3", "augment.crop=[64, 128]", "model.backbone=resnet101"])
    assert cfg.train.epochs == 3 and cfg.augment.crop == (64, 128) and cfg.model.backbone == "resnet101"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.epochz=3", "train.epochz"),
        ("train.epochs=many", "train.epochs"),
        ("model.backbone=vgg16", "model.backbone"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("augment.crop=[0, 10]", "augment.crop"),
        ("data.synthetic.width=100", "data.synthetic"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("demo", [override])


def test_unknown_recipe_and_malformed_override_are_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match=r"section\.field=value"):
        load_config("demo", ["train.epochs"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match="train"):
        load_config(bad)


def test_flat_view_and_yaml_round_trip(tmp_path: Path):
    cfg = load_config("demo")
    assert cfg.flat()["optimizer.lr"] == cfg.optimizer.lr
    saved = tmp_path / "saved.yaml"
    saved.write_text(cfg.to_yaml())
    assert load_config(saved) == cfg
