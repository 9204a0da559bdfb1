"""``python -m jaxmps`` and jaxmps.demo: a short run end to end (JSON report, native and
reference losses agreeing, the loss going down), the data set, the self-check hook, and the
messages for bad options."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")
pytest.importorskip("sklearn")

from jaxmps import __main__ as cli  # noqa: E402
from jaxmps import demo  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--epochs", "1", "--steps-per-epoch", "5", "--batch-size", "32",
        "--compare-steps", "4", "--width", "8"]


@pytest.fixture
def passing_selfcheck(monkeypatch):
    """The kernels' self-check has its own tests; here only its hook into the CLI matters."""
    from jaxmps import selfcheck
    monkeypatch.setattr(selfcheck, "run", lambda *a, **k: {"ok": True, "checks": []})


def test_short_run_json_report(passing_selfcheck, capsys):
    assert cli.main(TINY + ["--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)  # stdout holds the JSON report alone
    assert report["ok"] is True and report["selfcheck"]["ok"] is True
    assert set(report["backends"]) == {"cpu", "cuda", "metal"}
    assert report["epochs"] == 1 and report["steps"] == 5 and report["batch_size"] == 32
    assert len(report["history"]) == 1
    assert 0.2 < report["test_accuracy"] <= 1.0  # five steps already beat chance (0.1)
    assert report["reached_target"] == (report["test_accuracy"] >= report["target_accuracy"])
    for key in ("train", "native", "reference"):
        assert report["step_ms"][key] > 0
    comparison = report["comparison"]
    assert comparison["steps"] == 4 and comparison["agree"]
    np.testing.assert_allclose(comparison["native_losses"], comparison["reference_losses"],
                               rtol=demo.LOSS_AGREEMENT)
    assert comparison["native_losses"][-1] < comparison["native_losses"][0]  # it learns
    assert report["data"] == {"train": 1438, "test": 359, "image_size": 16}
    # progress and messages went to stderr
    assert "native backends:" in err and "held-out accuracy" in err


def test_failed_selfcheck_fails_the_run(monkeypatch, capsys):
    from jaxmps import selfcheck
    monkeypatch.setattr(selfcheck, "run", lambda *a, **k: {
        "ok": False, "checks": [{"kernel": "conv2d_forward", "status": "MISMATCH"}]})
    assert cli.main(TINY + ["--compare-steps", "0", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["selfcheck"]["mismatches"] == [{"kernel": "conv2d_forward",
                                                  "status": "MISMATCH"}]
    assert "comparison" not in report


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "argument --epochs: must be a positive integer, got '0'"),
    (["--batch-size", "x"], "argument --batch-size: must be a positive integer, got 'x'"),
    (["--batch-size", "1"], "argument --batch-size: must be at least 2"),
    (["--learning-rate", "-1"], "argument --learning-rate: must be a positive number"),
    (["--backend", "tpu"], "argument --backend: invalid choice: 'tpu'"),
    (["--epochs"], "argument --epochs: expected one argument"),
])
def test_bad_options_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unavailable_backend_is_refused(capsys):
    import jaxmps
    missing = [name for name, b in jaxmps.backends().items() if not b.available]
    if not missing:
        pytest.skip("every backend is available on this machine")
    name = missing[0]  # e.g. cuda on a CPU-only machine, metal off macOS
    assert cli.main(["--backend", name]) == 2
    err = capsys.readouterr().err
    assert f"--backend {name}: the jaxmps {name} kernels are not available" in err


def test_batch_larger_than_the_data_is_refused(passing_selfcheck, capsys):
    assert cli.main(["--batch-size", "5000", "--compare-steps", "0"]) == 2
    assert "--batch-size must be at most the 1438 training images" in capsys.readouterr().err


def test_entry_point_help():
    """`python -m jaxmps` is the README's first command: the module runs as a script."""
    done = subprocess.run([sys.executable, "-m", "jaxmps", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr
    assert "--epochs" in done.stdout and "--json" in done.stdout


def test_digits_split_and_batches():
    data = demo.load_digits(image_size=12, seed=3)
    assert data.x_train.shape == (1438, 12, 12, 1) and data.x_test.shape == (359, 12, 12, 1)
    assert data.x_train.dtype == np.float32
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0 + 1e-6
    assert set(np.unique(data.y_train)) == set(range(10))
    # a seeded permutation: every image is in exactly one split, and the split is stable
    again = demo.load_digits(image_size=12, seed=3)
    np.testing.assert_array_equal(again.y_test, data.y_test)
    assert len(data.y_train) + len(data.y_test) == 1797
    idx = demo.batches(10, 4, np.random.default_rng(0))
    assert [len(b) for b in idx] == [4, 4]  # the remainder is dropped: one compiled shape
    assert len(set(np.concatenate(idx))) == 8


def test_progress_bar_without_a_terminal_prints_one_line_per_epoch():
    stream = io.StringIO()
    bar = demo.ProgressBar(4, stream, width=8)
    for _ in range(2):
        bar.step("x")
    bar.epoch_end("epoch 1/2")
    for _ in range(2):
        bar.step("x")
    bar.epoch_end("epoch 2/2")
    assert stream.getvalue().splitlines() == ["[####....] 2/4 epoch 1/2",
                                              "[########] 4/4 epoch 2/2"]
