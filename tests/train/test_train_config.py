"""moe-train configuration: every group option composes and validates; bad keys and values fail naming them."""

import math

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException

from moe.train import CONFIG_DIR
from moe.train.config import TrainConfig, architecture, register_configs, validate
from moe.train.trainer import WarmupCosine

GROUPS = {
    "model": ["tiny", "small", "medium", "dense"],
    "router": ["topk", "expert_choice", "relu", "base", "sinkhorn", "hash", "top_p", "null_experts"],
    "experts": ["grouped", "loop"],
    "dispatch": ["auto", "local", "triton"],
    "data": ["stdlib"],
    "optim": ["adamw"],
    "trainer": ["default"],
    "logger": ["console", "wandb"],
}


def _compose(overrides=(), hydra_config=False):
    register_configs()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


def test_group_files_match_the_listed_options():
    for group, options in GROUPS.items():
        on_disk = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        assert on_disk == sorted(options + (["text", "bin", "prepared"] if group == "data" else [])), group


def test_default_composes_to_the_tiny_topk_model():
    cfg = validate(_compose())
    assert isinstance(cfg, TrainConfig)
    assert (cfg.router.name, cfg.experts.impl, cfg.data.source, cfg.logger.name) == (
        "topk",
        "grouped",
        "stdlib",
        "console",
    )
    assert cfg.model.num_experts == 4 and cfg.model.moe_every == 1
    assert cfg.trainer.resume == "auto" and cfg.parallel.ep_size == 1


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes_and_validates(group, option):
    cfg = validate(_compose([f"{group}={option}"]))
    if group == "router":
        assert cfg.router.name == option
    if group == "experts":
        assert cfg.experts.impl == option


def test_dense_model_has_the_tiny_models_active_ffn_width():
    tiny, dense = validate(_compose(["model=tiny"])).model, validate(_compose(["model=dense"])).model
    assert dense.moe_every == 0
    assert dense.ffn_hidden_size == tiny.top_k * tiny.ffn_hidden_size
    assert (dense.hidden_size, dense.num_layers, dense.num_heads) == (tiny.hidden_size, tiny.num_layers, tiny.num_heads)


def test_public_keys_override():
    cfg = validate(
        _compose(
            [
                "trainer.max_steps=7",
                "trainer.seed=3",
                "trainer.log_interval=2",
                "trainer.eval_interval=5",
                "trainer.ckpt_interval=4",
                "trainer.resume=none",
                "router=relu",
                "model=dense",
                "data=stdlib",
            ]
        )
    )
    t = cfg.trainer
    assert (t.max_steps, t.seed, t.log_interval, t.eval_interval, t.ckpt_interval, t.resume) == (7, 3, 2, 5, 4, "none")
    assert cfg.router.name == "relu" and cfg.model.moe_every == 0


def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose(["hydra/launcher=slurm"], hydra_config=True)
    assert cfg.hydra.launcher.gpus_per_node == 1
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")


def test_unknown_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException, match="trainer.max_step"):
        _compose(["trainer.max_step=5"])
    with pytest.raises(Exception, match="trainer.bogus"):
        validate(_compose(["+trainer.bogus=5"]))


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(MissingConfigException) as error:
        _compose(["router=nope"])
    for name in ("topk", "expert_choice", "relu", "base"):
        assert name in str(error.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.device=tpu", r"trainer.device='tpu'.*\['auto', 'cpu', 'cuda'\]"),
        ("trainer.precision=fp8", r"trainer.precision='fp8'.*\['auto', 'fp32', 'bf16'\]"),
        ("trainer.max_steps=0", r"trainer.max_steps=0.*>= 1"),
        ("trainer.log_interval=-1", r"trainer.log_interval=-1"),
        ("trainer.strategy=zero9", r"trainer.strategy='zero9'.*\['ddp', 'fsdp', 'deepspeed'\]"),
        ("trainer.zero_stage=3", r"trainer.zero_stage=3.*\[1, 2\]"),
        ("parallel.ep_size=0", r"parallel.ep_size=0.*>= 1"),
        ("optim.lr=-1", r"optim.lr=-1"),
        ("optim.betas=[0.9]", r"optim.betas"),
        ("model.top_k=5", r"model.top_k=5.*model.num_experts=4"),
        ("model.num_heads=3", r"model.hidden_size=128.*model.num_heads=3"),
        ("model.activation=tanh", r"model.activation='tanh'.*swiglu"),
        ("logger.progress=fancy", r"logger.progress='fancy'.*\['auto', 'bar', 'lines'\]"),
        ("data=text", r"data.path is required"),
        ("+router.kwargs.not_an_arg=1", r"router.kwargs.not_an_arg.*'topk'.*load_balancing_coef"),
    ],
)
def test_invalid_values_fail_naming_key_and_choices(override, message):
    with pytest.raises(ValueError, match=message):
        validate(_compose([override]))


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="trainer.max_steps"):
        _compose(["trainer.max_steps=many"])


def test_architecture_holds_shape_keys_not_loop_keys():
    cfg = validate(_compose(["trainer.max_steps=3", "+router.kwargs.jitter_eps=0.01"]))
    arch = architecture(cfg, 256)
    assert arch["model.hidden_size"] == 128 and arch["router.name"] == "topk"
    assert arch["router.kwargs.jitter_eps"] == 0.01 and arch["data.vocab_size"] == 256
    assert not any(key.startswith(("trainer.", "optim.", "data.batch")) for key in arch)


def test_warmup_cosine_matches_its_formula():
    schedule = WarmupCosine(warmup=10, decay_steps=110, floor=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    for step in (10, 35, 60, 110):
        progress = (step - 10) / 100
        assert schedule(step) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert schedule(500) == pytest.approx(0.1)


def test_triton_dispatch_builds_fused_layers_also_with_expert_parallelism():
    from moe.dispatch.fused import FusedDispatcher
    from moe.layer import moe_layers
    from moe.train.trainer import build_model

    cfg = validate(_compose(["dispatch=triton"]))
    layers = moe_layers(build_model(cfg, vocab_size=256))
    assert layers and all(isinstance(layer.dispatcher, FusedDispatcher) for _, layer in layers)
    # Expert parallelism keeps the Triton permute/combine around its all-to-all (tests/parallel checks the maths).
    assert validate(_compose(["dispatch.name=triton", "parallel.ep_size=2"])).dispatch.name == "triton"


@pytest.mark.parametrize("value", ["true", "false"])
def test_the_old_experts_kernels_key_names_its_replacement(value):
    with pytest.raises(ValueError) as error:
        validate(_compose([f"experts.kernels={value}"]))
    assert str(error.value) == (
        "experts.kernels was renamed: use dispatch.name=triton "
        "(it selects the Triton router top-k and permute/combine, not the experts)"
    )


def test_model_group_is_the_model_shape_and_builds_the_same_config():
    """The trainer's model group is moe.model.ModelShape: same fields and defaults, built without copying."""
    import dataclasses

    from moe.model import ModelConfig, ModelShape
    from moe.train.trainer import build_model

    cfg = validate(_compose(["model.dropout=0.5", "model.rope_base=500"]))
    assert type(cfg.model) is ModelShape
    built = build_model(cfg, vocab_size=256).cfg
    for f in dataclasses.fields(ModelShape):
        assert getattr(built, f.name) == getattr(cfg.model, f.name), f.name
    assert (built.vocab_size, built.router, built.experts, built.dispatcher) == (256, "topk", "grouped", "local")
    assert ModelConfig().num_experts == ModelShape().num_experts == 4


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.dropout=1.0", r"^model.dropout=1.0 is not valid; it must be in \[0.0, 1.0\)$"),
        ("model.rope_base=1", r"^model.rope_base=1.0 is not valid"),
        ("model.num_layers=0", r"^model.num_layers must be an int >= 1, got 0$"),
        ("dispatch.name=fused", r"^dispatch.name='fused' is not valid; valid choices: \['auto', 'local', 'triton'\]$"),
    ],
)
def test_model_and_dispatch_checks_name_the_trainer_key(override, message):
    with pytest.raises(ValueError, match=message):
        validate(_compose([override]))


def test_learning_rate_is_lr_times_the_schedule_at_the_step():
    from moe.train.config import OptimSchema
    from moe.train.trainer import lr_at

    optim = OptimSchema(lr=0.01, warmup_steps=10, min_lr_ratio=0.1)
    for step in (0, 9, 10, 60, 110, 500):
        assert lr_at(step, optim, max_steps=110) == 0.01 * WarmupCosine(10, 110, 0.1)(step)
    # decay_steps follows max_steps unless set: a longer run stretches the cosine.
    assert lr_at(60, optim, max_steps=210) == pytest.approx(0.01 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    fixed = OptimSchema(lr=0.01, warmup_steps=10, min_lr_ratio=0.1, decay_steps=110)
    assert lr_at(60, fixed, max_steps=210) == lr_at(60, optim, max_steps=110)
