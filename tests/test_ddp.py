"""One optimiser step on 2 CPU processes x batch B equals one step on 1 process x batch 2B (docs/methods.md 1)."""

import random
import subprocess
import sys
from pathlib import Path

import ddp_one_step
import pytest
import torch
from conftest import WORDS

HARNESS = Path(__file__).with_name("ddp_one_step.py")


def write_data(folder: Path) -> dict[str, Path]:
    rng = random.Random(0)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))  # noqa: E731
    (folder / "sents.txt").write_text("\n".join(sentence() for _ in range(16)) + "\n")
    rows = ["sent0,sent1,hard_neg"] + [",".join(sentence().replace(",", "") for _ in range(3)) for _ in range(16)]
    (folder / "nli.csv").write_text("\n".join(rows) + "\n")
    return {"unsup": folder / "sents.txt", "sup": folder / "nli.csv"}


def one_step(model_dir, data, devices, batch_size, out, *extra):
    args = ["--model_dir", model_dir, "--data", str(data), "--devices", str(devices), "--batch_size",
            str(batch_size), "--out", str(out), *extra]
    if devices == 1:  # in this process: saves a Python start-up
        ddp_one_step.main(args)
    else:  # strategy="ddp" re-launches its script, so it runs as one
        proc = subprocess.run([sys.executable, str(HARNESS), *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("setting", ["unsup", "sup"])
def test_two_processes_equal_one_with_the_double_batch(tmp_path, tiny_model_no_dropout, setting):
    data = write_data(tmp_path)[setting]
    single = one_step(tiny_model_no_dropout, data, 1, 8, tmp_path / "one.pt")
    ddp = one_step(tiny_model_no_dropout, data, 2, 4, tmp_path / "two.pt")
    assert max(g.abs().max().item() for g in single["grads"].values()) > 1e-2  # a real gradient
    assert max_diff(single["grads"], ddp["grads"]) < 1e-5
    assert max_diff(single["params"], ddp["params"]) < 1e-5
    if setting == "sup":  # negative control: gathering without gradients is measurably wrong
        wrong = one_step(tiny_model_no_dropout, data, 2, 4, tmp_path / "bad.pt", "--no_sync_grads")
        assert max_diff(single["grads"], wrong["grads"]) > 1e-3


@pytest.mark.parametrize("setting", ["unsup", "sup"])
def test_grad_cache_under_ddp_equals_one_process_without_it(tmp_path, tiny_model_no_dropout, setting):
    """GradCache chunks of 2 rows on 2 processes x batch 4 == one pass on 1 process x batch 8: the gather inside
    the cached loss, and every parameter's gradient reaching DDP's reducer once (one final backward)."""
    data = write_data(tmp_path)[setting]
    single = one_step(tiny_model_no_dropout, data, 1, 8, tmp_path / "one.pt")
    cached = one_step(tiny_model_no_dropout, data, 2, 4, tmp_path / "two.pt", "--mini_batch_size", "2")
    assert max(g.abs().max().item() for g in single["grads"].values()) > 1e-2  # a real gradient
    assert max_diff(single["grads"], cached["grads"]) < 1e-5  # per-chunk backward under DDP: off by 8
    assert max_diff(single["params"], cached["params"]) < 1e-5


def test_matryoshka_with_grad_cache_under_ddp_equals_one_process(tmp_path, tiny_model_no_dropout):
    """Prefix losses over gathered candidates: 2 processes x batch 4 with GradCache chunks of 2 == 1 process x 8."""
    data = write_data(tmp_path)["sup"]
    mat = ("--mlp", "none", "--matryoshka_dims", "4,8,32")
    single = one_step(tiny_model_no_dropout, data, 1, 8, tmp_path / "one.pt", *mat)
    plain = one_step(tiny_model_no_dropout, data, 1, 8, tmp_path / "plain.pt", "--mlp", "none")
    assert max_diff(single["grads"], plain["grads"]) > 1e-3  # the prefixes change the gradient
    cached = one_step(tiny_model_no_dropout, data, 2, 4, tmp_path / "two.pt", *mat, "--mini_batch_size", "2")
    scale = max(g.abs().max().item() for g in single["grads"].values())  # ~2: three prefix losses summed
    assert max_diff(single["grads"], cached["grads"]) < 1e-5 * scale  # float32 rounding of the sums
    assert max_diff(single["params"], cached["params"]) < 1e-5
