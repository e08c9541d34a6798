import pytest

from megaflow.config import Config, builtin_recipes, load_config, save_config, validate_config
from megaflow.errors import ConfigError


def test_builtin_recipe_by_name_and_path_with_repeated_overrides(tmp_path):
    assert "tiny" in builtin_recipes()
    cfg = load_config("tiny", ["train.iterations=7", "algorithm.clip_range=2e-4", "rollout.share_noise=false",
                               "model.lora_targets=to_q,to_v", "train.grad_accum=null"])
    assert cfg.train.iterations == 7 and cfg.algorithm.clip_range == 2e-4
    assert cfg.rollout.share_noise is False and cfg.model.lora_targets == ["to_q", "to_v"]
    assert cfg.train.grad_accum is None
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(str(tmp_path / "resolved.yaml"))
    assert again == cfg


def test_overrides_reach_inside_mapping_keys():
    cfg = load_config("tiny", ["reward.components.contrast=0.5", "reward.options.contrast.unused=1",
                               "reward.options.color.target=[0.1, 0.2, 0.3]"])
    assert cfg.reward.components == {"brightness": 1.0, "contrast": 0.5}
    assert cfg.reward.options == {"brightness": {"target": 0.8}, "contrast": {"unused": 1},
                                  "color": {"target": [0.1, 0.2, 0.3]}}
    with pytest.raises(ConfigError, match="reward.components.*expects a number"):
        load_config("tiny", ["reward.components.contrast=lots"])
    with pytest.raises(ConfigError, match="reward.options.*expects a mapping"):
        load_config("tiny", ["reward.options.contrast=1"])
    with pytest.raises(ConfigError, match="'target' holds 0.8, not a mapping"):
        load_config("tiny", ["reward.options.brightness.target.red=1"])


def test_unknown_key_names_it_and_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.iteratons'; did you mean 'train.iterations'"):
        load_config("tiny", ["train.iteratons=3"])
    with pytest.raises(ConfigError, match="rollout.chunk_sise.*did you mean 'rollout.chunk_size'"):
        load_config(None, ["rollout.chunk_sise=2"])


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("algorithm:\n  nmae: flow_grpo\n")
    with pytest.raises(ConfigError, match="algorithm.nmae.*algorithm.name"):
        load_config(str(path))


@pytest.mark.parametrize("assignment, message", [
    ("train.iterations=three", "train.iterations' expects an integer"),
    ("train.lr=fast", "train.lr' expects a number"),
    ("rollout.share_noise=maybe", "expects true or false"),
    ("train=3", "is a section"),
    ("train.iterations", "key=value"),
])
def test_bad_values(assignment, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [assignment])


def test_missing_recipe_lists_builtins():
    with pytest.raises(ConfigError, match="Did you mean 'tiny'"):
        load_config("tinyy")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nowhere/recipe.yaml")


@pytest.mark.parametrize("overrides, message", [
    (["rollout.group_size=1"], "at least 2 samples per prompt"),
    (["rollout.chunk_size=3"], "do not divide into chunks"),
    (["rollout.chunk_size=4", "train.micro_batch_size=3"], "does not divide rollout.chunk_size"),
    (["train.grad_accum=3"], "must be >= 1 and divide"),
    (["algorithm.name=flow_grop"], "did you mean 'flow_grpo'"),
    (["train.precision=fp16"], "train.precision must be one of"),
    (["parallel.sp_size=2"], "parallel.sp_size=2 runs under DeepSpeed"),
    (["data.prompts=[]"], "no prompts"),
    (["kernels.logprob=cuda"], "kernels.logprob must be one of"),
])
def test_validation_errors(overrides, message):
    cfg = load_config("tiny", overrides)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_defaults_validate():
    cfg = Config()
    cfg.data.prompts = ["a cat"]
    validate_config(cfg)
