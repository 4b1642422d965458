"""The trainers' settings are written once (trainer/config.py): for each config dataclass
the command line made from it has a flag with help for every field, the same defaults,
`--config FILE` plus a flag override gives the expected config, and a bad value is
refused with a message naming the field."""

import argparse
import dataclasses
import json

import pytest

from trainer.config import (
    ConfigError,
    add_config_arguments,
    config_from_namespace,
    config_from_values,
    field_meta,
    flags_of,
)
from trainer.errors import PolicyInputError
from trainer.policy_config import PolicyConfig
from trainer.reward_config import RewardConfig
from trainer.reward_data import RewardDataError

CONFIGS = [RewardConfig, PolicyConfig]


def parser_for(config_class) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(parser, config_class)
    return parser


def actions(parser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}


@pytest.mark.parametrize("config_class", CONFIGS)
def test_every_field_has_a_flag_with_help_and_the_dataclass_default(config_class):
    parser = parser_for(config_class)
    by_dest = actions(parser)
    fields = {f.name for f in dataclasses.fields(config_class)}
    assert set(by_dest) == fields
    default = config_class()
    for name, action in by_dest.items():
        assert action.help and action.help.strip(), f"{name}: no help"
        assert action.default == getattr(default, name), name
        assert action.option_strings[0] == flags_of(config_class, name)[0]
    assert vars(parser.parse_args([])) | {} == {"config": None, **dataclasses.asdict(default)}
    cfg, explicit = config_from_namespace(config_class, parser.parse_args([]))
    assert cfg == default and explicit == set()
    text = parser.format_help()
    for name in fields:
        assert flags_of(config_class, name)[0] in text


# The flags of the hand-written command lines the generated ones replaced.
FLAGS = {
    RewardConfig: "--data --model --run-dir --runs-dir --run-id --epochs --lr --batch-size --grad-accum "
    "--eval-batch-size --max-length --val-fraction --seed --warmup --weight-decay --max-grad-norm "
    "--margin --margin-scale --ties --both-bad --weights --include-flagged --judges --criteria --center "
    "--style-penalty --no-pack --grad-checkpointing --lora-r --lora-alpha --dtype --device --save-every "
    "--max-steps --no-progress",
    PolicyConfig: "--reward --prompts --model --algo --run-dir --runs-dir --run-id --steps --batch-size --k "
    "--max-new-tokens --max-prompt-length --temperature --lr --anneal-lr --epochs --minibatches "
    "--micro-batch --gamma --lam --clip --clip-value --vf-coef --kl-coef --kl-estimator --kl-target "
    "--kl-horizon --whiten-rewards --whiten-advantages --no-whiten-advantages --loss-agg --mask-truncated "
    "--missing-eos-penalty "
    "--baseline-decay --max-kl --max-grad-norm --trust-kl --cg-iters --cg-damping --line-search-steps "
    "--line-search-shrink --seed --lora-r --lora-alpha --grad-checkpointing "
    "--dtype --device --gen-batch --no-share-prompt --compile-generation --no-compile-generation "
    "--reward-weights --reward-batch-size --save-every --sample-every --samples --eval-prompts --no-progress",
}


@pytest.mark.parametrize("config_class", CONFIGS)
def test_the_command_line_has_the_flags_it_had(config_class):
    flags = [s for a in parser_for(config_class)._actions for s in a.option_strings]
    assert flags == ["-h", "--help", "--config", *FLAGS[config_class].split()]


def test_the_flags_keep_their_names_and_kinds():
    """What the hand-written command lines had: store_true, --no-x, --x/--no-x, choices."""
    reward = parser_for(RewardConfig)
    args = reward.parse_args(
        [
            "--margin",
            "--no-pack",
            "--no-progress",
            "--grad-checkpointing",
            "--lr",
            "1e-4",
            "--epochs",
            "3",
            "--ties",
            "include",
            "--both-bad",
            "include",
            "--dtype",
            "bf16",
        ]
    )
    assert (args.margin, args.pack, args.progress, args.grad_checkpointing) == (True, False, False, True)
    assert (args.lr, args.epochs, args.ties, args.both_bad, args.dtype) == (
        1e-4,
        3,
        "include",
        "include",
        "bf16",
    )
    with pytest.raises(SystemExit):
        reward.parse_args(["--ties", "sometimes"])
    policy = parser_for(PolicyConfig)
    assert policy.parse_args([]).whiten_advantages is None
    assert policy.parse_args(["--whiten-advantages"]).whiten_advantages is True
    assert policy.parse_args(["--no-whiten-advantages"]).whiten_advantages is False
    assert policy.parse_args(["--no-compile-generation"]).compile_generation is False
    assert policy.parse_args(["--no-share-prompt", "--anneal-lr"]).share_prompt is False
    assert policy.parse_args(["--algo", "rloo", "--k", "4", "--kl-coef", "0.1"]).algo == "rloo"


@pytest.mark.parametrize(
    "config_class,file,argv,expected",
    [
        (
            RewardConfig,
            {"lr": 1e-4, "epochs": 3, "ties": "include", "model": "tiny"},
            ["--epochs", "1", "--no-pack"],
            dict(lr=1e-4, epochs=1, ties="include", model="tiny", pack=False),
        ),
        (
            PolicyConfig,
            {"algo": "rloo", "k": 4, "steps": 10},
            ["--steps", "5", "--kl-coef", "0.2"],
            dict(algo="rloo", k=4, steps=5, kl_coef=0.2),
        ),
    ],
)
def test_a_config_file_with_a_flag_override(tmp_path, config_class, file, argv, expected):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(file))
    cfg, explicit = config_from_namespace(
        config_class, parser_for(config_class).parse_args(["--config", str(path), *argv])
    )
    assert cfg == dataclasses.replace(config_class(), **expected)
    # What a resume may take over its own settings: the file's keys and the flags that changed.
    assert explicit == set(file) | {k for k, v in expected.items() if v != getattr(config_class(), k)}
    cfg.check()


def test_a_bad_config_file_is_refused_naming_the_file_or_key(tmp_path):
    parser = parser_for(RewardConfig)
    bad = tmp_path / "bad.json"
    for text, expect in [
        ("{not json", "not JSON"),
        ('["lr"]', "a JSON object"),
        ('{"learning_rate": 1}', "unknown setting learning_rate"),
        ('{"epochs": "two"}', "--epochs 'two' is not a number"),
    ]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=expect):
            config_from_namespace(RewardConfig, parser.parse_args(["--config", str(bad)]))
    with pytest.raises(ConfigError, match="cannot read it"):
        config_from_namespace(RewardConfig, parser.parse_args(["--config", str(tmp_path / "missing.json")]))


@pytest.mark.parametrize(
    "config_class,values,flag,label",
    [
        (RewardConfig, {"epochs": 0}, "--epochs must be at least 1", "Epochs: must be at least 1"),
        (RewardConfig, {"lr": 0}, "--lr must be positive", "Learning rate: must be positive"),
        (
            RewardConfig,
            {"ties": "sometimes"},
            "--ties must be one of exclude, include",
            "Ties: must be one of",
        ),
        (
            RewardConfig,
            {"max_length": 4},
            "--max-length must be at least 8 tokens",
            "Max length: must be at least 8",
        ),
        (RewardConfig, {"model": ""}, "--model give a model", "Base model: give a model"),
        (
            RewardConfig,
            {"epochs": 1.5},
            "--epochs 1.5 is not a whole number",
            "Epochs: 1.5 is not a whole number",
        ),
        (
            PolicyConfig,
            {"algo": "dpo"},
            "--algo must be one of ppo, rloo, reinforce",
            "Algorithm: must be one of",
        ),
        (
            PolicyConfig,
            {"algo": "rloo", "k": 1},
            "--k must be at least 2 for rloo",
            "--k: must be at least 2",
        ),
        (PolicyConfig, {"kl_coef": -1}, "--kl-coef must be at least 0", "KL coefficient: must be at least 0"),
        (
            PolicyConfig,
            {"prompts": "no/such.jsonl"},
            "--prompts no/such.jsonl does not exist",
            "Prompts file: no/such.jsonl does not exist",
        ),
    ],
)
def test_a_bad_value_is_refused_naming_the_field(config_class, values, flag, label):
    with pytest.raises(ConfigError) as raised:
        config_from_values(config_class, values)
    assert flag in str(raised.value) and label in raised.value.labelled()
    # Still the trainers' own input errors: their `except` and the run's failed status see it.
    assert isinstance(raised.value, RewardDataError if config_class is RewardConfig else PolicyInputError)


def test_form_values_are_typed_by_the_annotation():
    cfg = config_from_values(
        RewardConfig, {"epochs": "2", "lr": "1e-4", "ties": " Include ", "margin": "true", "data": ""}
    )
    assert (cfg.epochs, cfg.lr, cfg.ties, cfg.margin, cfg.data) == (2, 1e-4, "include", True, None)
    assert all(field_meta(c)[f]["help"] for c in CONFIGS for f in field_meta(c))


def test_eval_policy_flags_come_from_its_dataclass():
    from trainer.evaluate import EvalConfig, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    by_dest = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(by_dest) == {f.name for f in dataclasses.fields(EvalConfig)}
    assert all(a.help and a.default == getattr(EvalConfig(), name) for name, a in by_dest.items())
    assert [s for a in parser._actions for s in a.option_strings][2:] == [
        "--policy",
        "--reward",
        "--reference",
        "--prompts",
        "--n",
        "--max-new-tokens",
        "--temperature",
        "--seed",
        "--device",
        "--endpoints",
    ]
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --policy is required
    args = parser.parse_args(["--policy", "runs/p", "--n", "8", "--temperature", "0.5"])
    assert (args.policy, args.n, args.temperature, args.max_new_tokens) == ("runs/p", 8, 0.5, None)
