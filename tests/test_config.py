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
    (["algorithm.window_size=2"], r"algorithm.window_size is an option of mix_grpo, mix_grpo_flash, not of "),
    (["algorithm.name=mix_grpo", "algorithm.timestep_fraction=0.5"], "does not apply to mix_grpo"),
    (["algorithm.name=mix_grpo", "algorithm.window_size=5"], "window_size <= num_steps - 2"),
    (["algorithm.name=mix_grpo", "algorithm.window_strategy=progresive"], "window_strategy must be one of"),
    (["algorithm.name=mix_grpo_flash", "algorithm.flash_compression=0"], "flash_compression must be in"),
    (["algorithm.name=flow_grpo_fast", "algorithm.sde_window_range=[2,3]"], "inside"),
    (["algorithm.name=g2rpo", "algorithm.branch_steps=[0,5]"], r"branch_steps must be distinct steps in 0..4"),
    (["algorithm.name=g2rpo", "algorithm.granularities=[0]"], "granularities must be distinct strides"),
    (["algorithm.sde_kind=ode"], "algorithm.sde_kind 'ode' is not one of"),
    (["algorithm.loss=grpo_gaurd"], "did you mean 'grpo_guard'"),
    (["algorithm.noise_schedule=linear", "algorithm.sde_kind=dance"], "needs the flow_grpo SDE kind"),
    (["algorithm.noise_schedule=linear", "algorithm.noise_level=0.7"], "has no noise level"),
    (["rollout.best_of=3"], "must be even"),
    (["rollout.best_of_renormalize=true"], "needs rollout.best_of"),
    (["train.ema_decay=1.0"], "train.ema_decay must be in"),
])
def test_validation_errors(overrides, message):
    cfg = load_config("tiny", overrides)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_defaults_validate():
    cfg = Config()
    cfg.data.prompts = ["a cat"]
    validate_config(cfg)


def test_every_builtin_recipe_validates():
    for name in builtin_recipes():
        validate_config(load_config(name))


def test_a_recipe_states_only_what_differs_from_its_base(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("seed: 3\ntrain: {iterations: 7, lr: 0.5}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base\ntrain: {lr: 0.25}\n")
    cfg = load_config(str(child))
    assert (cfg.seed, cfg.train.iterations, cfg.train.lr) == (3, 7, 0.25)
    flash = load_config("demo_mix_grpo_flash_star")  # demo → demo_unregularized → demo_mix_grpo → … → flash*
    assert (flash.algorithm.name, flash.algorithm.window_strategy, flash.algorithm.flash_compression,
            flash.algorithm.window_size, flash.algorithm.kl_beta, flash.data.prompt_file) == (
        "mix_grpo_flash", "frozen", 0.2, 3, 0.0, "demo_prompts.jsonl")
    (tmp_path / "loop.yaml").write_text("base: loop\n")
    with pytest.raises(ConfigError, match="its own base"):
        load_config(str(tmp_path / "loop.yaml"))
