"""When things go wrong: signals, kills, damaged checkpoints, a full disk, short profiles, bugs.

Every training here is a subprocess of ``train.py`` (or ``tests/dist/faulty_train.py``, which
injects one signal at a chosen step) on a 200-image slice of Fashion-MNIST with a tiny model, so
whole runs take seconds and their final weights can be compared exactly.
"""
import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from model import checkpoint as ckpt_module

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--loader", "torch", "--image-size", "8", "--small-stem", "--dim", "64", "--pred-dim", "16", "-b", "40", "-j", "0",
        "--no-knn", "--log-every", "2", "--epochs", "2"]


def run(args, env_extra=None, script="train.py", **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env, **kw)


def group_is_empty(pgid, within=15.0):
    """Whether no process of process group ``pgid`` is left, waiting up to ``within`` seconds."""
    end = time.time() + within
    while time.time() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def run_in_own_group(args, env_extra, timeout=300):
    """``tests/dist/faulty_train.py args`` as the leader of a new session and process group (so that a
    signal to its group reaches it and its DataLoader workers, never pytest); returns the result and
    whether the group was empty afterwards."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    proc = subprocess.Popen([sys.executable, "tests/dist/faulty_train.py", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), group_is_empty(proc.pid)


def weights(folder):
    return torch.load(Path(folder) / "checkpoint.pth", weights_only=True)["model"]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def data(fmnist_root, tmp_path_factory):
    from conftest import copy_slice
    return copy_slice(fmnist_root, tmp_path_factory.mktemp("stop_data"), per_class=20)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted run: 2 epochs of 5 steps."""
    out = tmp_path_factory.mktemp("ref") / "run"
    res = run(["--data", str(data), "--out", str(out), *TINY])
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_sigterm_mid_epoch_checkpoints_the_position_and_resume_matches(data, reference, tmp_path):
    out = tmp_path / "run"
    res = run(["--data", str(data), "--out", str(out), *TINY], {"FAULT_STEP": "3", "FAULT_SIGNAL": "TERM"},
              script="tests/dist/faulty_train.py")
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-2000:]
    assert "stopped by SIGTERM at epoch 1, step 3/5" in res.stderr and "--resume auto" in res.stderr
    assert "Traceback" not in res.stderr
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 3)
    res = run(["--data", str(data), "--out", str(out), "--resume", "auto", *TINY])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout and "at epoch 1, step 3/5" in res.stdout
    assert_same_weights(reference, out)


def test_sigterm_to_the_process_group_with_loader_workers_checkpoints_the_step_and_resume_matches(
        data, reference, tmp_path):
    # what Slurm (scancel, preemption, time limit) and kill -TERM -PGID do: every process of the group,
    # the two DataLoader workers included, gets SIGTERM after step 3; --log-every 20 is longer than the run
    out = tmp_path / "run"
    args = ["--data", str(data), "--out", str(out), *TINY, "-j", "2", "--log-every", "20"]
    res, empty = run_in_own_group(args, {"FAULT_STEP": "3", "FAULT_SIGNAL": "TERM", "FAULT_TARGET": "group"})
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-3000:]
    assert "stopped by SIGTERM at epoch 1, step 3/5; checkpoint written" in res.stderr
    assert "DataLoader worker" not in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert empty, "a process of the run's group outlived it"
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 3)
    res = run(["--data", str(data), "--out", str(out), "--resume", "auto", *TINY, "-j", "2", "--log-every", "20"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "at epoch 1, step 3/5" in res.stdout
    assert_same_weights(reference, out)


def test_save_every_steps_bounds_what_a_sigkill_loses_whatever_log_every(data, reference, tmp_path):
    # --save-every 2steps with --log-every 20: the checkpoint of step N is written after step N, so a
    # SIGKILL at a random step (during the step: its update is lost too) costs at most 2 steps
    out = tmp_path / "run"
    step = random.randrange(3, 10)  # of 10 (2 epochs of 5): any step after the first save
    args = ["--data", str(data), "--out", str(out), "--resume", "auto", "--save-every", "2steps", *TINY,
            "--log-every", "20"]
    res = run(args, {"FAULT_STEP": str(step), "FAULT_SIGNAL": "KILL"}, script="tests/dist/faulty_train.py")
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    saved = state["epoch"] * 5 + state["step"]
    assert step - 2 <= saved < step, f"killed during step {step}, newest checkpoint after step {saved}"
    res = run(args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not list(out.glob(".*.tmp*"))
    assert_same_weights(reference, out)


def test_a_folder_given_as_checkpoint_says_so_and_names_the_file_in_it(reference, tmp_path):
    for script in ("knn_eval.py", "linear_eval.py"):
        res = subprocess.run([sys.executable, script, str(reference)], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 1
        assert res.stderr.strip() == (f"error: checkpoint {reference} is a directory, not a file; it holds "
                                      f"{reference / 'checkpoint.pth'}: give that file"), res.stderr
    res = subprocess.run([sys.executable, "knn_eval.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.stderr.strip() == f"error: checkpoint {tmp_path} is a directory, not a file and holds no checkpoint.pth"


def test_sigkill_at_three_random_moments_then_resume_matches(data, reference, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(data), "--out", str(out), "--resume", "auto", "--save-every", "2steps", *TINY]
    rng = random.Random(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(4.0, 12.0))  # import + scan take a few seconds; then a step is ~0.1-1 s
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    res = run(args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_same_weights(reference, out)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pth", "checkpoint.prev.pth"):
        (out / name).write_bytes((reference / name).read_bytes())
    assert torch.load(out / "checkpoint.prev.pth", weights_only=True)["epoch"] == 1
    data_bytes = (out / "checkpoint.pth").read_bytes()
    (out / "checkpoint.pth").write_bytes(data_bytes[: len(data_bytes) // 3])  # cut while being copied, say
    res = run(["--data", str(data), "--out", str(out), "--resume", "auto", *TINY])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "is damaged" in res.stderr and "resuming from the previous checkpoint" in res.stderr
    assert "after epoch 1" in res.stdout
    assert_same_weights(reference, out)  # epoch 2 trained again from epoch 1 gives the same weights


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, calls = ckpt_module._write_synced, []

    def failing(obj, tmp):
        if Path(tmp).name.startswith(".checkpoint.pth"):
            calls.append(tmp)
        if len(calls) == 2:  # epoch 2's checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, tmp)

    monkeypatch.setattr(ckpt_module, "_write_synced", failing)
    with pytest.raises(train.CheckpointError) as info:
        train.main(["--data", str(data), "--out", str(out), *TINY])
    message = str(info.value)
    assert "No space left on device" in message and f"previous checkpoint {out / 'checkpoint.pth'} is intact" in message
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 1  # epoch 1's checkpoint, untouched
    assert not list(out.glob(".checkpoint.pth.tmp*"))  # no half file left behind


def test_profile_schedule_longer_than_the_run_says_so(data, tmp_path):
    res = run(["--data", str(data), "--out", str(tmp_path / "p"), *TINY[:-2], "--epochs", "1",
               "--profile", "--profile-schedule", "5,5,5"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no trace written: the run made 5 step(s)" in res.stderr and "needs 15" in res.stderr


def test_a_bug_keeps_its_traceback_in_error_log(data, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the step")

    monkeypatch.setattr(train, "train_step", broken)
    out = tmp_path / "run"
    assert train.cli(["--data", str(data), "--out", str(out), *TINY]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "a bug in the step" in err and "error.log" in err
    log = (out / "error.log").read_text()
    assert "Traceback" in log and "RuntimeError: a bug in the step" in log


def test_a_user_mistake_is_one_line(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.cli(["--data", str(data), "--out", str(out), *TINY, "-b", "1000"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: batch size 1000 is larger than") and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_log_without_terminal_has_one_line_per_epoch(data, tmp_path):
    res = run(["--data", str(data), "--out", str(tmp_path / "r"), *TINY])
    assert res.returncode == 0
    assert "\r" not in res.stderr and "\r" not in res.stdout  # no progress-bar refreshes in a log file
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("epoch ") and "/" in ln.split()[1]]
    assert [ln.split()[1] for ln in lines] == ["1/2", "2/2"] and all("images/s" in ln for ln in lines)


def test_help_shows_each_default_once():
    text = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "400"}).stdout
    assert "(default: None) (default" not in text and text.count("(default: all) (default") == 0
    lines, current = {}, None
    for ln in text.splitlines():  # an option's help may continue on the following, deeper-indented lines
        if ln.startswith("  -"):
            current = ln.split()[0].rstrip(",")
            lines[current] = ln
        elif current and ln.startswith("    "):
            lines[current] += " " + ln.strip()
        else:
            current = None
    for opt, default in (("--epochs", "3"), ("-a", "resnet18"),
                         ("--seed", "0"), ("--knn-k", "200"), ("--knn-t", "0.1"), ("--amp", "off"),
                         ("--predictor", "learned"), ("--accum", "1"), ("--log-every", "20")):
        assert f"(default: {default})" in lines[opt], lines[opt]
    # the optimiser's constants come from --recipe: each preset's value is shown, once
    for opt, values in (("--momentum", "fmnist 0.9, imagenet 0.9, cifar 0.9"),
                        ("--wd", "fmnist 0.0005, imagenet 0.0001, cifar 0.0005")):
        assert lines[opt].count("(default:") == 1 and f"(default: from --recipe: {values})" in lines[opt], lines[opt]
    for ln in lines.values():
        assert ln.count("(default:") <= 1, ln
