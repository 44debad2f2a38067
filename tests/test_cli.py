"""Bad input stops `mmssl` in its first process with one line naming the value at fault (exit 2)."""

import pytest

from mmssl.cli import main


def run(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_unknown_preset(capsys):
    err = run(capsys, "train", "--preset", "gigantic")
    assert "gigantic" in err


def test_missing_shards_and_empty_glob(capsys, tmp_path):
    err = run(capsys, "train", f"data.train_shards={tmp_path}/nowhere", "data.eval_shards=")
    assert "data.train_shards" in err and "nowhere" in err
    err = run(capsys, "train", f"data.train_shards={tmp_path}/*.tar", "data.eval_shards=")
    assert "*.tar" in err


def test_eval_shards_are_checked_only_when_training_evaluates(demo_shards, tmp_path):
    from mmssl import data
    from mmssl.config import apply_overrides
    from mmssl.presets import get_preset

    shards = [f"data.train_shards={demo_shards}/train", f"data.eval_shards={tmp_path}/missing"]
    with pytest.raises(ValueError, match="data.eval_shards.*missing"):
        data.check_shards(apply_overrides(get_preset("tiny"), shards))
    data.check_shards(apply_overrides(get_preset("tiny"), [*shards, "train.eval_at_end=false"]))


def test_invalid_config_values(capsys, demo_shards):
    train = f"data.train_shards={demo_shards}/train"  # data.eval_shards stays at the preset's data/demo/test
    assert "optim.lr" in run(capsys, "train", train, "optim.lr=-1")
    assert "model.image.image_size" in run(capsys, "train", train, "model.image.patch_size=7")
    assert "optim.colour" in run(capsys, "train", train, "optim.colour=red")


def test_batch_identity_is_checked_against_ds_config(capsys, demo_shards, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_batch_size": 48, "train_micro_batch_size_per_gpu": "auto"}')
    shards = [f"data.train_shards={demo_shards}/train", "data.eval_shards="]
    err = run(capsys, "train", "--nproc", "2", *shards, f"engine.ds_config={ds}")
    assert "train_batch_size=48" in err and "micro_batch_size=32" in err


def test_resume_without_checkpoint_and_eval_of_nothing(capsys, demo_shards, tmp_path):
    shards = [f"data.train_shards={demo_shards}/train", "data.eval_shards="]
    err = run(capsys, "train", "--resume", "latest", "--run-dir", str(tmp_path), *shards)
    assert "--resume latest" in err
    assert str(tmp_path) in run(capsys, "eval", str(tmp_path))


def test_zero3_with_a_second_pass_and_offload_without_zero3(capsys, demo_shards):
    shards = [f"data.train_shards={demo_shards}/train", "data.eval_shards="]
    err = run(capsys, "train", "--preset", "tiny_masked", *shards, "engine.zero_stage=3",
              "objectives.unmasked_contrastive_pass=true")  # fmt: skip
    assert "engine.zero_stage=3" in err and "unmasked_contrastive_pass" in err
    assert "engine.offload_params" in run(
        capsys, "train", *shards, "engine.zero_stage=2", "engine.offload_params=true"
    )
    assert "engine.offload_optimizer" in run(
        capsys, "train", *shards, "engine.zero_stage=0", "engine.offload_optimizer=true"
    )


def test_overrides_may_follow_options_and_strays_are_refused(capsys, demo_shards):
    train = f"data.train_shards={demo_shards}/train"
    # argparse alone would drop KEY=VALUE words that come after a later option
    assert "optim.lr" in run(capsys, "train", train, "--preset", "tiny", "optim.lr=-1")
    assert "unrecognized arguments: stray" in run(capsys, "train", train, "--preset", "tiny", "stray")
    assert "unrecognized arguments: --bogus" in run(capsys, "train", "--bogus", train)
