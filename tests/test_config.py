import dataclasses
import enum
import os
from typing import Literal, Optional, Tuple

import pytest

from torchrec_genrec.config import ConfigError, load_config, to_dict
from torchrec_genrec.train.retrieval import RetrievalRecipeConfig as RecipeConfig


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    ks: Tuple[int, ...] = (10, 50)
    kind: Literal["a", "b"] = "a"
    color: Color = Color.RED
    name: Optional[str] = None
    flag: bool = False


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    seed: int = 0


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_file_then_overrides_in_order(tmp_path):
    path = write(tmp_path, "seed = 3\n[inner]\nlr = 0.5\nsteps = 1e3\nks = [1, 2]\ncolor = 'blue'\n")
    cfg = load_config(Outer, path, ["inner.steps=7", "inner.kind=b", "inner.name=x", "inner.flag=true"])
    assert cfg.seed == 3
    assert cfg.inner == Inner(lr=0.5, steps=7, ks=(1, 2), kind="b", color=Color.BLUE, name="x", flag=True)
    assert to_dict(cfg)["inner"]["color"] == "blue"


def test_typo_names_the_closest_key(tmp_path):
    path = write(tmp_path, "[inner]\nstpes = 3\n")
    with pytest.raises(ConfigError, match=r"c.toml.*'inner.stpes'.*did you mean 'inner.steps'"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match="did you mean 'seed'"):
        load_config(Outer, None, ["sed=1"])


@pytest.mark.parametrize("override, message", [
    ("inner.steps=1.5", "must be an integer"),
    ("inner.lr=fast", "must be a number"),
    ("inner.kind=c", r"not one of \['a', 'b'\]"),
    ("inner.color=green", "not one of"),
    ("inner.flag=1", "true or false"),
    ("inner=3", "is a section"),
    ("justakey", "must look like"),
])
def test_bad_values_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(Outer, write(tmp_path, "[inner\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, str(tmp_path / "nope.toml"))


def test_shipped_recipes_load():
    import glob

    from torchrec_genrec.train.lum import LUMRecipeConfig
    from torchrec_genrec.train.ranking import RankingRecipeConfig

    paths = glob.glob("apps/configs/*.toml")
    assert paths
    for path in paths:
        # Ranking recipes (genrec rank) and LUM pre-training (genrec lum) have their own config trees.
        name = os.path.basename(path)
        if name.startswith("lum_"):
            load_config(LUMRecipeConfig, path).validate()
        else:
            load_config(RankingRecipeConfig if "ranking" in name else RecipeConfig, path)
