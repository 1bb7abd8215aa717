"""Configs validate themselves: every bad key in one error, counts given as 1e5, certifiers built once and
recorded as given, the JSON schema one command away and the README's reference true to it."""

import json
import re
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.certifiers import Cohen, TopK
from pipeline.config import ConfigError, NightlySuite, RunConfig, load_config, schema, validate
from pipeline.results import manifest_matches
from pipeline.sweeps import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jobs" / "configs" / "demo.yaml"
RUN_CONFIGS = sorted(path.name for path in (ROOT / "jobs" / "configs").glob("*.yaml")
                     if "certifiers" in (yaml.safe_load(path.read_text()) or {}))


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_every_shipped_run_config_validates(name):
    config = load_config(ROOT / "jobs" / "configs" / name)
    assert config.certifiers


def test_three_mistakes_in_three_sections_are_named_in_one_error():
    with pytest.raises(ConfigError) as caught:
        load_config(DEMO, ["certifiers.1.k=0", "dataset.skip=-2", "actors.cpus=many"])
    message = str(caught.value)
    assert message.startswith("3 problems:")
    assert re.search(r"certifiers\[1\]: topk: k must be an integer >= 1, got 0", message)
    assert "dataset.skip must be an integer >= 1, got -2" in message
    assert "actors.cpus must be a number, got 'many'" in message


def test_unknown_keys_of_every_section_are_listed_with_the_known_ones():
    with pytest.raises(ConfigError) as caught:
        validate({"certifiers": [{"name": "cohen", "sigma": 0.25, "sigmaa": 1}], "colour": 1,
                  "model": {"nmae": "resnet18"}})
    message = str(caught.value)
    assert "certifiers[0]: unknown setting(s) ['sigmaa'] for 'cohen'" in message
    assert "unknown config key(s) ['colour']; known: ['actors', 'batch_size', 'certifiers'" in message
    assert ("model: unknown key(s) ['nmae']; known: ['denoiser', 'input_size', 'mean', 'name', 'num_classes', "
            "'std', 'weights']") in message


@pytest.mark.parametrize("key", ["dataset.max", "dataset.skip", "dataset.max_pixels", "images_per_batch",
                                 "batch_size", "certifiers.0.n"])
def test_a_count_given_as_1e5_is_taken_as_100000(key):
    config = load_config(DEMO, [f"{key}=1e5"])
    section, _, name = key.rpartition(".")
    owner = config.certifiers[0] if section == "certifiers.0" else getattr(config, section) if section else config
    value = getattr(owner, name)
    assert value == 100_000 and type(value) is int
    where = re.escape(section.replace(".0", "[0]"))
    with pytest.raises(ConfigError, match=rf"^{where}.*\b{name} must be .*an integer"):
        load_config(DEMO, [f"{key}=2.5"])


def test_certifiers_are_built_once_and_the_manifest_records_them_as_given():
    given = [{"name": "cohen", "sigma": 0.25, "n": 1e5}, {"name": "topk", "sigma": 0.5, "k": 2, "n": 200}]
    config = validate({"certifiers": given})
    assert isinstance(config.certifiers, tuple) and config.certifiers == (  # 8-bit images: gaussian auto is sound
        Cohen(sigma=0.25, n=100_000, gaussian="sound"), TopK(sigma=0.5, k=2, n=200, gaussian="sound"))
    assert validate({"certifiers": [{**given[0], "gaussian": "real"}]}).certifiers[0].noise_kind == "gaussian"
    assert config.to_dict()["certifiers"] == given
    assert validate(config.to_dict()) == config  # the dict reads back
    earlier = {"run_id": "demo", "config": json.loads(json.dumps(config.to_dict()))}
    manifest_matches(earlier, {"run_id": "demo", "config": config.to_dict()})
    with pytest.raises(ValueError, match="already exists with different certifiers"):
        manifest_matches(earlier, {"run_id": "demo", "config": validate({"certifiers": given[:1]}).to_dict()})
    with pytest.raises(ConfigError, match=r"certifiers: the same setting appears twice"):
        validate({"certifiers": [given[0], given[0]]})


def test_sweep_and_nightly_sections_are_typed():
    sweep = SweepConfig.from_dict({"train": {"classifier": {"name": "demo_cnn"}}, "search": {"lr": {"choice": [0.1]}},
                                   "objective": {"metric": "acr"}, "scheduler": {"grace_period": 2}})
    assert (sweep.scheduler.name, sweep.scheduler.grace_period, sweep.certification.n, sweep.resources.cpu) == (
        "asha", 2, 100, 1)
    assert sweep.definition()["scheduler"] == {"name": "asha", "grace_period": 2}
    assert sweep.definition()["certification"] == {"n0": 20, "n": 100, "alpha": 0.001}
    with pytest.raises(ConfigError) as caught:
        SweepConfig.from_dict({"train": {"classifier": {"name": "demo_cnn"}, "lr": -1},
                               "search": {"lr": {"choice": [0.1]}}, "objective": {"metric": "acr"},
                               "scheduler": {"name": "hyperband"}, "resources": {"cpu": -1}})
    message = str(caught.value)
    assert "train: lr must be a number > 0" in message and "scheduler.name must be one of" in message
    assert "resources.cpu must be a number >= 0, got -1" in message
    suite = {"run": {"certifiers": [{"name": "cohen", "sigma": 0.25}]},
             "models": [{"label": "a", "model": {"name": "demo_cnn"}}, {"label": "b", "model": {"name": "nope"}}]}
    with pytest.raises(ConfigError, match=r"models\[1\] \(b\): model\.name: unknown model 'nope'"):
        NightlySuite.from_dict(suite)
    assert NightlySuite.from_dict({**suite, "models": suite["models"][:1]}).models[0].label == "a"


def schema_keys() -> set[str]:
    """Every top-level key of a run config's schema, and `section.key` for its sections."""
    found = schema()
    definitions = found["$defs"]
    keys = set()
    for key, spec in found["properties"].items():
        keys.add(key)
        reference = spec.get("$ref") or next((choice["$ref"] for choice in spec.get("anyOf", []) if "$ref" in choice),
                                             None)
        if reference:
            keys.update(f"{key}.{inner}" for inner in definitions[reference.split("/")[-1]]["properties"])
    return keys


def readme_keys() -> set[str]:
    """The keys of the README's run config reference (first column of its table)."""
    text = (ROOT / "README.md").read_text().split("### Run config reference", 1)[1].split("\n#", 1)[0]
    return {match for line in text.splitlines() if line.startswith("| `")
            for match in re.findall(r"`([\w.]+)`", line.split("|")[1])}


def test_the_readme_config_reference_names_exactly_the_schemas_keys(capsys):
    assert readme_keys() == schema_keys()
    assert cli.main(["config-schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == RunConfig.model_json_schema()
    names = {choice["properties"]["name"]["const"] for choice in printed["properties"]["certifiers"]["items"]["oneOf"]}
    assert names == {"cohen", "topk", "dssn", "ssn", "center", "smooth_reduce"}
