"""Every user error of `megaflow train` exits non-zero with a message naming the problem and the fix."""
import shutil
import subprocess
import sys

import pytest

from megaflow.cli import main


def run(capsys, *args):
    code = main(["train", "--no-progress", *args])
    return code, capsys.readouterr().err


@pytest.fixture
def base_args(tmp_path, tiny_wan_dir):
    return ["--config", "tiny", "--output-dir", str(tmp_path / "out"), "--set", f"model.path={tiny_wan_dir}",
            "--set", "train.iterations=1"]


@pytest.mark.parametrize("override, message", [
    ("train.iteratons=2", "unknown config key 'train.iteratons'; did you mean 'train.iterations'?"),
    ("train.lr=abc", "config key 'train.lr' expects a number, got 'abc'"),
    ("rollout.group_size=1", "set rollout.group_size >= 2"),
    ("rollout.chunk_size=3", "choose a chunk size that divides 8"),
    ("train.micro_batch_size=3", "Choose a micro-batch size that divides the chunk size"),
])
def test_config_errors(capsys, base_args, override, message):
    code, err = run(capsys, *base_args, "--set", override)
    assert code == 2 and message in err and "Traceback" not in err


def test_missing_model_folder_and_component(capsys, base_args, tmp_path, tiny_wan_dir):
    code, err = run(capsys, *base_args, "--set", f"model.path={tmp_path / 'nope'}")
    assert code == 2 and "nope" in err and "model.path" in err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_wan_dir, broken)
    shutil.rmtree(broken / "vae")
    code, err = run(capsys, *base_args, "--set", f"model.path={broken}")
    assert code == 2 and "vae" in err


def test_missing_and_empty_prompt_file(capsys, base_args, tmp_path):
    code, err = run(capsys, *base_args, "--set", f"data.prompt_file={tmp_path / 'missing.txt'}")
    assert code == 2 and "missing.txt' does not exist" in err and "one prompt per line" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    code, err = run(capsys, *base_args, "--set", f"data.prompt_file={empty}")
    assert code == 2 and "empty.txt' is empty" in err


def test_prompt_file_is_used(capsys, base_args, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a purple cube\n\na white dog running\n")
    code, err = run(capsys, *base_args, "--set", f"data.prompt_file={prompts}")
    assert code == 0, err
    text = (tmp_path / "out" / "config.yaml").read_text()
    assert str(prompts) in text


def test_console_script_and_module_entry_points(tmp_path, tiny_wan_dir):
    out = subprocess.run([sys.executable, "-m", "megaflow", "train", "--config", "tiny", "--set", "train.iterations=0x"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "train.iterations' expects an integer" in out.stderr
    exe = shutil.which("megaflow")
    assert exe is not None, "the console script is not installed (pip install -e .)"
    out = subprocess.run([exe, "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--set" in out.stdout


def test_bench_kernels_subcommand(tmp_path):
    import json

    out = tmp_path / "bench.json"
    assert main(["bench", "kernels", "--quick", "--impls", "eager", "--json", str(out), "--no-markdown"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {row["phase"] for row in rows} == {"forward", "forward+backward"}
    assert all(row["impl"] == "eager" and row["ms"] > 0 for row in rows)
