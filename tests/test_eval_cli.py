"""`mmssl eval` on a trained run: retrieval, zero-shot from class-name and template files, the linear
probe, and the report (eval.json, eval.html with a similarity matrix and the run's loss curves)."""

import json

import pytest
from run_fixture import tiny_run

from mmssl.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")


def test_eval_writes_every_part_of_the_report(trained, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"tone {i}\n" for i in range(10)))
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps(["a tone of class {}", "{c}"]))
    out = tmp_path / "eval"
    run = str(trained["run_dir"])
    args = ["eval", run, "--out", str(out), "--classes", str(classes), "--templates", str(templates)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "eval.json").read_text())
    assert results["rule"] == "pair" and len(results["pairs"]) == 6  # synthetic captions never repeat
    for name, m in results["pairs"].items():
        assert f"{name:<18}{m['R@1']:>8.3f}" in printed
    zs = results["zeroshot"]
    assert zs["classes"][3] == "tone 3" and zs["templates"] == ["a tone of class {}", "{c}"]
    assert set(zs["modalities"]) == {"image", "audio"} and zs["modalities"]["image"]["samples"] == 24
    assert set(results["probe"]) == {"image", "text", "audio"}  # the run's train shards, found by default
    assert results["probe"]["image"]["train_samples"] == 48
    page = (out / "eval.html").read_text()
    assert all(part in page for part in ("Zero-shot", "Linear probe", "similarity.png", "loss.png"))
    assert (out / "similarity.png").stat().st_size > 1000 and (out / "loss.png").is_file()

    # no class names anywhere: zero-shot says why it was skipped; --no-probe skips the probe
    assert main(["eval", run, "--out", str(out), "--no-probe"]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert "classes.json" in results["zeroshot"]["skipped"] and "probe" not in results


def test_eval_refuses_bad_inputs_in_one_line(trained, tmp_path, capsys):
    bad = tmp_path / "templates.txt"
    bad.write_text("a tone\n")  # no {} for the class name
    for args, expected in (
        (["--templates", str(bad)], "'a tone'"),
        (["--classes", str(tmp_path / "nope.json")], "nope.json"),
        (["--data", str(tmp_path / "nowhere")], "--data"),
        (["--probe-data", str(tmp_path / "nowhere")], "--probe-data"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", str(trained["run_dir"]), *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
